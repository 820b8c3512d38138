"""Abandoned work on the real server: a cancelled or deadline-passed request leaves the queue at once and never
runs; a run whose requests are all abandoned is stopped (RunOptions.terminate); both are counted."""
from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_models import Gate, sample_input

MODEL = "tiny_lstm"


# LONG's run is estimated at 1.3 GB, above the default run memory budget: these tests raise it to run it.
BUDGET = {"max_run_memory_bytes": 2 << 30}


def _start(repo, **overrides):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    return BackgroundServer(ServerSettings(model_repository=str(repo), grpc_port=0, http_port=-1, metrics_port=0, **overrides))


@pytest.fixture(scope="module")
def server(tiny_repository):
    with _start(tiny_repository, **BUDGET) as srv:
        yield srv


@pytest.fixture
def stub(server):
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _request(x):
    from lstm_onnx.protocol.codec import encode_request

    return encode_request(MODEL, {"input": x})


def _counters(srv):
    return srv.running.scheduler.metrics.counters(MODEL, "1")


def _executed_rows(srv) -> int:
    c = _counters(srv)
    return sum(rows * runs for rows, runs in c.batch_sizes.items())


def _until(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s:g} s for {what}"
        time.sleep(0.002)


async def _noop() -> None:
    return None


def test_requests_past_their_deadline_leave_the_queue_at_once_and_never_run(server, stub):
    gate = Gate(server.running.repository.get(MODEL).resolve("").runtime)
    try:
        marked = sample_input(1, 5, seed=1)
        marked[0, 0, 0] = 7.0
        held = stub.ModelInfer.future(_request(marked), timeout=60)
        assert gate.held.wait(30), "the first request never reached onnxruntime"
        before = _executed_rows(server)
        failed_before = _counters(server).failure_reasons["CANCELED"]
        doomed = [stub.ModelInfer.future(_request(sample_input(1, 3, seed=i)), timeout=0.3) for i in range(10)]
        codes = [call.exception().code() if call.exception() else "OK" for call in doomed]
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 10, codes
        _until(lambda: server.running.scheduler.in_flight <= 1, "the abandoned requests to leave the server")
        server.call(_noop())
        queued = sum(len(b._queue) for b in server.running.scheduler._batchers.values())
        assert queued == 0, f"queue after every waiting client gave up: got {queued} requests, expected 0"
        gate.release.set()
        held.result(timeout=30)
        server.call(_noop())
        ran = _executed_rows(server) - before
        assert ran == 1, f"rows run after the 10 abandoned requests: got {ran}, expected 1 (the held request's)"
        canceled = _counters(server).failure_reasons["CANCELED"] - failed_before
        assert canceled == 10, f"failures with reason CANCELED: got {canceled}, expected 10"
    finally:
        gate.close()


class _Entered:
    """Sets `event` when a run with more than `rows` rows enters onnxruntime."""

    def __init__(self, runtime, rows: int):
        self.runtime, self.original, self.event = runtime, runtime.predict, threading.Event()

        def predict(inputs, *args, **kwargs):
            if inputs["input"].shape[0] >= rows:
                self.event.set()
            return self.original(inputs, *args, **kwargs)

        runtime.predict = predict

    def close(self) -> None:
        self.runtime.predict = self.original


LONG = (16, 400_000)  # about 2.5 s on 2 cores (each layer ~1.2 s): the abandon reaches it while it runs


def _assert_run_stopped(srv, stub, call_ended, exec_before: int, stopped_before: int) -> None:
    _until(lambda: _counters(srv).exec_stopped > stopped_before or _counters(srv).exec_count > exec_before,
           "the abandoned run to stop or finish")
    c = _counters(srv)
    assert (c.exec_stopped - stopped_before, c.exec_count - exec_before) == (1, 0), (
        f"(runs stopped, runs completed) after every request of a run was abandoned: got "
        f"{(c.exec_stopped - stopped_before, c.exec_count - exec_before)}, expected (1, 0)")
    # The model is free again: a small request is answered.
    stub.ModelInfer(_request(sample_input(1, 2)), timeout=30)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_run_whose_requests_are_all_abandoned_is_stopped(server, stub, how):
    runtime = server.running.repository.get(MODEL).resolve("").runtime
    entered = _Entered(runtime, LONG[0])
    try:
        c = _counters(server)
        exec_before, stopped_before = c.exec_count, c.exec_stopped
        x = np.random.default_rng(0).standard_normal((*LONG, 1)).astype(np.float32)
        call = stub.ModelInfer.future(_request(x), timeout=60 if how == "cancel" else 1.0)
        assert entered.event.wait(60), "the long request never reached onnxruntime"
        if how == "cancel":
            call.cancel()
        else:
            assert call.exception(timeout=60).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _assert_run_stopped(server, stub, call, exec_before, stopped_before)
    finally:
        entered.close()


def test_request_timeout_setting_frees_the_model_and_is_counted(tiny_repository):
    from lstm_onnx.protos import grpc_service_pb2 as pb
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    with _start(tiny_repository, request_timeout_s=0.5, **BUDGET) as srv, grpc.insecure_channel(srv.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        x = np.random.default_rng(0).standard_normal((*LONG, 1)).astype(np.float32)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(_request(x), timeout=60)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "request_timeout_s" in caught.value.details()
        _assert_run_stopped(srv, stub, None, 0, 0)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL), timeout=10).model_stats[0]
        assert stats.inference_stats.fail.count == 1, f"failures in ModelStatistics: got {stats.inference_stats.fail.count}"
        assert stats.execution_count == 1, "the stopped run must not count as an execution"
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.running.metrics_port}/metrics", timeout=10).read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        model = (("model", MODEL), ("version", "1"))
        assert samples[("nv_inference_request_failure_total", (model[0], ("reason", "CANCELED"), model[1]))] == 1, text
        assert samples[("nv_inference_request_failure_total", (model[0], ("reason", "BACKEND"), model[1]))] == 0, text
        assert samples[("lstm_onnx_exec_stopped_total", model)] == 1, text
