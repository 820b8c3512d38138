"""The tensor codec on its own: raw and typed contents, every refusal's exact text, sequence parameters, responses."""
from __future__ import annotations

import numpy as np
import pytest

from lstm_onnx.protocol.codec import (
    SequenceControl,
    decode_request,
    decode_response,
    decode_sequence,
    decode_sequence_step,
    encode_request,
    encode_response,
    encode_sequence_step,
)
from lstm_onnx.protocol.errors import InvalidArgument
from lstm_onnx.protos import grpc_service_pb2 as pb


def _refusal(request: pb.ModelInferRequest) -> str:
    with pytest.raises(InvalidArgument) as caught:
        decode_request(request)
    return str(caught.value)


@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<f2", "<i4", "<i8", "<u1", "|b1"])
def test_raw_request_round_trips_every_dtype_with_outputs_and_sequence(dtype):
    x = (np.arange(6) % 2 if dtype == "|b1" else np.arange(6) - 2).astype(dtype).reshape(2, 3)
    request = encode_request("m", {"x": x, "y": x[:1]}, version="3", outputs=["out", "hn"],
                             sequence=SequenceControl("s", True, False), request_id="r1")
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "r1")
    inputs, requested, control = decode_request(request)
    assert list(inputs) == ["x", "y"] and requested == ["out", "hn"]
    np.testing.assert_array_equal(inputs["x"], x)
    np.testing.assert_array_equal(inputs["y"], x[:1])
    assert inputs["x"].dtype == x.dtype and control == SequenceControl("s", True, False)


@pytest.mark.parametrize("datatype, field, values, want", [
    ("FP32", "fp32_contents", [0.5, -1.0], np.array([[0.5], [-1.0]], np.float32)),
    ("INT64", "int64_contents", [3, -4], np.array([[3], [-4]], np.int64)),
    ("INT8", "int_contents", [3, -4], np.array([[3], [-4]], np.int8)),
    ("UINT32", "uint_contents", [3, 4], np.array([[3], [4]], np.uint32)),
    ("BOOL", "bool_contents", [True, False], np.array([[True], [False]])),
])
def test_typed_contents_decode_to_the_datatype(datatype, field, values, want):
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2, 1])
    getattr(tensor.contents, field).extend(values)
    inputs, requested, control = decode_request(request)
    np.testing.assert_array_equal(inputs["x"], want)
    assert inputs["x"].dtype == want.dtype and requested == [] and control is None


def test_every_malformed_request_is_refused_with_its_reason():
    mixed = encode_request("m", {"x": np.zeros((1, 2), np.float32)})
    t = mixed.inputs.add(name="y", datatype="FP32", shape=[1])
    t.contents.fp32_contents.append(1.0)
    assert _refusal(mixed) == ("request mixes raw_input_contents (1) with typed contents (inputs ['y']); "
                               "use one or the other")
    short = encode_request("m", {"x": np.zeros((1, 2), np.float32)})
    short.inputs.add(name="y", datatype="FP32", shape=[1])
    assert _refusal(short) == "raw_input_contents: got 1 entries, expected one per input (2)"
    twice = encode_request("m", {"x": np.zeros(2, np.float32)})
    twice.inputs.add(name="x", datatype="FP32", shape=[2])
    twice.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    assert _refusal(twice) == "input 'x': given twice"
    outputs = encode_request("m", {"x": np.zeros(2, np.float32)}, outputs=["a", "b", "a"])
    assert _refusal(outputs) == "requested outputs ['a', 'b', 'a']: a name appears twice"

    def raw(datatype, shape, data):
        request = pb.ModelInferRequest(model_name="m")
        request.inputs.add(name="x", datatype=datatype, shape=shape)
        request.raw_input_contents.append(data)
        return _refusal(request)

    assert raw("FP32", [2, -1], b"") == "input 'x': got shape [2, -1], expected non-negative dims"
    assert raw("FP32", [2, 3], b"\0" * 20) == "input 'x': got 20 bytes, expected 24 for FP32 shape [2, 3]"
    assert raw("NOPE", [1], b"\0").startswith("input 'x': ")
    assert raw("FP32", [2 ** 62, 2 ** 62, 0], b"") == ("input 'x': got shape [4611686018427387904, "
                                                       "4611686018427387904, 0], expected dims numpy can hold")

    def typed(datatype, field, values, shape=(2,)):
        request = pb.ModelInferRequest(model_name="m")
        tensor = request.inputs.add(name="x", datatype=datatype, shape=list(shape))
        getattr(tensor.contents, field).extend(values)
        return _refusal(request)

    assert typed("FP16", "fp32_contents", [1.0, 2.0]) == ("input 'x': datatype FP16 cannot travel in typed contents, "
                                                          "send it in raw_input_contents")
    assert typed("FP32", "int_contents", [1, 2]) == ("input 'x': got its values in contents.int_contents, expected "
                                                     "contents.fp32_contents for datatype FP32")
    assert typed("FP32", "fp32_contents", [1.0]) == "input 'x': got 1 values, expected 2 for shape [2]"
    assert typed("FP32", "fp32_contents", [], (2 ** 62, 2 ** 62, 0)) == (
        "input 'x': got shape [4611686018427387904, 4611686018427387904, 0], expected dims numpy can hold")


