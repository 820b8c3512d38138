"""Server processes sharing sequences through one real redis-server: sequences alternate between replicas, survive a
kill -9 and a restart, races have exactly one winner, Redis down and back, and `--workers` on Redis."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from server_models import sample_input

ROOT = Path(__file__).resolve().parent.parent
CHUNKS = 10


class Replica:
    """`lstm-onnx serve --sequence-store redis://...` as a process of its own, on a free port."""

    def __init__(self, repo: Path, store: str, *extra: str):
        env = dict(os.environ, LSTM_ONNX_GRACE_PERIOD_S="10", LSTM_ONNX_LOG_FORMAT="json")
        self.proc = subprocess.Popen([sys.executable, "-m", "lstm_onnx", "serve", "--model-repository", str(repo),
                                      "--grpc-port", "0", "--metrics-port", "-1", "--http-port", "-1",
                                      "--sequence-store", store, "--executor-threads", "1", *extra],
                                     cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready: dict | None = None
        wanted = '"msg": "workers serving"' if "--workers" in extra else '"msg": "serving"'
        deadline = time.monotonic() + 120
        while self.ready is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if wanted in line:
                self.ready = json.loads(line)
        assert self.ready, "server did not start:\n" + "".join(self.lines)
        self.url = self.ready["grpc"]
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture
def replicas(tiny_repository, redis_server):
    started: list[Replica] = []

    def start(*extra: str) -> Replica:
        started.append(Replica(tiny_repository, redis_server.url, *extra))
        return started[-1]

    yield start
    for replica in started:
        if replica.proc.poll() is None:
            replica.proc.kill()
            replica.proc.wait(timeout=30)


def _stub(url: str, fresh: bool = False):
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    options = [("grpc.use_local_subchannel_pool", 1)] if fresh else []
    channel = grpc.insecure_channel(url, options=options)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def _step(stub, x, sid, start=False, end=False, step=0, stream=False, request_id=""):
    """One sequence step over ModelInfer or a one-request stream: (outputs, sequence_step of the answer)."""
    from lstm_onnx.protocol.codec import SequenceControl, decode_response, decode_sequence_step, encode_request

    request = encode_request("tiny_lstm", {"input": x}, sequence=SequenceControl(sid, start, end, step),
                             request_id=request_id)
    if stream:
        (response,) = list(stub.ModelStreamInfer(iter([request]), timeout=30))
        if response.error_message:
            code = response.infer_response.parameters["error_code"].string_param
            raise StepError(grpc.StatusCode[code], response.error_message)
        response = response.infer_response
    else:
        try:
            response = stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as exc:
            raise StepError(exc.code(), exc.details()) from None
    return decode_response(response), decode_sequence_step(response)[0]


class StepError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code


def _whole(url: str, x: np.ndarray) -> np.ndarray:
    from lstm_onnx.protocol.codec import decode_response, encode_request

    channel, stub = _stub(url)
    with channel:
        return decode_response(stub.ModelInfer(encode_request("tiny_lstm", {"input": x}), timeout=30))["output"]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_sequence_alternating_between_two_replicas_equals_the_whole(replicas, redis_server, stream):
    from lstm_onnx.client.client import split_time

    a, b = replicas(), replicas()
    x = sample_input(2, 4 * CHUNKS, seed=5)
    chunks = split_time(x, 4)
    channels = [_stub(a.url), _stub(b.url)]
    try:
        for i, chunk in enumerate(chunks):
            out, number = _step(channels[i % 2][1], chunk, 42, start=i == 0, end=i == CHUNKS - 1, stream=stream)
            assert number == i + 1
        np.testing.assert_allclose(out["output"], _whole(a.url, x), atol=1e-5, rtol=0)
    finally:
        for channel, _ in channels:
            channel.close()
    assert redis_server.keys() == []


def _run_sequence(urls: list[str], sid: int, x: np.ndarray, current: list[int], results: dict,
                  pause: threading.Event | None = None, pause_at: int = -1, progress: dict | None = None) -> None:
    """Send a sequence chunk by chunk, naming each step's number; when a replica fails, go on on the next one.

    A step the dead replica applied before its answer was lost is refused by the next one as already applied
    (sequence_step): never applied twice.
    """
    from lstm_onnx.client.client import split_time

    chunks = split_time(x, 3)
    channels = {}
    answers, skipped = [], 0
    try:
        for i, chunk in enumerate(chunks):
            if i == pause_at and pause is not None:
                pause.wait(60)
            while True:
                url = urls[current[0]]
                if url not in channels:
                    channels[url] = _stub(url)
                try:
                    out, number = _step(channels[url][1], chunk, sid, i == 0, i == len(chunks) - 1, step=i + 1,
                                        request_id=f"{sid}-{i}")
                    answers.append(number)
                    break
                except StepError as exc:
                    if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        current[0] = (urls.index(url) + 1) % len(urls)  # the client's own failover: away from it
                        time.sleep(0.05)
                        continue
                    if exc.code == grpc.StatusCode.FAILED_PRECONDITION and "already applied" in str(exc):
                        skipped += 1  # applied on the dead replica: its answer is lost, its state is not
                        break
                    raise
            if progress is not None:
                progress[sid] = i + 1
        results[sid] = (out["output"], answers, skipped)
    except BaseException as exc:  # noqa: BLE001 - the test reports it
        results[sid] = exc
    finally:
        for channel, _ in channels.values():
            channel.close()


def test_kill_9_of_one_replica_in_the_middle_of_32_sequences_loses_and_duplicates_none(replicas, redis_server):
    a, b = replicas(), replicas()
    inputs = {sid: sample_input(1, 3 * CHUNKS, seed=sid) for sid in range(1, 33)}
    results: dict = {}
    progress: dict = {}
    killed = threading.Event()
    current = [0]  # every client starts on A; the first failure moves them all to B
    threads = [threading.Thread(target=_run_sequence, args=([a.url, b.url], sid, x, current, results, killed, 7,
                                                            progress)) for sid, x in inputs.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while (len(progress) < 32 or min(progress.values()) < 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(progress) == 32, f"not every sequence got going: {progress}"
    a.stop(signal.SIGKILL)  # requests of chunks 3..6 are in flight on A now
    killed.set()
    for t in threads:
        t.join(timeout=120)
    failed = {sid: r for sid, r in results.items() if isinstance(r, BaseException)}
    assert not failed, failed
    assert sorted(results) == list(inputs)  # none lost
    for sid, (output, answers, skipped) in results.items():
        np.testing.assert_allclose(output, _whole(b.url, inputs[sid]), atol=1e-5, rtol=0, err_msg=f"sequence {sid}")
        assert len(set(answers)) == len(answers) and len(answers) + skipped == CHUNKS  # none duplicated
        assert answers[-1] == CHUNKS
    assert current == [1]  # every client moved to B
    assert redis_server.keys() == []


def test_a_restart_of_the_only_replica_loses_no_sequence(replicas, redis_server):
    from lstm_onnx.client.client import split_time

    inputs = {sid: sample_input(1, 3 * CHUNKS, seed=100 + sid) for sid in range(1, 9)}  # 0: no sequence
    first = replicas()
    channel, stub = _stub(first.url)
    with channel:
        for sid, x in inputs.items():
            for i, chunk in enumerate(split_time(x, 3)[:5]):
                _step(stub, chunk, sid, start=i == 0, step=i + 1)
    assert first.stop(signal.SIGTERM) == 0
    assert len(redis_server.keys()) == 8  # the state is in Redis, not in the process that left
    second = replicas()
    channel, stub = _stub(second.url)
    with channel:
        for sid, x in inputs.items():
            for i, chunk in list(enumerate(split_time(x, 3)))[5:]:
                out, number = _step(stub, chunk, sid, end=i == CHUNKS - 1, step=i + 1)
                assert number == i + 1
            np.testing.assert_allclose(out["output"], _whole(second.url, x), atol=1e-5, rtol=0)
    assert redis_server.keys() == []


def test_a_race_on_one_sequence_from_two_replicas_has_one_winner_per_step(replicas, redis_server):
    a, b = replicas(), replicas()
    stubs = [_stub(a.url), _stub(b.url)]
    start = sample_input(1, 4, seed=1)
    _step(stubs[0][1], start, 7, start=True)
    applied = [start]
    lost = 0
    try:
        for round_ in range(6):
            # Long chunks: both replicas read the same version and run for a while before either commits.
            xs = [sample_input(1, 4000, seed=10 * round_ + k) for k in range(2)]
            answers: list = [None, None]

            def send(k):
                try:
                    answers[k] = _step(stubs[k][1], xs[k], 7, request_id=f"r{round_}-{k}")
                except StepError as exc:
                    answers[k] = exc

            threads = [threading.Thread(target=send, args=(k,)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            won = [k for k in range(2) if not isinstance(answers[k], StepError)]
            assert won, answers  # a race always has a winner
            numbers = [answers[k][1] for k in won]
            assert len(set(numbers)) == len(numbers)  # never two answers for one step
            if len(won) == 1:
                lost += 1
                error = answers[1 - won[0]]
                assert error.code == grpc.StatusCode.ABORTED and "sequence 7 advanced elsewhere" in str(error)
            applied += [xs[k] for k in sorted(won, key=lambda k: answers[k][1])]
        assert lost >= 3, f"the replicas raced in only {lost} of 6 rounds"
        # The state is the winners' chain, whole: nothing forked, nothing of a loser mixed in.
        out, _ = _step(stubs[1][1], sample_input(1, 2, seed=99), 7, end=True)
        np.testing.assert_allclose(out["output"], _whole(a.url, np.concatenate(applied + [sample_input(1, 2, seed=99)],
                                                                                axis=1)), atol=1e-5, rtol=0)
    finally:
        for channel, _ in stubs:
            channel.close()
    assert redis_server.keys() == []


def test_redis_stopped_and_started_mid_run_gives_clear_errors_then_correct_answers_and_leaks_no_key(
        replicas, redis_server):
    from lstm_onnx.client.client import split_time

    server = replicas()
    stop = threading.Event()
    done: dict[int, int] = {}
    errors: list[StepError] = []
    wrong: list = []

    def client(n: int):
        """Sequences one after another; UNAVAILABLE: retry the step (named by number, so never applied twice);
        unknown or aborted (Redis came back empty): start the same id again. Every id ends: no key is left."""
        channel, stub = _stub(server.url)
        with channel:
            while not stop.is_set():
                sid = (n + 1) * 1000 + done.get(n, 0)
                x = sample_input(1, 12, seed=sid)
                chunks = split_time(x, 3)
                i = 0
                while i < len(chunks):
                    try:
                        out, _ = _step(stub, chunks[i], sid, start=i == 0, end=i == 3, step=i + 1)
                    except StepError as exc:
                        errors.append(exc)
                        time.sleep(0.05)
                        if exc.code == grpc.StatusCode.FAILED_PRECONDITION and "already applied" in str(exc):
                            i += 1
                        elif exc.code != grpc.StatusCode.UNAVAILABLE:
                            i = 0
                        continue
                    i += 1
                if not np.allclose(out["output"], _whole(server.url, x), atol=1e-5):
                    wrong.append(sid)
                done[n] = done.get(n, 0) + 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    before = dict(done)
    redis_server.stop()
    time.sleep(2.0)
    gap_errors = len(errors)
    redis_server.start()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(60)
    assert not wrong, f"sequences that differ from their whole run: {wrong}"
    assert gap_errors > 0 and all(before.get(n, 0) < done.get(n, 0) for n in range(6)), (before, done)
    clear = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.INVALID_ARGUMENT,
             grpc.StatusCode.FAILED_PRECONDITION)
    assert all(e.code in clear for e in errors), [str(e) for e in errors if e.code not in clear]
    unavailable = [e for e in errors if e.code == grpc.StatusCode.UNAVAILABLE]
    assert unavailable and all(f"sequence store {redis_server.url}" in str(e) for e in unavailable)
    assert redis_server.keys() == []  # every sequence ended: no key left
    assert redis_server.client().zcard("lstm-onnx:live") == 0


def test_workers_on_redis_let_a_sequence_move_between_workers(tiny_repository, redis_server, replicas):
    from test_server_workers import _successes

    from lstm_onnx.client.client import split_time

    server = replicas("--workers", "2", "--metrics-port", "0")
    assert server.ready["workers"] == 2
    x = sample_input(1, 3 * 20, seed=3)
    chunks = split_time(x, 3)
    for i, chunk in enumerate(chunks):
        channel, stub = _stub(server.url, fresh=True)  # a connection each: the kernel picks a worker for each
        with channel:
            out, number = _step(stub, chunk, 5, start=i == 0, end=i == len(chunks) - 1)
        assert number == i + 1
    np.testing.assert_allclose(out["output"], _whole(server.url, x), atol=1e-5, rtol=0)
    counts = [_successes(port) for port in server.ready["metrics_ports"]]
    assert all(counts) and sum(counts) == len(chunks) + 1, f"steps per worker: {counts}"  # it did move
    assert server.stop() == 0
    assert redis_server.keys() == []
