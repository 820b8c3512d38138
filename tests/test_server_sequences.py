"""Stateful sequences on the real server: chunked equals whole, over ModelInfer and streams; errors, eviction, bound."""
from __future__ import annotations

import queue
import time

import grpc
import numpy as np
import pytest
from server_models import MARK, Gate, sample_input


def _start(repo, **overrides):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    return BackgroundServer(ServerSettings(model_repository=str(repo), grpc_port=0,
                                           metrics_port=-1, http_port=-1, **overrides))


@pytest.fixture(scope="module")
def server(tiny_repository):
    with _start(tiny_repository) as srv:
        yield srv


@pytest.mark.parametrize("model", ["tiny_lstm", "tiny_gru"])
def test_chunked_sequence_over_model_infer_equals_whole(server, model):
    from lstm_onnx.client.client import InferenceClient, split_time
    from lstm_onnx.server.sequences import SequenceControl

    x = sample_input(2, 23, seed=3)
    with InferenceClient(server.url) as client:
        whole = client.infer(model, {"input": x})
        chunks = split_time(x, 5)
        for i, chunk in enumerate(chunks):
            control = SequenceControl(f"seq-{model}", start=i == 0, end=i == len(chunks) - 1)
            last = client.infer(model, {"input": chunk}, sequence=control)
    for name in whole:
        np.testing.assert_allclose(last[name], whole[name], atol=1e-5, rtol=0)


def test_chunked_sequence_over_our_stream_equals_whole(server):
    from lstm_onnx.client.client import InferenceClient, split_time

    x = sample_input(1, 17, seed=4)
    with InferenceClient(server.url) as client:
        whole = client.infer("tiny_lstm", {"input": x})
        results = list(client.stream_sequence("tiny_lstm", [{"input": c} for c in split_time(x, 4)], 77))
    assert len(results) == 5
    np.testing.assert_allclose(results[-1]["output"], whole["output"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(results[-1]["cn"], whole["cn"], atol=1e-5, rtol=0)


def test_tritonclient_stream_with_sequence_ids_and_an_error_that_keeps_the_stream_open(server):
    import tritonclient.grpc as tc

    x = sample_input(1, 12, seed=5)
    answers: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(server.url)
    whole_in = tc.InferInput("input", list(x.shape), "FP32")
    whole_in.set_data_from_numpy(x)
    whole = client.infer("tiny_lstm", [whole_in]).as_numpy("output")
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        unknown = tc.InferInput("input", [1, 4, 1], "FP32")
        unknown.set_data_from_numpy(x[:, :4])
        client.async_stream_infer("tiny_lstm", [unknown], sequence_id=999, sequence_start=False)
        for i in range(3):
            chunk = tc.InferInput("input", [1, 4, 1], "FP32")
            chunk.set_data_from_numpy(np.ascontiguousarray(x[:, 4 * i:4 * i + 4]))
            client.async_stream_infer("tiny_lstm", [chunk], sequence_id=42, sequence_start=i == 0,
                                      sequence_end=i == 2)
        got = [answers.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
        client.close()
    assert got[0][0] is None and "sequence 999" in str(got[0][1]) and "sequence_start" in str(got[0][1])
    assert all(error is None for _, error in got[1:])
    np.testing.assert_allclose(got[-1][0].as_numpy("output"), whole, atol=1e-5, rtol=0)


def test_unknown_sequence_without_start_is_invalid_argument(server):
    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.server.sequences import SequenceControl

    with InferenceClient(server.url) as client:
        with pytest.raises(ClientError) as info:
            client.infer("tiny_gru", {"input": sample_input(1, 3)}, sequence=SequenceControl(12345))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        # An ended sequence is unknown again.
        client.infer("tiny_gru", {"input": sample_input(1, 3)}, sequence=SequenceControl(5, start=True, end=True))
        with pytest.raises(ClientError):
            client.infer("tiny_gru", {"input": sample_input(1, 3)}, sequence=SequenceControl(5))


def test_idle_sequences_are_evicted_and_live_ones_bounded(tiny_run_dir, tmp_path):
    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.export.repository import export_to_repository
    from lstm_onnx.server.sequences import SequenceControl

    # A stateless config gives no idle timeout, so the server's setting applies (sequence_batching's would win).
    export_to_repository(tiny_run_dir, tmp_path, name="tiny_lstm", config_style="stateless")
    x = sample_input(1, 3)
    with _start(tmp_path, sequence_idle_timeout_s=0.3, max_sequences=2, max_sequences_per_client=2) as srv:
        with InferenceClient(srv.url) as client:
            client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(1, start=True))
            client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(2, start=True))
            with pytest.raises(ClientError) as info:
                client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(3, start=True))
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit is 2" in str(info.value)
            client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(1))  # still live
            deadline = time.monotonic() + 10
            while len(srv.running.scheduler.sequences) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(srv.running.scheduler.sequences) == 0
            with pytest.raises(ClientError) as info:
                client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(1))
            assert "evicted" in str(info.value)
            client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(3, start=True))  # room again


