"""ModelInfer on the real server: every datatype, typed and raw contents, output selection, zero state, bad requests."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from server_models import ONNX_TYPES, build_repository, sample_input

from lstm_onnx.client.loadgen import reference_outputs


@pytest.fixture(scope="module")
def server(tiny_repository, tmp_path_factory):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    repo = build_repository(tiny_repository, tmp_path_factory.mktemp("infer") / "repo")
    with BackgroundServer(ServerSettings(model_repository=str(repo), grpc_port=0, metrics_port=-1, http_port=-1,
                                         exit_on_error="false")) as srv:
        srv.repo = repo
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _triton_input(name, array, datatype=None):
    import tritonclient.grpc as tc

    tensor = tc.InferInput(name, list(array.shape), datatype or _v2(array))
    tensor.set_data_from_numpy(array)
    return tensor


def _v2(array):
    from lstm_onnx.protocol.datatypes import datatype_of_numpy

    return datatype_of_numpy(array.dtype)


def _direct(server, model, feeds):
    session = ort.InferenceSession(str(server.repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.parametrize("datatype", list(ONNX_TYPES))
def test_every_datatype_round_trips_through_tritonclient(triton, datatype):
    from lstm_onnx.protocol.datatypes import numpy_of

    rng = np.random.default_rng(1)
    x = (rng.integers(0, 2, (2, 3)) if datatype == "BOOL" else rng.integers(-5, 5, (2, 3))).astype(numpy_of(datatype))
    result = triton.infer(f"identity_{datatype.lower()}", [_triton_input("x", x, datatype)])
    np.testing.assert_array_equal(result.as_numpy("y"), x)
    expected = np.logical_not(x) if datatype == "BOOL" else x + x
    np.testing.assert_array_equal(result.as_numpy("z"), expected)
    assert result.get_output("y").datatype == datatype


def test_lstm_outputs_match_onnxruntime_and_omitted_state_is_zeros(server, triton):
    x = sample_input(3, 7)
    result = triton.infer("tiny_lstm", [_triton_input("input", x)])
    zeros = np.zeros((3, 2, 8), np.float32)
    direct = _direct(server, "tiny_lstm", {"input": x, "h0": zeros, "c0": zeros})
    for name in ("output", "hn", "cn"):
        np.testing.assert_array_equal(result.as_numpy(name), direct[name])


def test_requested_outputs_come_back_in_the_order_asked(triton):
    import tritonclient.grpc as tc

    outputs = [tc.InferRequestedOutput("cn"), tc.InferRequestedOutput("output")]
    result = triton.infer("tiny_lstm", [_triton_input("input", sample_input(1, 4))], outputs=outputs)
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["cn", "output"]
    assert len(response.raw_output_contents) == 2


def test_typed_contents_give_the_same_answer_as_raw(server, stub):
    from lstm_onnx.protocol.codec import decode_response, encode_request
    from lstm_onnx.protos import grpc_service_pb2 as pb

    x = sample_input(2, 5)
    raw = decode_response(stub.ModelInfer(encode_request("tiny_gru", {"input": x})))
    request = pb.ModelInferRequest(model_name="tiny_gru")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    typed = decode_response(stub.ModelInfer(request))
    np.testing.assert_array_equal(typed["output"], raw["output"])
    assert len(stub.ModelInfer(request).raw_output_contents) == 2  # outputs always raw


def _code(stub, request):
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    return info.value.code(), info.value.details()


def test_malformed_requests_get_fitting_codes_and_clear_messages(stub):
    from lstm_onnx.protocol.codec import encode_request
    from lstm_onnx.protos import grpc_service_pb2 as pb

    x = sample_input(2, 5)
    code, msg = _code(stub, encode_request("tiny_lstm", {"input": x[:, :, :1].repeat(3, axis=2)}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg == "input 'input': got shape [2, 5, 3], expected [?, ?, 1]"
    code, msg = _code(stub, encode_request("tiny_lstm", {"input": x.astype(np.float64)}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg == "input 'input': got datatype FP64, expected FP32"
    code, msg = _code(stub, encode_request("tiny_lstm", {"inptu": x}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no input 'inptu'" in msg
    code, msg = _code(stub, encode_request("missing_model", {"input": x}))
    assert code == grpc.StatusCode.NOT_FOUND and "missing_model" in msg
    code, msg = _code(stub, encode_request("tiny_lstm", {"input": x}, outputs=["nope"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "requested output 'nope'" in msg
    code, msg = _code(stub, encode_request("tiny_lstm", {"input": sample_input(500, 2)}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "batch size 500" in msg
    code, _ = _code(stub, encode_request("broken", {"x": x}))
    assert code == grpc.StatusCode.UNAVAILABLE

    mixed = encode_request("tiny_lstm", {"input": x})
    extra = mixed.inputs.add(name="h0", datatype="FP32", shape=[2, 2, 8])
    extra.contents.fp32_contents.extend([0.0] * 32)
    code, msg = _code(stub, mixed)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "mixes raw_input_contents" in msg

    short = encode_request("tiny_lstm", {"input": x})
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    code, msg = _code(stub, short)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "got 36 bytes, expected 40" in msg

    bad_type = encode_request("tiny_lstm", {"input": x})
    bad_type.inputs[0].datatype = "FP8"
    code, msg = _code(stub, bad_type)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'FP8' is not supported" in msg

    bad_param = encode_request("tiny_lstm", {"input": x})
    bad_param.parameters["sequence_id"].double_param = 1.5
    code, _ = _code(stub, bad_param)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # After all that, the server still answers.
    assert stub.ServerLive(pb.ServerLiveRequest()).live


def test_large_batch_of_long_sequences_fits_the_message_limit(server, stub):
    from lstm_onnx.protocol.codec import decode_response, encode_request

    x = sample_input(8, 150_000)  # 4.8 MB: over gRPC's 4 MiB default
    out = decode_response(stub.ModelInfer(encode_request("tiny_gru", {"input": x}, outputs=["output"]),
                                          timeout=120))
    want = reference_outputs(server.repo / "tiny_gru" / "1" / "model.onnx", {"input": x})["output"]
    np.testing.assert_allclose(out["output"], want, atol=1e-5, rtol=0)


def test_async_triton_client_works_unchanged(server):
    import tritonclient.grpc.aio as tca

    async def main():
        client = tca.InferenceServerClient(server.url)
        try:
            x = sample_input(1, 3)
            import tritonclient.grpc as tc

            tensor = tc.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = await client.infer("tiny_lstm", [tensor])
            return x, result.as_numpy("output")
        finally:
            await client.close()

    x, got = asyncio.run(main())
    want = reference_outputs(server.repo / "tiny_lstm" / "1" / "model.onnx", {"input": x})["output"]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
