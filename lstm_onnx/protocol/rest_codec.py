"""Tensors between KServe v2 REST bodies and numpy: JSON `data` and Triton's binary tensor extension.

A body is a JSON object, optionally followed by raw tensor bytes; the `Inference-Header-Content-Length` header
says where the JSON ends (never found by scanning). decode_infer_request / encode_infer_response serve the
server, encode_infer_request / decode_infer_response the client. Every refusal is an InvalidArgument naming the
field: `inputs[0].shape`, `parameters.sequence_id`, the header.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import orjson

from . import datatypes
from .codec import SequenceControl, check_sequence_id
from .errors import InvalidArgument

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
_INT64 = (-(2 ** 63), 2 ** 64 - 1)  # a sequence id is int64 or uint64 in the gRPC protocol


@dataclass
class RestInferRequest:
    """A decoded infer body: inputs, the outputs asked for (empty = all), which come back binary, the sequence."""

    id: str
    inputs: dict[str, np.ndarray]
    requested: list[str]
    binary: dict[str, bool] = field(default_factory=dict)  # output name -> binary; absent: binary_default
    binary_default: bool = False
    sequence: SequenceControl | None = None

    def wants_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """The JSON part's length from the Inference-Header-Content-Length header; None when absent."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidArgument(f"header {HEADER_LENGTH}: got {value[:40]!r}, expected an integer") from None
    if not 0 < length <= body_length:
        raise InvalidArgument(f"header {HEADER_LENGTH}: got {length}, expected 1..{body_length} (the body's length)")
    return length