def test_empty_typed_tensor_is_zero_elements():
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[0, 3])
    tensor.contents.SetInParent()
    assert decode_request(request)[0]["x"].shape == (0, 3)


def _params(**values) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    for key, value in values.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(request.parameters[key], kind, value)
    return request


def test_sequence_parameters_as_triton_sends_them():
    assert decode_sequence(_params().parameters) is None
    assert decode_sequence(_params(sequence_id=7).parameters) == SequenceControl(7, False, False)
    assert decode_sequence(_params(sequence_id="a", sequence_start=True).parameters) == SequenceControl("a", True)
    assert decode_sequence(_params(sequence_id=7, sequence_end=True).parameters) == SequenceControl(7, False, True)
    assert decode_sequence(_params(sequence_id=0, sequence_start=True).parameters) is None  # correlation id 0
    assert decode_sequence(_params(sequence_id="", sequence_start=True).parameters) is None
    assert decode_sequence(_params(sequence_start=False).parameters) is None
    unsigned = pb.ModelInferRequest()
    unsigned.parameters["sequence_id"].uint64_param = 2 ** 63
    assert decode_sequence(unsigned.parameters) == SequenceControl(2 ** 63)
    for flag in ("sequence_start", "sequence_end"):
        with pytest.raises(InvalidArgument) as caught:
            decode_sequence(_params(**{flag: True}).parameters)
        assert str(caught.value) == f"parameter '{flag}' given without 'sequence_id'"
    with pytest.raises(InvalidArgument) as caught:
        decode_sequence(_params(sequence_id=True).parameters)
    assert str(caught.value) == "parameter 'sequence_id': got bool_param, expected int64_param or string_param"
    with pytest.raises(InvalidArgument) as caught:
        decode_sequence(_params(sequence_id=3, sequence_end="yes").parameters)
    assert str(caught.value) == "parameter 'sequence_end': got string_param, expected bool_param"


def test_big_endian_arrays_travel_little_endian_and_defaults_are_empty():
    x = np.arange(4, dtype=">f4").reshape(2, 2)
    request = encode_request("m", {"x": x})
    assert request.raw_input_contents[0] == x.astype("<f4").tobytes()
    assert (request.model_version, request.id, list(request.outputs)) == ("", "", [])
    response = encode_response("m", 1, "", {"y": x.astype(">i8")})
    assert response.raw_output_contents[0] == x.astype("<i8").tobytes()


@pytest.mark.parametrize("sequence_id", [5, "named"])
def test_encoded_sequence_parameters_decode_back(sequence_id):
    for start, end in ((True, False), (False, True), (False, False)):
        request = encode_request("m", {}, sequence=SequenceControl(sequence_id, start, end))
        assert decode_sequence(request.parameters) == SequenceControl(sequence_id, start, end)
    assert "sequence_id" not in encode_request("m", {}).parameters


def test_response_round_trips_raw_and_typed_and_carries_its_step():
    outputs = {"output": np.arange(6, dtype=np.float32).reshape(2, 3), "flag": np.array([True, False]),
               "big": np.arange(3, dtype=np.int64).reshape(1, 3)[:, ::-1]}
    response = encode_response("m", 4, "r9", outputs)
    assert (response.model_name, response.model_version, response.id) == ("m", "4", "r9")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("output", "FP32", [2, 3]), ("flag", "BOOL", [2]), ("big", "INT64", [1, 3])]
    decoded = decode_response(response)
    for name, array in outputs.items():
        np.testing.assert_array_equal(decoded[name], array)
        assert decoded[name].dtype == array.dtype
    typed = pb.ModelInferResponse()
    tensor = typed.outputs.add(name="y", datatype="INT8", shape=[2, 1])  # int8 values in the int32 field
    tensor.contents.int_contents.extend([4, -5])
    y = decode_response(typed)["y"]
    np.testing.assert_array_equal(y, np.array([[4], [-5]], np.int8))
    assert y.dtype == np.int8
    assert decode_sequence_step(response) is None
    encode_sequence_step(response, 3, "r8")
    assert decode_sequence_step(response) == (3, "r8")
