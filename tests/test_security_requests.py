"""Hostile request bytes: client text echoed into an error is clipped so the status still fits gRPC's metadata limit."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from server_models import write_identity_model

from lstm_onnx.protos import grpc_service_pb2 as pb
from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

HUGE = 8_000_000  # characters: far past gRPC's 16 KiB hard limit on metadata, where a status message travels


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