def test_sequence_id_on_a_stateless_model_is_refused(tmp_path):
    from server_models import write_identity_model

    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.server.sequences import SequenceControl

    write_identity_model(tmp_path / "plain" / "1" / "model.onnx", "FP32")
    with _start(tmp_path) as srv, InferenceClient(srv.url) as client:
        with pytest.raises(ClientError) as info:
            client.infer("plain", {"x": np.ones((1, 3), np.float32)}, sequence=SequenceControl(1, start=True))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no recurrent state" in str(info.value)


def test_bidirectional_model_takes_a_sequence_only_whole(make_run_dir, tmp_path):
    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.client.loadgen import reference_outputs
    from lstm_onnx.export.repository import export_to_repository
    from lstm_onnx.server.sequences import SequenceControl

    export_to_repository(make_run_dir(bidirectional=True), tmp_path, name="bi")
    x = sample_input(1, 9, seed=2)
    with _start(tmp_path) as srv, InferenceClient(srv.url) as client:
        whole = client.infer("bi", {"input": x})
        one = client.infer("bi", {"input": x}, sequence=SequenceControl(7, start=True, end=True))
        np.testing.assert_array_equal(one["output"], whole["output"])
        with pytest.raises(ClientError) as info:
            client.infer("bi", {"input": x[:, :4]}, sequence=SequenceControl(8, start=True))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "bidirectional" in str(info.value)
        np.testing.assert_array_equal(client.infer("bi", {"input": x})["output"], whole["output"])
    want = reference_outputs(tmp_path / "bi" / "1" / "model.onnx", {"input": x})["output"]
    np.testing.assert_allclose(whole["output"], want, atol=1e-6, rtol=0)


# --- Races: a step runs on exactly its predecessor's state, or is refused with the reason -----------------------

@pytest.fixture
def gate(server):
    g = Gate(server.running.repository.get("tiny_lstm").resolve("").runtime)
    yield g
    g.close()


def _marked(seed: int, time_steps: int = 5) -> np.ndarray:
    x = sample_input(1, time_steps, seed=seed)
    x[0, 0, 0] = MARK
    return x


def _request(x, request_id: str, sequence_id=11, start=False, end=False):
    from lstm_onnx.protocol.codec import SequenceControl, encode_request

    return encode_request("tiny_lstm", {"input": x}, sequence=SequenceControl(sequence_id, start, end),
                          request_id=request_id)


def _wait_in_flight(srv, want: int, at_most: bool = False) -> None:
    """Until the server holds `want` requests (each past its arrival in the sequence store), or no more."""
    deadline = time.monotonic() + 30
    while srv.running.scheduler.in_flight > want if at_most else srv.running.scheduler.in_flight != want:
        assert time.monotonic() < deadline, f"requests in flight: got {srv.running.scheduler.in_flight}, expected {want}"
        time.sleep(0.001)
    srv.call(_noop())  # the loop has finished the step in which the last one arrived


async def _noop() -> None:
    return None


def _send(stub, request, via: str, timeout: float = 30):
    """One request over ModelInfer or alone on a fresh ModelStreamInfer; the response or the grpc.RpcError /
    stream error message."""
    from lstm_onnx.protos import grpc_service_pb2 as pb

    try:
        if via == "unary":
            return stub.ModelInfer(request, timeout=timeout)
        response = next(iter(stub.ModelStreamInfer(iter([request]), timeout=timeout)))
    except grpc.RpcError as exc:
        return exc
    if response.error_message:
        return RuntimeError(response.error_message)
    assert isinstance(response.infer_response, pb.ModelInferResponse)
    return response.infer_response


def _fresh(stub, x) -> dict[str, np.ndarray]:
    from lstm_onnx.protocol.codec import decode_response, encode_request

    return decode_response(stub.ModelInfer(encode_request("tiny_lstm", {"input": x}), timeout=30))


def _assert_answer(response, want: dict[str, np.ndarray], what: str) -> None:
    from lstm_onnx.protocol.codec import decode_response

    assert not isinstance(response, Exception), f"{what}: got {response!r}, expected an answer"
    got = decode_response(response)
    for name in ("output", "hn", "cn"):
        diff = float(np.max(np.abs(got[name] - want[name])))
        assert diff <= 1e-5, f"{what}: output {name!r} differs from a fresh run by {diff:.3g}, expected <= 1e-5"


@pytest.fixture
def stub(server):
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _in_thread(fn, *args):
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


def test_start_on_a_live_id_waits_for_its_running_step_then_starts_fresh(server, gate, stub):
    a, b, c = sample_input(1, 4, seed=20), _marked(21), sample_input(1, 3, seed=22)
    assert not isinstance(_send(stub, _request(a, "A", start=True), "unary"), Exception)
    running = _in_thread(_send, stub, _request(b, "B"), "unary")
    assert gate.held.wait(30), "step B never reached onnxruntime"
    restart = _in_thread(_send, stub, _request(c, "C", start=True), "unary")
    _wait_in_flight(server, 2)
    gate.release.set()
    _assert_answer(running.result(30), _fresh(stub, np.concatenate([a, b], axis=1)), "B (running when C restarted)")
    _assert_answer(restart.result(30), _fresh(stub, c), "C (a sequence_start on the live id)")


