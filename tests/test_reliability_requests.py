"""Generated malformed requests: each gets its documented status and a one-line message, and the server keeps serving."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from reliability.fuzz import (
    OK,
    Tally,
    encode,
    generate_bad_requests,
    good_inputs,
    reference_outputs,
    shape_of_repository,
)

from lstm_onnx.protocol import codec
from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

MODEL = "tiny_lstm"
MESSAGE_BYTES = 1 << 20  # small, so that the oversized cases stay cheap
UNARY_CASES = 320
STREAM_CASES = 160


@pytest.fixture(scope="module")
def server(tiny_repository):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, metrics_port=-1, http_port=-1,
                              max_message_bytes=MESSAGE_BYTES, executor_threads=2)
    with BackgroundServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.url, options=[("grpc.max_send_message_length", 4 * MESSAGE_BYTES)])
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def shape(tiny_repository):
    return shape_of_repository(tiny_repository, MODEL, MESSAGE_BYTES)


def _check_good(stub, tiny_repository, shape, rng: np.random.Generator, after: str) -> None:
    inputs = good_inputs(rng, shape)
    response = stub.ModelInfer(encode(MODEL, inputs), timeout=30)
    _compare(codec.decode_response(response), reference_outputs(tiny_repository / MODEL / "1" / "model.onnx",
                                                                 inputs, shape), after)


def _compare(got: dict, want: dict, after: str) -> None:
    assert sorted(got) == sorted(want), f"after {after}: outputs {sorted(got)}, expected {sorted(want)}"
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=f"output {name!r} after {after}")


def _report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n[reliability] {line}")


def test_generated_bad_requests_get_documented_status_and_server_keeps_answering(stub, shape, tiny_repository, capsys):
    cases = generate_bad_requests(shape, UNARY_CASES, seed=1)
    tally, rng = Tally(), np.random.default_rng(0)
    for i, case in enumerate(cases):
        tally.sent[case.kind] += 1
        label = f"case {i} ({case.kind})"
        try:
            stub.ModelInfer(case.request, timeout=30)
            code, details = OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        if code != case.code:
            tally.wrong.append(f"{label}: got {code.name} {details!r}, expected {case.code.name}")
        elif code != OK and (not details.strip() or "\n" in details):
            tally.wrong.append(f"{label}: {code.name} with message {details!r}, expected one non-empty line")
        _check_good(stub, tiny_repository, shape, rng, label)
    _report(capsys, "unary: " + tally.summary())
    assert len(tally.sent) >= 20, f"only {len(tally.sent)} kinds generated"
    assert not tally.wrong, "\n".join(tally.wrong[:20])


def test_generated_bad_requests_on_one_stream_answer_error_message_and_keep_it_open(stub, shape, tiny_repository,
                                                                                       capsys):
    cases = [c for c in generate_bad_requests(shape, STREAM_CASES, seed=2) if c.stream_ok]
    rng = np.random.default_rng(1)
    goods = [good_inputs(rng, shape) for _ in cases]
    requests = []
    for case, inputs in zip(cases, goods):
        requests += [case.request, encode(MODEL, inputs)]
    responses = list(stub.ModelStreamInfer(iter(requests), timeout=120))
    assert len(responses) == len(requests), f"stream answered {len(responses)} of {len(requests)} requests"
    tally = Tally()
    model_path = tiny_repository / MODEL / "1" / "model.onnx"
    for i, (case, inputs) in enumerate(zip(cases, goods)):
        tally.sent[case.kind] += 1
        bad, good = responses[2 * i], responses[2 * i + 1]
        refused = bool(bad.error_message)
        if refused == (case.code == OK) or "\n" in bad.error_message:
            tally.wrong.append(f"case {i} ({case.kind}): error_message {bad.error_message!r}, expected "
                               f"{'none' if case.code == OK else case.code.name}")
        assert not good.error_message, f"good request after case {i} ({case.kind}): {good.error_message}"
        _compare(codec.decode_response(good.infer_response), reference_outputs(model_path, inputs, shape),
                 f"case {i} ({case.kind}) on the stream")
    _report(capsys, "stream: " + tally.summary())
    assert not tally.wrong, "\n".join(tally.wrong[:20])


def test_nan_and_inf_inputs_are_served_as_onnxruntime_computes_them(stub, shape, tiny_repository):
    array = np.ones((2, 4, shape.features), np.float32)
    array[0, 1, 0], array[1, 2, 0] = np.nan, np.inf
    outputs = codec.decode_response(stub.ModelInfer(encode(MODEL, {"input": array}), timeout=30))
    want = reference_outputs(tiny_repository / MODEL / "1" / "model.onnx", {"input": array}, shape)
    for name in want:
        np.testing.assert_array_equal(outputs[name], want[name], err_msg=f"output {name!r}")


def test_zero_length_time_axis_is_refused(stub, shape):
    """onnxruntime's LSTM returns uninitialised memory as hn/cn for T = 0, so the server must not run it."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(encode(MODEL, {"input": np.zeros((2, 0, shape.features), np.float32)}), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'input'" in caught.value.details() and "[2, 0, " in caught.value.details()
