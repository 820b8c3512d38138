"""The ONNX-side contract: gate names and orders, initializer names, metadata key, and gate digests (numpy only)."""
from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Iterator

import numpy as np

METADATA_KEY = "lstm_onnx.contract"
CONTRACT_FORMAT = "lstm-onnx/1"
DIRECTIONS = ("forward", "reverse")

# Gate names in the order their row blocks appear inside ONNX's fused W, R and B.
ONNX_GATES = {"lstm": ("input", "output", "forget", "cell"), "gru": ("update", "reset", "hidden")}
# The same gates in PyTorch's fused order (weight_ih_l{k} rows): LSTM i, f, g, o; GRU r, z, n.
TORCH_GATES = {"lstm": ("input", "forget", "cell", "output"), "gru": ("reset", "update", "hidden")}
# Reading order for people: what one asks about first.
DISPLAY_GATES = {"lstm": ("input", "forget", "cell", "output"), "gru": ("update", "reset", "hidden")}


def initializer_names(layer: int) -> dict[str, str]:
    """Readable initializer names of recurrent layer `layer`."""
    return {"W": f"layer{layer}.W", "R": f"layer{layer}.R", "B": f"layer{layer}.B"}


def gate_key(layer: int, direction: str, gate: str, part: str) -> str:
    return f"layer{layer}.{direction}.{gate}.{part}"


def split_gates(cell: str, W: np.ndarray, R: np.ndarray, B: np.ndarray | None) -> Iterator[tuple[str, int, str, str, np.ndarray]]:
    """Yield (key, direction_index, gate, part, tensor) for every gate slice of one ONNX recurrent node.

    W: [D, G*H, in], R: [D, G*H, H], B: [D, 2*G*H] (Wb then Rb), ONNX gate order.
    """
    gates = ONNX_GATES[cell]
    hidden = R.shape[-1]
    for d in range(W.shape[0]):
        for g, gate in enumerate(gates):
            rows = slice(g * hidden, (g + 1) * hidden)
            yield gate, d, "W", W[d, rows, :]
            yield gate, d, "R", R[d, rows, :]
            if B is not None:
                yield gate, d, "bW", B[d, rows]
                yield gate, d, "bR", B[d, len(gates) * hidden + g * hidden : len(gates) * hidden + (g + 1) * hidden]


def tensor_digest(array: np.ndarray) -> str:
    """SHA-256 of a tensor as contiguous little-endian float32 bytes."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return "sha256:" + hashlib.sha256(data.tobytes()).hexdigest()


def gate_digests(cell: str, layers: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> dict[str, str]:
    digests: dict[str, str] = {}
    for k, (W, R, B) in enumerate(layers):
        for gate, d, part, t in split_gates(cell, W, R, B):
            digests[gate_key(k, DIRECTIONS[d], gate, part)] = tensor_digest(t)
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


def read_contract(model: Any) -> dict[str, Any] | None:
    """The contract JSON from an onnx.ModelProto's metadata_props, or None for a foreign model."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return None
