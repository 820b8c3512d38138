"""The KServe v2 tensor datatypes and their numpy and ONNX equivalents."""
from __future__ import annotations

import numpy as np

from .errors import clip

# v2 datatype -> numpy dtype (little-endian, as on the wire).
NUMPY_OF: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

# ONNX TensorProto element type -> v2 datatype (onnx.TensorProto numbering).
_ONNX_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "BYTES",
               9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64"}
# onnxruntime's type strings, e.g. "tensor(float)" -> v2 datatype.
_ORT_TYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
              "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
              "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
              "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL", "tensor(string)": "BYTES"}
# config.pbtxt DataType enum name -> v2 datatype.
_CONFIG_PREFIX = "TYPE_"


def datatype_of_ort(type_string: str) -> str:
    """v2 datatype of an onnxruntime type string ("tensor(float)" -> "FP32")."""
    try:
        return _ORT_TYPES[type_string]
    except KeyError:
        raise ValueError(f"onnxruntime type {type_string!r} has no KServe v2 datatype") from None



def datatype_of_config(enum_name: str) -> str:
    """v2 datatype of a config.pbtxt DataType name ("TYPE_FP32" -> "FP32"; "TYPE_STRING" -> "BYTES")."""
    name = enum_name.removeprefix(_CONFIG_PREFIX)
    return "BYTES" if name == "STRING" else name


def config_name_of(datatype: str) -> str:
    """config.pbtxt DataType name of a v2 datatype ("FP32" -> "TYPE_FP32")."""
    return _CONFIG_PREFIX + ("STRING" if datatype == "BYTES" else datatype)


def numpy_of(datatype: str) -> np.dtype:
    """The numpy dtype of a numeric v2 datatype; raises ValueError naming the supported ones."""
    try:
        return NUMPY_OF[datatype]
    except KeyError:
        raise ValueError(f"datatype {clip(datatype)!r} is not supported, expected one of {', '.join(NUMPY_OF)}") from None


def datatype_of_numpy(dtype: np.dtype) -> str:
    """The v2 datatype of a numpy dtype (float32 -> "FP32")."""
    dtype = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    for name, candidate in NUMPY_OF.items():
        if candidate == dtype:
            return name
    raise ValueError(f"numpy dtype {dtype} has no KServe v2 datatype")