def load_json(data: bytes | memoryview, what: str = "request body") -> object:
    """orjson.loads with the error as an InvalidArgument ("request body: not valid JSON: ...")."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"{what}: not valid JSON ({exc})") from None


def decode_infer_request(body: bytes, header_length: int | None) -> RestInferRequest:
    """Decode an infer body; `header_length` from parse_header_length (None: the whole body is JSON)."""
    view = memoryview(body)
    json_part = view if header_length is None else view[:header_length]
    request = load_json(json_part)
    if not isinstance(request, dict):
        raise InvalidArgument(f"request body: got {_kind(request)}, expected a JSON object")
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"id: got {_kind(request_id)}, expected a string")
    parameters = _object(request.get("parameters", {}), "parameters")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidArgument(f"inputs: got {_kind(raw_inputs)}, expected a non-empty list of tensors")
    binary = view[len(json_part):]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(raw_inputs):
        name, array, used = _decode_input(i, tensor, binary, offset, header_length is not None)
        if name in inputs:
            raise InvalidArgument(f"inputs[{i}]: input '{name}' given twice")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise InvalidArgument(f"request body: got {len(binary)} bytes after the JSON header, the inputs' "
                              f"binary_data_size sum to {offset}")
    requested, binary_of = _decode_outputs(request.get("outputs", []))
    default = _bool(parameters, "binary_data_output", "parameters")
    return RestInferRequest(request_id, inputs, requested, binary_of, default, decode_sequence_json(parameters))


def _decode_input(i: int, tensor: object, binary: memoryview, offset: int, has_header: bool
                  ) -> tuple[str, np.ndarray, int]:
    where = f"inputs[{i}]"
    tensor = _object(tensor, where)
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{where}.name: got {_kind(name)}, expected a non-empty string")
    where = f"{where} (input '{name}')"
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"{where}.datatype: got {_kind(datatype)}, expected a string such as FP32")
    try:
        dtype = datatypes.numpy_of(datatype)
    except ValueError as exc:
        raise InvalidArgument(f"{where}.datatype: {exc}") from None
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidArgument(f"{where}.shape: got {_short(shape)}, expected a list of non-negative integers")
    count = math.prod(shape)
    params = _object(tensor.get("parameters", {}), f"{where}.parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0:
            raise InvalidArgument(f"{where}.parameters.binary_data_size: got {_short(size)}, expected a "
                                  "non-negative integer")
        if "data" in tensor:
            raise InvalidArgument(f"{where}: has both data and parameters.binary_data_size, expected one")
        if not has_header:
            raise InvalidArgument(f"{where}.parameters.binary_data_size: given, but the request has no "
                                  f"{HEADER_LENGTH} header to say where its binary data starts")
        if size != count * dtype.itemsize:
            raise InvalidArgument(f"{where}.parameters.binary_data_size: got {size}, expected {count * dtype.itemsize} "
                                  f"for {datatype} shape {shape}")
        if offset + size > len(binary):
            raise InvalidArgument(f"{where}.parameters.binary_data_size: {size} bytes from offset {offset}, but only "
                                  f"{len(binary)} bytes follow the JSON header")
        flat = np.frombuffer(binary[offset:offset + size], dtype=dtype)
        if dtype == np.bool_ and flat.size and flat.view(np.uint8).max() > 1:
            raise InvalidArgument(f"{where}: BOOL binary data holds bytes other than 0 and 1")
        return name, _reshape(where, flat, shape), size
    if "data" not in tensor:
        raise InvalidArgument(f"{where}: has neither data nor parameters.binary_data_size")
    return name, _reshape(where, _decode_data(where, tensor["data"], datatype, dtype, count), shape), 0


def _decode_data(where: str, data: object, datatype: str, dtype: np.dtype, count: int) -> np.ndarray:
    """JSON `data`, flat or nested row-major, as a flat array of `dtype`; strict about element types."""
    if not isinstance(data, list):
        raise InvalidArgument(f"{where}.data: got {_kind(data)}, expected a list")
    try:
        values = np.array(data)
    except ValueError:  # ragged nesting
        raise InvalidArgument(f"{where}.data: nested lists of unequal lengths, expected a flat or regularly "
                              "nested list") from None
    values = values.reshape(-1)
    if values.size != count:
        raise InvalidArgument(f"{where}.data: got {values.size} values, expected {count} for the shape")
    kind = values.dtype.kind
    if count == 0:
        return values.astype(dtype)
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidArgument(f"{where}.data: got {_element_kind(values)}, expected true/false for BOOL")
        return values
    if dtype.kind in "iu":
        if kind not in "iu" or _has_bool(data):
            raise InvalidArgument(f"{where}.data: got {_element_kind(values)}, expected integers for {datatype}")
        info = np.iinfo(dtype)
        low, high = int(values.min()), int(values.max())
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InvalidArgument(f"{where}.data: value {bad} is out of range for {datatype} "
                                  f"({info.min}..{info.max})")
        return values.astype(dtype)
    if kind not in "iuf" or _has_bool(data):
        raise InvalidArgument(f"{where}.data: got {_element_kind(values)}, expected numbers for {datatype}")
    with np.errstate(over="ignore"):
        cast = values.astype(dtype)
    if not np.isfinite(cast).all():
        raise InvalidArgument(f"{where}.data: a value overflows {datatype} (largest "
                              f"{float(np.finfo(dtype).max):.4g}); NaN and infinity cannot travel in JSON")
    return cast


def _has_bool(data: list) -> bool:
    """Whether a numeric list holds true/false, which numpy would quietly read as 1/0."""
    return any(v is True or v is False or (type(v) is list and _has_bool(v)) for v in data)


def _element_kind(values: np.ndarray) -> str:
    if values.dtype.kind in "iuf":
        return "booleans among the numbers"
    kinds = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers with a fraction or exponent",
             "U": "strings", "O": "mixed or nested values (null, objects, huge integers)"}
    return kinds.get(values.dtype.kind, f"values of kind {values.dtype.kind!r}")


def _reshape(where: str, flat: np.ndarray, shape: list[int]) -> np.ndarray:
    try:
        return flat.reshape(shape)
    except ValueError:
        raise InvalidArgument(f"{where}.shape: got {shape}, expected dims numpy can hold") from None


def _decode_outputs(outputs: object) -> tuple[list[str], dict[str, bool]]:
    if not isinstance(outputs, list):
        raise InvalidArgument(f"outputs: got {_kind(outputs)}, expected a list")
    names, binary = [], {}
    for i, output in enumerate(outputs):
        output = _object(output, f"outputs[{i}]")
        name = output.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"outputs[{i}].name: got {_kind(name)}, expected a non-empty string")
        if name in binary:
            raise InvalidArgument(f"outputs[{i}]: output '{name}' requested twice")
        params = _object(output.get("parameters", {}), f"outputs[{i}].parameters")
        names.append(name)
        if "binary_data" in params:
            binary[name] = _bool(params, "binary_data", f"outputs[{i}].parameters")
        else:
            binary[name] = None
    return names, {k: v for k, v in binary.items() if v is not None}


def decode_sequence_json(parameters: dict) -> SequenceControl | None:
    """Triton's sequence parameters in JSON: sequence_id (integer or string; 0 or "" means none), start, end."""
    start = _bool(parameters, "sequence_start", "parameters")
    end = _bool(parameters, "sequence_end", "parameters")
    if "sequence_id" not in parameters:
        for flag, value in (("sequence_start", start), ("sequence_end", end)):
            if value:
                raise InvalidArgument(f"parameter '{flag}' given without 'sequence_id'")
        return None
    seq_id = parameters["sequence_id"]
    if type(seq_id) is int:
        if not _INT64[0] <= seq_id <= _INT64[1]:
            raise InvalidArgument(f"parameters.sequence_id: got {seq_id}, expected a 64-bit integer")
        if seq_id == 0:
            return None  # Triton: correlation id 0 means "not part of a sequence"
    elif isinstance(seq_id, str):
        if not seq_id:
            return None
        check_sequence_id(seq_id, "parameters.sequence_id")
    else:
        raise InvalidArgument(f"parameters.sequence_id: got {_kind(seq_id)}, expected an integer or a string")
    step = parameters.get("sequence_step", 0)
    if type(step) is not int or step < 0:
        raise InvalidArgument(f"parameters.sequence_step: got {step!r}, expected a step number (1 = the start)")
    return SequenceControl(seq_id, start, end, step)


