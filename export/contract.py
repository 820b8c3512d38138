"""The ONNX-side contract: gate names and orders, initializer names, metadata key, and gate digests (numpy only)."""
from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from .gates import gate_digest, split_gates

METADATA_KEY = "lstm_onnx.contract"
CONTRACT_FORMAT = "lstm-onnx/1"


def initializer_names(layer: int) -> dict[str, str]:
    """Readable initializer names of recurrent layer `layer`."""
    return {"W": f"layer{layer}.W", "R": f"layer{layer}.R", "B": f"layer{layer}.B"}


def gate_digests(cell: str, layers: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> dict[str, str]:
    """Digest of every gate slice, keyed `layer{k}.{direction}.{gate}.{part}`, exactly as the audit computes it."""
    op = cell.upper()
    digests: dict[str, str] = {}
    for k, (W, R, B) in enumerate(layers):
        direction = "bidirectional" if W.shape[0] == 2 else "forward"
        names = initializer_names(k)
        for gate in split_gates(op, k, R.shape[-1], direction, {"W": W, "R": R, "B": B}, names):
            digests[gate.key] = gate_digest(gate.array)
    return digests


_DTYPES = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT32": "<i4", "INT64": "<i8"}


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """A small tensor as JSON: datatype, shape, base64 of little-endian C-order bytes."""
    name = {np.dtype(v): k for k, v in _DTYPES.items()}[np.dtype(array.dtype).newbyteorder("<")]
    data = np.ascontiguousarray(array, dtype=_DTYPES[name])
    return {"datatype": name, "shape": list(array.shape), "b64": base64.b64encode(data.tobytes()).decode()}


def decode_tensor(obj: dict[str, Any]) -> np.ndarray:
    dtype = _DTYPES[obj["datatype"]]
    raw = base64.b64decode(obj["b64"])
    return np.frombuffer(raw, dtype=dtype).reshape(obj["shape"]).astype(dtype[1:])


def read_contract_checked(model: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The contract JSON from an onnx.ModelProto's metadata_props (None for a foreign model), and a
    problem description when the entry is there but unreadable."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                data = json.loads(prop.value)
            except json.JSONDecodeError as exc:
                return None, f"metadata {METADATA_KEY}: not valid JSON ({exc})"
            if not isinstance(data, dict):
                return None, f"metadata {METADATA_KEY}: got {type(data).__name__}, expected an object"
            return data, None
    return None, None


def read_contract(model: Any) -> dict[str, Any] | None:
    """The contract JSON, or None for a foreign model or an unreadable entry."""
    return read_contract_checked(model)[0]
