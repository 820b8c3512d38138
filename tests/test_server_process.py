"""The server as a process: no torch imported, `lstm-onnx serve` drains on SIGTERM, `infer` and `stream` CLIs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from server_models import sample_input

ROOT = Path(__file__).resolve().parent.parent


def test_server_package_never_imports_torch():
    code = ("import sys, importlib, pkgutil\n"
            "import lstm_onnx.server as server\n"
            "for m in pkgutil.iter_modules(server.__path__): importlib.import_module('lstm_onnx.server.' + m.name)\n"
            "bad = [m for m in ('torch', 'lstm_onnx.model', 'lstm_onnx.export', 'model', 'export') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def _serve(repo: Path, *extra: str) -> tuple[subprocess.Popen, str, list[str], int | None]:
    env = dict(os.environ, LSTM_ONNX_GRACE_PERIOD_S="20", LSTM_ONNX_LOG_FORMAT="json")
    proc = subprocess.Popen([sys.executable, "-m", "lstm_onnx", "serve", "--model-repository", str(repo),
                             "--grpc-port", "0", "--metrics-port", "0", "--http-port", "-1", *extra],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    url, metrics_port = None, None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and url is None:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if '"msg": "serving"' in line:
            url, metrics_port = json.loads(line)["grpc"], json.loads(line)["metrics_port"]
    assert url, "server did not start:\n" + "".join(lines)
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, url, lines, metrics_port


def _pending(metrics_port: int) -> int:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    family = next(f for f in text_string_to_metric_families(text) if f.name == "nv_inference_pending_request_count")
    return int(sum(s.value for s in family.samples))


def test_sigterm_drains_in_flight_requests_then_exits(tiny_repository):
    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.client.loadgen import reference_outputs

    big = sample_input(64, 30_000)
    proc, url, lines, metrics_port = _serve(tiny_repository)
    try:
        results: dict = {}

        def slow_request():
            with InferenceClient(url) as client:
                try:
                    results["out"] = client.infer("tiny_gru", {"input": big}, outputs=["output"])
                except ClientError as exc:
                    results["error"] = exc

        worker = threading.Thread(target=slow_request)
        worker.start()
        deadline = time.monotonic() + 60
        while not _pending(metrics_port) and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)  # signal only once the request is in flight on the server
        assert worker.is_alive(), "the request finished before the signal; make it longer"
        proc.send_signal(signal.SIGTERM)
        worker.join(timeout=60)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "error" not in results, results.get("error")
    want = reference_outputs(tiny_repository / "tiny_gru" / "1" / "model.onnx", {"input": big})["output"]
    np.testing.assert_allclose(results["out"]["output"], want, atol=1e-5, rtol=0)
    events = [json.loads(l)["msg"] for l in lines if l.startswith("{")]
    assert "signal received" in events and "draining" in events and events[-1] == "stopped"
    with InferenceClient(url, timeout_s=5) as client:  # and it is gone
        with pytest.raises(ClientError):
            client.ready()


def test_draining_server_refuses_new_requests_with_unavailable(tiny_repository):
    import grpc

    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    with BackgroundServer(ServerSettings(model_repository=str(tiny_repository), grpc_port=0,
                                         metrics_port=-1, http_port=-1)) as srv:
        srv.running.scheduler.draining = True
        with InferenceClient(srv.url) as client:
            with pytest.raises(ClientError) as info:
                client.infer("tiny_lstm", {"input": sample_input(1, 2)})
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in str(info.value)
            assert not client.ready()
        srv.running.scheduler.draining = False


def test_infer_and_stream_commands_print_outputs(tiny_repository, tmp_path):
    x = sample_input(1, 10, seed=9)
    np.save(tmp_path / "x.npy", x)
    proc, url, _, _ = _serve(tiny_repository)
    try:
        def cli(*args):
            return subprocess.run([sys.executable, "-m", "lstm_onnx", *args], cwd=ROOT, capture_output=True,
                                  text=True, timeout=120)

        whole = cli("infer", "--url", url, "--model", "tiny_lstm", "--input", str(tmp_path / "x.npy"), "--json")
        assert whole.returncode == 0, whole.stderr
        whole_out = np.array(json.loads(whole.stdout)["outputs"]["output"]["data"])
        stream = cli("stream", "--url", url, "--model", "tiny_lstm", "--input", str(tmp_path / "x.npy"),
                     "--chunk", "3", "--json")
        assert stream.returncode == 0, stream.stderr
        chunks = [json.loads(l) for l in stream.stdout.splitlines()]
        assert [c["steps"] for c in chunks] == [3, 3, 3, 1]
        np.testing.assert_allclose(np.array(chunks[-1]["outputs"]["output"]["data"]), whole_out, atol=1e-5)
        rand = cli("infer", "--url", url, "--model", "tiny_gru", "--random", "2,5")
        assert rand.returncode == 0, rand.stderr
        rows = [line for line in rand.stdout.splitlines() if line.startswith("row ")]
        assert len(rows) == 2 and all("probability" in r and "softmax over 4 logits" in r for r in rows), rand.stdout
        text = cli("infer", "--url", url, "--model", "tiny_lstm", "--input", str(tmp_path / "x.npy"))
        probs = np.exp(whole_out - whole_out.max()) / np.exp(whole_out - whole_out.max()).sum()
        assert f"row 0: class {int(probs.argmax())}, probability {probs.max():.3f}" in text.stdout, text.stdout
        assert "hn [1, 2, 8]" in text.stdout and "not shown" in text.stdout
        streamed = cli("stream", "--url", url, "--model", "tiny_lstm", "--input", str(tmp_path / "x.npy"), "--chunk", "3")
        assert "streamed in 4 chunks vs the whole sequence in one request: max |difference| output " in streamed.stdout
        bad = cli("infer", "--url", url, "--model", "nope", "--random", "2,5")
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and len(bad.stderr.splitlines()) == 1
        usage = cli("infer", "--url", url, "--model", "tiny_gru", "--random", "2")
        assert usage.returncode == 2 and "--random" in usage.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_serve_reports_a_missing_repository_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lstm_onnx", "serve", "--model-repository", str(tmp_path / "none"),
                             "--grpc-port", "0", "--metrics-port", "-1", "--http-port", "-1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a directory" in result.stderr.splitlines()[-1]


def test_settings_come_from_env_and_flags_override():
    import argparse

    from lstm_onnx.server.settings import add_arguments, load_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {"LSTM_ONNX_MODEL_REPOSITORY": "/r", "LSTM_ONNX_GRPC_PORT": "9001", "LSTM_ONNX_MAX_SEQUENCES": "5"}
    settings = load_settings(parser.parse_args(["--grpc-port", "9100"]), env)
    assert (settings.model_repository, settings.grpc_port, settings.max_sequences) == ("/r", 9100, 5)
    assert settings.max_message_bytes >= 64 * 1024 * 1024 and settings.host == "127.0.0.1"
    with pytest.raises(ValueError, match="LSTM_ONNX_GRPC_PORT: got 'x', expected int"):
        load_settings(None, {"LSTM_ONNX_GRPC_PORT": "x", "LSTM_ONNX_MODEL_REPOSITORY": "/r"})
    with pytest.raises(ValueError, match="provider"):
        load_settings(None, {"LSTM_ONNX_PROVIDER": "tpu", "LSTM_ONNX_MODEL_REPOSITORY": "/r"})
    # The server's own batching defaults have the same ranges as config.pbtxt's values.
    with pytest.raises(ValueError, match="max_queue_delay_us: got 18446744073709551615, expected at most 10000000"):
        load_settings(parser.parse_args(["--max-queue-delay-us", str(2 ** 64 - 1)]), {"LSTM_ONNX_MODEL_REPOSITORY": "/r"})
    with pytest.raises(ValueError, match="max_batch_size: got 2147483647, expected at most 65536"):
        load_settings(parser.parse_args(["--max-batch-size", "2147483647"]), {"LSTM_ONNX_MODEL_REPOSITORY": "/r"})


def test_drain_answers_or_refuses_every_request_on_streams_that_keep_sending(tiny_repository, caplog):
    """20 streams keep sending through a drain: each request is answered, or its stream ends with UNAVAILABLE
    'shutting down' (nothing cut), and the log's counts agree with what the clients saw."""
    import asyncio
    import logging

    import grpc

    from lstm_onnx.protocol.codec import encode_request
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    streams = 20
    request = encode_request("tiny_lstm", {"input": sample_input(1, 3)})
    srv = BackgroundServer(ServerSettings(model_repository=str(tiny_repository), grpc_port=0, http_port=-1, metrics_port=-1))
    srv.__enter__()
    running = srv.running
    outcomes: list[tuple[int, int, grpc.StatusCode, str]] = []

    async def client(stub, started: asyncio.Event, count: list) -> None:
        call = stub.ModelStreamInfer(timeout=60)
        sent = answered = 0
        try:
            while True:
                await call.write(request)
                sent += 1
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                answered += 1
                count[0] += 1
                if count[0] >= 3 * streams:
                    started.set()  # every stream is busy: drain now
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        outcomes.append((sent, answered, await call.code(), await call.details()))

    async def main() -> None:
        async with grpc.aio.insecure_channel(srv.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            started, count = asyncio.Event(), [0]
            clients = [asyncio.ensure_future(client(stub, started, count)) for _ in range(streams)]
            await started.wait()
            stop = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(running.stop(grace=20), srv.loop))
            await asyncio.gather(*clients)
            await stop

    caplog.set_level(logging.INFO, logger="lstm_onnx")
    try:
        asyncio.run(main())
    finally:
        srv.running = None  # stopped above
        srv.__exit__(None, None, None)
    assert len(outcomes) == streams
    for sent, answered, code, details in outcomes:
        if sent == answered and code == grpc.StatusCode.INTERNAL and details == "Internal error from Core":
            # The client's next write lost the race with the server's status: grpc.aio then overwrites the status
            # it received with this one (grpc/grpc#36066, fix open as #43486). The server's side is counted below
            # (streams_closed): it ended this stream with UNAVAILABLE too.
            continue
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details, (
            f"a stream ended with {code.name} {details!r} after {answered} of {sent} requests answered, expected "
            "UNAVAILABLE 'server is shutting down'")
        assert sent - answered <= 1, f"{sent} sent, {answered} answered: more than the last one unanswered"
    stopped = [r.fields for r in caplog.records if r.getMessage() == "stopped"]
    assert stopped and stopped[-1]["unfinished"] == 0 and stopped[-1]["streams_cut"] == 0, stopped
    assert stopped[-1]["streams_closed"] == streams, stopped
