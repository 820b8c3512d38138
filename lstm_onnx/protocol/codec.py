"""Tensors between protobuf and numpy: decode_request / encode_response, and the sequence parameters."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lstm_onnx.protos import grpc_service_pb2 as pb

from . import datatypes
from .errors import InvalidArgument, clip


@dataclass(frozen=True)
class SequenceControl:
    """The sequence parameters of one request (Triton's sequence_id / sequence_start / sequence_end)."""

    id: int | str
    start: bool = False
    end: bool = False
    # The step number this request must be (request parameter `sequence_step`, as answers carry it; 1 = the
    # start), 0 for any: a client retrying on another replica after a lost answer sends it, so that a step the
    # first replica applied before it died is refused (FAILED_PRECONDITION) instead of applied twice.
    step: int = 0


# Longest string sequence_id, in UTF-8 bytes: a live sequence keeps its id, so an uncapped one is memory any client
# can take (a 128-bit id in hex or a UUID is 32-36 bytes; 256 leaves room for prefixes).
MAX_SEQUENCE_ID_BYTES = 256


def check_sequence_id(seq_id: str, where: str) -> str:
    """A string sequence id within MAX_SEQUENCE_ID_BYTES, or InvalidArgument naming the limit."""
    size = len(seq_id.encode("utf-8", "surrogatepass"))
    if size > MAX_SEQUENCE_ID_BYTES:
        raise InvalidArgument(f"{where}: got a string of {size} bytes, expected at most {MAX_SEQUENCE_ID_BYTES} bytes "
                              "(MAX_SEQUENCE_ID_BYTES, UTF-8); use a shorter id, such as a UUID")
    return seq_id


# Which typed-contents field carries each datatype (KServe v2).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def decode_request(request: pb.ModelInferRequest) -> tuple[dict[str, np.ndarray], list[str], SequenceControl | None]:
    """The input arrays, the requested output names (empty = all), and the sequence control, if any."""
    raw = list(request.raw_input_contents)
    typed = [t.name for t in request.inputs if t.HasField("contents")]
    if raw and typed:
        raise InvalidArgument(f"request mixes raw_input_contents ({len(raw)}) with typed contents (inputs {typed}); "
                              "use one or the other")
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents: got {len(raw)} entries, expected one per input "
                              f"({len(request.inputs)})")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise InvalidArgument(f"input '{clip(tensor.name)}': given twice")
        inputs[tensor.name] = _decode_tensor(tensor, raw[i] if raw else None)
    requested = [o.name for o in request.outputs]
    if len(set(requested)) != len(requested):
        raise InvalidArgument(f"requested outputs {[clip(n) for n in requested]}: a name appears twice")
    return inputs, requested, decode_sequence(request.parameters)


def _decode_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    name, datatype = clip(tensor.name), tensor.datatype  # name: for messages only
    try:
        dtype = datatypes.numpy_of(datatype)
    except ValueError as exc:
        raise InvalidArgument(f"input '{name}': {exc}") from None
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{name}': got shape {shape}, expected non-negative dims")
    count = math.prod(shape)  # Python ints: an int64 product of huge dims could wrap to the byte count sent
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(f"input '{name}': got {len(raw)} bytes, expected {count * dtype.itemsize} "
                                  f"for {datatype} shape {shape}")
        return _reshape(name, np.frombuffer(raw, dtype=dtype), shape)
    field = _CONTENTS_FIELD.get(datatype)  # FP16 and BYTES have none
    if field is None:
        raise InvalidArgument(f"input '{name}': datatype {clip(datatype)} cannot travel in typed contents, "
                              "send it in raw_input_contents")
    values = getattr(tensor.contents, field)
    sent = [f for f in sorted(set(_CONTENTS_FIELD.values())) if f != field and getattr(tensor.contents, f)]
    if sent:
        raise InvalidArgument(f"input '{name}': got its values in contents.{sent[0]}, expected contents.{field} "
                              f"for datatype {datatype}")
    if len(values) != count:
        raise InvalidArgument(f"input '{name}': got {len(values)} values, expected {count} for shape {shape}")
    return _reshape(name, np.asarray(values, dtype=dtype), shape)


def _reshape(name: str, flat: np.ndarray, shape: list[int]) -> np.ndarray:
    try:
        return flat.reshape(shape)
    except ValueError:  # an empty tensor with dims numpy cannot index, e.g. [2**62, 2**62, 0]
        raise InvalidArgument(f"input '{name}': got shape {shape}, expected dims numpy can hold") from None


