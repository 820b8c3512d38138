"""A numpy-only safetensors reader (8-byte little-endian header length, JSON header, raw bytes), bounds-checked."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

# safetensors dtype names -> little-endian numpy dtypes; BF16 is widened to float32 on read.
_DTYPES: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
# A header larger than this is not a weights file we wrote; refusing it bounds memory before json.loads.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is truncated, malformed, or describes tensors outside its own bytes."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file into numpy arrays (BF16 widened to float32).

    Every offset is checked against the file size and against the tensor's dtype and shape, so a
    hostile or truncated file raises SafetensorsError naming the tensor instead of reading garbage.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SafetensorsError(f"{path}: missing, expected a safetensors file") from None
    except OSError as exc:
        raise SafetensorsError(f"{path}: cannot read ({exc.strerror})") from None
    if data[:1] == b"\x80":
        raise SafetensorsError(f"{path}: looks like a pickle; only safetensors are accepted (pickles can run code)")
    if len(data) < 8:
        raise SafetensorsError(f"{path}: got {len(data)} bytes, expected at least the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise SafetensorsError(
            f"{path}: header length {header_len} does not fit the file ({len(data)} bytes, "
            f"limit {MAX_HEADER_BYTES})"
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is a {type(header).__name__}, expected a JSON object")
    body = memoryview(data)[8 + header_len :]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _decode_tensor(path, name, info, body)
    return tensors


def _decode_tensor(path: Path, name: str, info: object, body: memoryview) -> np.ndarray:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where}: entry is a {type(info).__name__}, expected an object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype_name != "BF16" and dtype_name not in _DTYPES:
        raise SafetensorsError(f"{where}: dtype {dtype_name!r}, expected one of {', '.join(sorted(_DTYPES))}, BF16")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise SafetensorsError(f"{where}: shape {shape!r}, expected a list of non-negative integers")
    if not (
        isinstance(offsets, list) and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise SafetensorsError(f"{where}: data_offsets {offsets!r}, expected [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= len(body):
        raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}] outside the {len(body)}-byte data section")
    itemsize = 2 if dtype_name == "BF16" else np.dtype(_DTYPES[dtype_name]).itemsize
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if end - begin != count * itemsize:
        raise SafetensorsError(
            f"{where}: {end - begin} bytes for shape {shape} of {dtype_name}, expected {count * itemsize}"
        )
    raw = body[begin:end]
    if dtype_name == "BF16":
        # bfloat16 is the top half of a float32: shift it back into place.
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=_DTYPES[dtype_name]).reshape(shape).copy()
