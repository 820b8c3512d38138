"""The shared vocabulary of the parts (docs/contract.md): run-directory files, gate orders, recurrent ops, metadata.

Torch-free and onnxruntime-free: model/, export/, the audit and server/ all import it, so nothing here
may import any of them. numpy only.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

import numpy as np

# Run directory written by `lstm-onnx train`.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INIT_FILE = "init.safetensors"
METRICS_FILE = "metrics.json"
PLOT_FILE = "loss.png"
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, INIT_FILE, METRICS_FILE, PLOT_FILE)
RUN_FORMAT = "lstm-onnx-run/1"

# Recurrent operators the export writes and the audit and server read (ONNX default domain).
RECURRENT_OPS = ("LSTM", "GRU")
ONNX_DOMAINS = ("", "ai.onnx")
# onnxruntime's quantized recurrent ops (com.microsoft domain) -> the cell they compute. Their int8 weights
# are stored transposed, W [D, input, 4H] and R [D, H, 4H], with per-direction or per-row scales.
MS_DOMAIN = "com.microsoft"
QUANTIZED_RECURRENT_OPS = {"DynamicQuantizeLSTM": "LSTM"}

# Row blocks inside ONNX's fused W/R/B, in the order the operator spec stores them.
ONNX_GATE_ORDER: dict[str, tuple[str, ...]] = {
    "LSTM": ("input", "output", "forget", "cell"),  # i, o, f, c
    "GRU": ("update", "reset", "hidden"),  # z, r, h
}
# Row blocks inside PyTorch's weight_ih_l{k} / weight_hh_l{k} / bias_*_l{k}.
PYTORCH_GATE_ORDER: dict[str, tuple[str, ...]] = {
    "LSTM": ("input", "forget", "cell", "output"),  # i, f, g, o
    "GRU": ("reset", "update", "hidden"),  # r, z, n
}
# The cell names of config.json ("lstm"/"gru") against the ONNX op types.
CELL_OPS = {"lstm": "LSTM", "gru": "GRU"}

# ONNX metadata_props entry that holds the export's contract JSON.
# Ranges of the config.pbtxt values we write and read: export refuses to write what the server refuses to load.
MAX_BATCH_SIZE = 1 << 16  # rows merged into one run; a request's own size is bounded by max_message_bytes
MAX_QUEUE_DELAY_US = 10_000_000  # 10 s: a longer wait for a batch to fill outlasts the clients' deadlines
MAX_SEQUENCE_IDLE_US = 86_400_000_000  # 1 day: past it a sequence is never forgotten, in practice

METADATA_KEY = "lstm_onnx.contract"
CONTRACT_FORMAT = "lstm-onnx/1"


def initializer_names(layer: int) -> dict[str, str]:
    """Readable initializer names of recurrent layer `layer`."""
    return {"W": f"layer{layer}.W", "R": f"layer{layer}.R", "B": f"layer{layer}.B"}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, as `sha256:<hex>` (the contract's checkpoint_digest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


class RunDirectoryError(ValueError):
    """A run directory, or its config.json, is missing or unreadable."""


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of a run directory as a plain dict with a 'model' object (torch-free)."""
    run_dir = os.fspath(run_dir)
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isdir(run_dir):
        raise RunDirectoryError(f"run directory {run_dir}: not found, expected the output of `lstm-onnx train`")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise RunDirectoryError(f"{path}: missing, expected the run's config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirectoryError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise RunDirectoryError(f"{path}: expected an object with a 'model' section")
    return data


_DTYPES = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT32": "<i4", "INT64": "<i8"}


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """A small tensor as JSON: datatype, shape, base64 of little-endian C-order bytes."""
    name = {np.dtype(v): k for k, v in _DTYPES.items()}[np.dtype(array.dtype).newbyteorder("<")]
    data = np.ascontiguousarray(array, dtype=_DTYPES[name])
    return {"datatype": name, "shape": list(array.shape), "b64": base64.b64encode(data.tobytes()).decode()}


def decode_tensor(obj: dict[str, Any]) -> np.ndarray:
    """The inverse of `encode_tensor`."""
    dtype = _DTYPES[obj["datatype"]]
    raw = base64.b64decode(obj["b64"])
    return np.frombuffer(raw, dtype=dtype).reshape(obj["shape"]).astype(dtype[1:])


def parse_contract(raw: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """The contract JSON from the metadata value (None when absent), and a problem when it is unreadable."""
    if raw is None:
        return None, None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, f"metadata {METADATA_KEY}: not valid JSON ({exc})"
    if not isinstance(data, dict):
        return None, f"metadata {METADATA_KEY}: got {type(data).__name__}, expected an object"
    return data, None


def read_contract(model: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The contract of an onnx.ModelProto (None for a foreign model), and a problem when it is unreadable."""
    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    return parse_contract(raw)