def _object(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: got {_kind(value)}, expected a JSON object")
    return value


def _bool(parameters: dict, name: str, where: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}.{name}: got {_kind(value)}, expected true or false")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object"}
    label = names.get(type(value), type(value).__name__)
    return f"{label} {_short(value)}" if isinstance(value, (bool, int, float, str)) else label


def _short(value: object) -> str:
    text = orjson.dumps(value).decode() if isinstance(value, (bool, int, float, str, list, dict)) or value is None \
        else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def encode_infer_response(model: str, version: int, request_id: str, outputs: dict[str, np.ndarray],
                          binary: RestInferRequest | None = None) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON part's length for the header."""
    tensors, blobs = [], []
    for name, array in outputs.items():
        datatype = datatypes.datatype_of_numpy(array.dtype)
        entry: dict = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary is not None and binary.wants_binary(name):
            blob = np.ascontiguousarray(array, dtype=datatypes.numpy_of(datatype)).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            flat = np.ascontiguousarray(array).reshape(-1)  # orjson writes C-contiguous arrays only
            entry["data"] = flat.astype(np.float32) if datatype == "FP16" else flat
        tensors.append(entry)
    response: dict = {"model_name": model, "model_version": str(version), "outputs": tensors}
    if request_id:
        response["id"] = request_id
    head = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def encode_infer_request(inputs: dict[str, np.ndarray], outputs: list[str] | None = None, binary: bool = True,
                         sequence: SequenceControl | None = None, request_id: str = "") -> tuple[bytes, int | None]:
    """Client side: a request body with binary tensors (or JSON `data`), outputs binary when `binary`."""
    tensors, blobs = [], []
    for name, array in inputs.items():
        datatype = datatypes.datatype_of_numpy(array.dtype)
        entry: dict = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = np.ascontiguousarray(array, dtype=datatypes.numpy_of(datatype)).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            flat = np.ascontiguousarray(array).reshape(-1)
            entry["data"] = flat.astype(np.float32) if datatype == "FP16" else flat
        tensors.append(entry)
    parameters: dict = {"binary_data_output": binary}
    if sequence is not None:
        parameters.update(sequence_id=sequence.id, sequence_start=sequence.start, sequence_end=sequence.end)
        if sequence.step:
            parameters["sequence_step"] = sequence.step
    request: dict = {"inputs": tensors, "parameters": parameters}
    if request_id:
        request["id"] = request_id
    if outputs:
        request["outputs"] = [{"name": n, "parameters": {"binary_data": binary}} for n in outputs]
    head = orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def decode_infer_response(body: bytes, header_length: int | None) -> dict[str, np.ndarray]:
    """Client side: the output arrays of a response body, JSON `data` or binary."""
    view = memoryview(body)
    head = load_json(view if header_length is None else view[:header_length], "response body")
    offset = 0 if header_length is None else header_length
    arrays = {}
    for tensor in head.get("outputs", []):
        dtype = datatypes.numpy_of(tensor["datatype"])
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            flat = np.frombuffer(view[offset:offset + size], dtype=dtype)
            offset += size
        else:
            flat = np.asarray(tensor["data"], dtype=dtype)
        arrays[tensor["name"]] = flat.reshape(tensor["shape"])
    return arrays