def decode_sequence(parameters) -> SequenceControl | None:
    """Triton's sequence parameters: sequence_id (int64 or string), sequence_start, sequence_end."""
    if "sequence_id" not in parameters:
        for flag in ("sequence_start", "sequence_end"):
            if flag in parameters and _bool_param(parameters, flag):
                raise InvalidArgument(f"parameter '{flag}' given without 'sequence_id'")
        return None
    param = parameters["sequence_id"]
    kind = param.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        seq_id: int | str = getattr(param, kind)
        if seq_id == 0:
            return None  # Triton: correlation id 0 means "not part of a sequence"
    elif kind == "string_param":
        seq_id = param.string_param
        if not seq_id:
            return None
        check_sequence_id(seq_id, "parameter 'sequence_id'")
    else:
        raise InvalidArgument(f"parameter 'sequence_id': got {kind}, expected int64_param or string_param")
    step = 0
    if "sequence_step" in parameters:
        if parameters["sequence_step"].WhichOneof("parameter_choice") != "int64_param":
            raise InvalidArgument(f"parameter 'sequence_step': got "
                                  f"{parameters['sequence_step'].WhichOneof('parameter_choice')}, expected int64_param")
        step = parameters["sequence_step"].int64_param
    return SequenceControl(seq_id, _bool_param(parameters, "sequence_start"), _bool_param(parameters, "sequence_end"),
                           step)


def _bool_param(parameters, name: str) -> bool:
    if name not in parameters:
        return False
    kind = parameters[name].WhichOneof("parameter_choice")
    if kind != "bool_param":
        raise InvalidArgument(f"parameter '{name}': got {kind}, expected bool_param")
    return parameters[name].bool_param


def encode_response(model: str, version: int, request_id: str, outputs: dict[str, np.ndarray]
                    ) -> pb.ModelInferResponse:
    """Outputs in raw_output_contents (little-endian, C order), one entry per output in order."""
    response = pb.ModelInferResponse(model_name=model, model_version=str(version), id=request_id)
    for name, array in outputs.items():
        datatype = datatypes.datatype_of_numpy(array.dtype)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(
            np.ascontiguousarray(array, dtype=datatypes.numpy_of(datatype)).tobytes())
    return response


def encode_sequence_step(response: pb.ModelInferResponse, step: int, previous_id: str) -> None:
    """Which step of its sequence a response answers: `sequence_step` (1 = the sequence_start) and
    `sequence_previous_id`, the request id of the step whose state it continued ("" after a start). A client
    that lost an answer (cancelled after the server applied the step) sees it here on its next one."""
    response.parameters["sequence_step"].int64_param = step
    response.parameters["sequence_previous_id"].string_param = previous_id


def decode_sequence_step(response: pb.ModelInferResponse) -> tuple[int, str] | None:
    """(sequence_step, sequence_previous_id) of a response to a sequence request; None for any other."""
    if "sequence_step" not in response.parameters:
        return None
    return (response.parameters["sequence_step"].int64_param,
            response.parameters["sequence_previous_id"].string_param)


def decode_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """The output arrays of a response (client side), from raw_output_contents or typed contents."""
    raw = list(response.raw_output_contents)
    arrays = {}
    for i, tensor in enumerate(response.outputs):
        dtype = datatypes.numpy_of(tensor.datatype)
        if raw:
            arrays[tensor.name] = np.frombuffer(raw[i], dtype=dtype).reshape(list(tensor.shape))
        else:
            values = getattr(tensor.contents, _CONTENTS_FIELD[tensor.datatype])
            arrays[tensor.name] = np.asarray(values, dtype=dtype).reshape(list(tensor.shape))
    return arrays


def encode_request(model: str, inputs: dict[str, np.ndarray], version: str = "", outputs: list[str] | None = None,
                   sequence: SequenceControl | None = None, request_id: str = "") -> pb.ModelInferRequest:
    """A request with raw_input_contents (client side), with sequence parameters when given."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        datatype = datatypes.datatype_of_numpy(array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array, dtype=datatypes.numpy_of(datatype)).tobytes())
    for name in outputs or []:
        request.outputs.add(name=name)
    if sequence is not None:
        if isinstance(sequence.id, str):
            request.parameters["sequence_id"].string_param = sequence.id
        else:
            request.parameters["sequence_id"].int64_param = sequence.id
        request.parameters["sequence_start"].bool_param = sequence.start
        request.parameters["sequence_end"].bool_param = sequence.end
        if sequence.step:
            request.parameters["sequence_step"].int64_param = sequence.step
    return request