@pytest.mark.parametrize("via", ["unary", "stream"])
def test_two_concurrent_starts_on_one_id_each_start_fresh(server, gate, stub, via):
    first, second = _marked(30), sample_input(1, 6, seed=31)
    one = _in_thread(_send, stub, _request(first, "S1", sequence_id=12, start=True), via)
    assert gate.held.wait(30), "the first start never reached onnxruntime"
    two = _in_thread(_send, stub, _request(second, "S2", sequence_id=12, start=True), via)
    _wait_in_flight(server, 2)
    gate.release.set()
    _assert_answer(one.result(30), _fresh(stub, first), "the first start")
    _assert_answer(two.result(30), _fresh(stub, second), "the second start (it must not continue the first)")


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_step_behind_a_cancelled_step_is_aborted_never_run_on_the_older_state(server, gate, stub, how):
    a, b, c = sample_input(1, 4, seed=40), _marked(41), sample_input(1, 3, seed=42)
    assert not isinstance(_send(stub, _request(a, "A", sequence_id=13, start=True), "unary"), Exception)
    if how == "cancel":
        doomed = stub.ModelInfer.future(_request(b, "B", sequence_id=13), timeout=30)
    else:
        doomed = _in_thread(_send, stub, _request(b, "B", sequence_id=13), "unary", 0.5)
    assert gate.held.wait(30), "step B never reached onnxruntime"
    behind = _in_thread(_send, stub, _request(c, "C", sequence_id=13), "unary")
    _wait_in_flight(server, 2)
    if how == "cancel":
        doomed.cancel()
    else:
        assert doomed.result(30).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_in_flight(server, 1, at_most=True)  # B abandoned on the server
    gate.release.set()
    refused = behind.result(30)
    assert isinstance(refused, grpc.RpcError), f"C: got an answer {refused!r}, expected ABORTED (B never applied)"
    assert refused.code() == grpc.StatusCode.ABORTED, f"C: got {refused.code()}, expected ABORTED"
    assert "'B'" in refused.details() and "before it was applied" in refused.details(), refused.details()
    after = _send(stub, _request(c, "D", sequence_id=13), "unary")  # the sequence stays aborted, saying why
    assert isinstance(after, grpc.RpcError) and after.code() == grpc.StatusCode.ABORTED, after
    _assert_answer(_send(stub, _request(c, "E", sequence_id=13, start=True), "unary"), _fresh(stub, c),
                   "a new start after the abort")


def test_step_behind_sequence_end_is_refused_with_failed_precondition(server, gate, stub):
    a, b, c = sample_input(1, 4, seed=50), _marked(51), sample_input(1, 3, seed=52)
    assert not isinstance(_send(stub, _request(a, "A", sequence_id=14, start=True), "unary"), Exception)
    ending = _in_thread(_send, stub, _request(b, "B", sequence_id=14, end=True), "unary")
    assert gate.held.wait(30), "step B never reached onnxruntime"
    behind = _in_thread(_send, stub, _request(c, "C", sequence_id=14), "unary")
    _wait_in_flight(server, 2)
    gate.release.set()
    _assert_answer(ending.result(30), _fresh(stub, np.concatenate([a, b], axis=1)), "B (the sequence_end)")
    refused = behind.result(30)
    assert isinstance(refused, grpc.RpcError), f"C: got an answer {refused!r}, expected FAILED_PRECONDITION"
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION, f"C: got {refused.code()}"
    assert "ended by step 2 (request 'B')" in refused.details(), refused.details()
    assert ("tiny_lstm", 14) not in server.running.scheduler.sequences, "the ended sequence is still held"


def test_answers_say_which_step_they_are_and_what_they_continued(stub):
    from lstm_onnx.protocol.codec import decode_sequence_step

    x = sample_input(1, 6, seed=60)
    steps = [decode_sequence_step(_send(stub, _request(x[:, i:i + 2], f"r{i}", sequence_id="named", start=i == 0,
                                                       end=i == 2), "stream")) for i in range(3)]
    assert steps == [(1, ""), (2, "r0"), (3, "r1")]


@pytest.mark.parametrize("via", ["unary", "stream"])
def test_start_on_a_live_idle_id_runs_on_zeros_not_the_old_state(server, stub, via):
    """A sequence_start on an id that is live and idle (its last step applied, not ended) starts from zeros."""
    a, b = sample_input(1, 4, seed=70), sample_input(1, 3, seed=71)
    sequence_id = f"restart-{via}"
    assert not isinstance(_send(stub, _request(a, "A", sequence_id=sequence_id, start=True), via), Exception)
    assert ("tiny_lstm", sequence_id) in server.running.scheduler.sequences, "the first start left no live sequence"
    _assert_answer(_send(stub, _request(b, "B", sequence_id=sequence_id, start=True), via), _fresh(stub, b),
                   "B (a sequence_start on the live, idle id)")
    continued = np.concatenate([b, a], axis=1)  # and the restarted sequence goes on from B's state, not A's
    _assert_answer(_send(stub, _request(a, "C", sequence_id=sequence_id, end=True), via), _fresh(stub, continued),
                   "C (the step after the restart)")
