"""Hostile request bytes: client text echoed into an error is clipped so the status still fits gRPC's metadata limit,
and a message protobuf cannot decode (too deeply nested, corrupt) is a bad request, not UNKNOWN."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from server_models import write_identity_model

from lstm_onnx.protos import grpc_service_pb2 as pb
from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

HUGE = 8_000_000  # characters: far past gRPC's 16 KiB hard limit on metadata, where a status message travels
METHOD = "/inference.GRPCInferenceService/"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    repo = tmp_path_factory.mktemp("requests") / "repo"
    write_identity_model(repo / "good" / "1" / "model.onnx", "FP32")
    with BackgroundServer(ServerSettings(model_repository=str(repo), grpc_port=0, metrics_port=-1)) as srv:
        yield srv


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.url) as channel:
        yield channel


def _infer_request(model: str = "good", input_name: str = "x") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="FP32", shape=[1, 3])
    request.raw_input_contents.append(np.arange(3, dtype=np.float32).tobytes())
    return request


def _nested_groups(depth: int) -> bytes:
    """A message of `depth` nested groups of an unknown field: past protobuf's recursion limit (100) it cannot be
    decoded, though every byte is well-formed."""
    start, end = bytes([0x9B, 0x06]), bytes([0x9C, 0x06])  # field 99, wire types 3 (start group) and 4 (end)
    return start * depth + end * depth


def _assert_answers(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    response = stub.ModelInfer(_infer_request(), timeout=30)
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [0, 1, 2]


@pytest.mark.parametrize("rpc, build, code", [
    ("ModelMetadata", lambda: pb.ModelMetadataRequest(name="m" * HUGE), grpc.StatusCode.NOT_FOUND),
    ("ModelConfig", lambda: pb.ModelConfigRequest(name="\u00e9" * HUGE), grpc.StatusCode.NOT_FOUND),  # escaped: 6 B each
    ("ModelMetadata", lambda: pb.ModelMetadataRequest(name="good", version="9" * HUGE), grpc.StatusCode.NOT_FOUND),
    ("ModelInfer", lambda: _infer_request(model="m" * HUGE), grpc.StatusCode.NOT_FOUND),
    ("ModelInfer", lambda: _infer_request(input_name="x" * HUGE), grpc.StatusCode.INVALID_ARGUMENT),
], ids=["model-name", "model-name-non-ascii", "version", "infer-model-name", "infer-input-name"])
def test_error_echoing_huge_client_text_is_clipped_and_keeps_its_status(channel, rpc, build, code):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, rpc)(build(), timeout=60)
    details = caught.value.details()
    assert caught.value.code() == code, details  # not RESOURCE_EXHAUSTED "metadata size exceeds hard limit"
    assert len(details) <= 4096 and f"({HUGE} chars)" in details, details
    _assert_answers(stub)


def test_stream_error_echoing_huge_client_text_is_clipped(channel):
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    # A huge input name, not model name: a stream's error response echoes model_name, which would be 8 MB.
    requests = [_infer_request(input_name="x" * HUGE), _infer_request()]
    responses = list(stub.ModelStreamInfer(iter(requests), timeout=60))
    assert len(responses) == 2 and f"({HUGE} chars)" in responses[0].error_message
    assert len(responses[0].error_message) <= 4096 and not responses[1].error_message


@pytest.mark.parametrize("data", [_nested_groups(200), b"\xff\xff\xff"], ids=["nested-past-the-limit", "corrupt"])
def test_undecodable_request_is_invalid_argument(channel, data):
    call = channel.unary_unary(METHOD + "ModelInfer")  # no serializers: the bytes go as they are
    with pytest.raises(grpc.RpcError) as caught:
        call(data, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "inference.ModelInferRequest" in caught.value.details() and "expected" in caught.value.details()
    _assert_answers(pb_grpc.GRPCInferenceServiceStub(channel))


def test_undecodable_request_to_any_method_is_invalid_argument(channel):
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(METHOD + "ModelReady")(_nested_groups(200), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "inference.ModelReadyRequest" in caught.value.details()


def test_nesting_within_the_limit_is_decoded(channel):
    call = channel.unary_unary(METHOD + "ModelInfer")
    with pytest.raises(grpc.RpcError) as caught:
        call(_nested_groups(50), timeout=30)  # unknown fields are skipped: an empty request, for no model
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()


def test_undecodable_message_on_a_stream_ends_it_with_invalid_argument(channel):
    call = channel.stream_stream(METHOD + "ModelStreamInfer")
    good = _infer_request().SerializeToString()
    responses = call(iter([good, _nested_groups(200), good]), timeout=30)
    first = pb.ModelStreamInferResponse.FromString(next(responses))
    assert not first.error_message
    with pytest.raises(grpc.RpcError) as caught:
        next(responses)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "inference.ModelInferRequest" in caught.value.details()
