"""`serve --workers 2`: two processes share one gRPC port, both answer, each has its metrics port, SIGTERM drains both."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from conftest import require_module
from server_models import sample_input

ROOT = Path(__file__).resolve().parent.parent


def _successes(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    family = next(f for f in text_string_to_metric_families(text) if f.name == "nv_inference_request_success")
    return sum(s.value for s in family.samples)


def test_two_workers_share_the_port_both_answer_and_sigterm_drains_both(tiny_repository):
    import grpc

    from lstm_onnx.protocol.codec import decode_response, encode_request
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    env = dict(os.environ, LSTM_ONNX_LOG_FORMAT="json", LSTM_ONNX_GRACE_PERIOD_S="5")
    proc = subprocess.Popen([sys.executable, "-m", "lstm_onnx", "serve", "--model-repository", str(tiny_repository),
                             "--grpc-port", "0", "--metrics-port", "0", "--http-port", "-1", "--workers", "2",
                             "--executor-threads", "1"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = None
    try:
        deadline = time.monotonic() + 120
        while ready is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if '"msg": "workers serving"' in line:
                ready = json.loads(line)
        assert ready, "workers did not start:\n" + "".join(lines)
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        assert ready["workers"] == 2 and len(set(ready["metrics_ports"])) == 2
        x = sample_input(1, 6, seed=1)
        answers = []
        # The kernel picks a worker per connection: a fresh connection each time (no shared subchannel)
        # until both workers have answered; 2^-31 odds that 32 connections all land on one.
        for _ in range(32):
            with grpc.insecure_channel(ready["grpc"], options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                answers.append(decode_response(stub.ModelInfer(encode_request("tiny_lstm", {"input": x}), timeout=30)))
            counts = [_successes(port) for port in ready["metrics_ports"]]
            if all(counts):
                break
        assert all(counts), f"one worker answered everything: successes per worker {counts}"
        assert sum(counts) == len(answers)
        for answer in answers[1:]:  # same model, same weights: every worker gives the same answer
            np.testing.assert_array_equal(answer["output"], answers[0]["output"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    reader.join(timeout=30)  # the process has exited: its stderr ends, and the reader with it
    assert not reader.is_alive(), "stderr still open after the process exited"
    stopped = [json.loads(line) for line in lines if '"msg": "stopped"' in line]
    assert code == 0, "".join(lines[-20:])
    assert sorted(s["worker"] for s in stopped) == [0, 1], "".join(lines[-20:])


def test_workers_flag_rejects_zero():
    result = subprocess.run([sys.executable, "-m", "lstm_onnx", "serve", "--model-repository", ".", "--workers", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "workers: got 0, expected at least 1" in result.stderr


def test_event_loop_setting_picks_the_loop():
    import asyncio

    from lstm_onnx.server.app import run_event_loop

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_event_loop(loop_module(), "asyncio").startswith("asyncio")


def test_event_loop_setting_picks_uvloop_when_installed():
    import asyncio

    from lstm_onnx.server.app import run_event_loop

    require_module("uvloop", "uvloop is not installed (the serve extra brings it on Linux)")

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_event_loop(loop_module(), "uvloop").startswith("uvloop")
    assert run_event_loop(loop_module(), "auto").startswith("uvloop")


def _metric(metrics_port: int, prefix: str) -> str:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return next((line for line in text.splitlines() if line.startswith(prefix)), "")


def test_a_killed_worker_is_restarted_while_the_others_keep_serving(tiny_repository):
    import queue

    from lstm_onnx.protocol.codec import encode_request

    env = dict(os.environ, LSTM_ONNX_LOG_FORMAT="json", LSTM_ONNX_GRACE_PERIOD_S="5")
    proc = subprocess.Popen([sys.executable, "-m", "lstm_onnx", "serve", "--model-repository", str(tiny_repository),
                             "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "0", "--workers", "2", "--executor-threads", "1"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    seen: list[str] = []

    def wait_for(msg: str) -> dict:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(line)
            if f'"msg": "{msg}"' in line:
                return json.loads(line)
        raise AssertionError(f"no {msg!r} line in the log:\n" + "".join(seen[-20:]))

    try:
        ready = wait_for("workers serving")
        assert ready["limits_per_worker"] == {"max_concurrent_streams": 256, "max_sequences": 1024}
        os.kill(ready["pids"][0], signal.SIGKILL)
        restarted = wait_for("worker restarted")
        assert proc.poll() is None, "the parent exited when one worker was killed"
        assert restarted["worker"] == 0 and restarted["restarts"] == 1 and restarted["pid"] != ready["pids"][0]
        # The other worker served on; both answer now, and the restarted one counts its restart.
        assert _metric(ready["metrics_ports"][1], "lstm_onnx_worker_restarts") == \
            'lstm_onnx_worker_restarts_total{worker="1"} 0.0'
        assert _metric(restarted["metrics_port"], "lstm_onnx_worker_restarts") == \
            'lstm_onnx_worker_restarts_total{worker="0"} 1.0'
        with grpc_channel(ready["grpc"]) as stub:
            stub.ModelInfer(encode_request("tiny_lstm", {"input": sample_input(1, 3)}), timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, "".join(seen[-20:])


class grpc_channel:
    """A stub on a fresh connection (its own subchannel), closed on exit."""

    def __init__(self, url: str):
        import grpc

        from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

        self.channel = grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def __enter__(self):
        return self.stub

    def __exit__(self, *exc) -> None:
        self.channel.close()


def test_stream_and_sequence_limits_are_named_per_worker():
    from lstm_onnx.server.settings import ServerSettings

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(ServerSettings)}
    for name in ("max_concurrent_streams", "max_sequences"):
        assert "per worker" in helps[name] and "over all clients" not in helps[name], f"{name}: {helps[name]!r}"
