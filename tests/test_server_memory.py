"""Bounded resources: a run's memory is estimated before it runs, kept within a budget, and given back after."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from server_models import MARK, sample_input

PROBE = Path(__file__).with_name("memory_probe.py")


def _probe(model: Path, shapes: list[tuple[int, int]]) -> list[dict]:
    """Run memory_probe.py in a fresh process (so no other test's allocations are in its RSS)."""
    args = [str(x) for shape in shapes for x in shape]
    done = subprocess.run([sys.executable, str(PROBE), str(model), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("model", ["tiny_lstm", "tiny_gru"])
def test_run_memory_estimate_matches_measured_rss(tiny_repository, model):
    # Shapes from one long row to many short ones; the estimate may be above the growth (it is a budget), by
    # at most 30%, and never more than 10% below it.
    shapes = [(1, 300_000), (16, 30_000), (64, 6_000)]
    for run in _probe(tiny_repository / model / "1" / "model.onnx", shapes):
        grown = run["peak"] - run["before"]
        assert run["estimate"] is not None, "the runtime gives no estimate"
        ratio = run["estimate"] / grown
        assert 0.9 <= ratio <= 1.3, f"{model} [{run['rows']}, {run['steps']}]: estimate {run['estimate']} vs " \
                                    f"measured growth {grown} (x{ratio:.2f})"


def test_run_memory_estimate_matches_measured_rss_for_bidirectional(make_run_dir, tmp_path):
    from lstm_onnx.export.repository import export_to_repository

    export_to_repository(make_run_dir(cell="lstm", bidirectional=True), tmp_path, name="bi", version=1)
    for run in _probe(tmp_path / "bi" / "1" / "model.onnx", [(1, 200_000), (32, 8_000)]):
        ratio = (run["estimate"] or 0) / (run["peak"] - run["before"])
        assert 0.9 <= ratio <= 1.3, f"bidirectional [{run['rows']}, {run['steps']}]: x{ratio:.2f}"


def test_rss_returns_after_a_run_near_the_budget(tiny_repository):
    from lstm_onnx.server.runtime import ModelRuntime, RuntimeOptions

    path = tiny_repository / "tiny_lstm" / "1" / "model.onnx"
    runtime = ModelRuntime("tiny_lstm", 1, path)
    options = RuntimeOptions(provider="cpu")
    runtime.load(options)
    budget = getattr(options, "max_run_memory_bytes", 1 << 30)
    memory = getattr(runtime, "run_memory", None)  # code without an estimate: the same ~0.9 GiB run
    steps = memory.max_steps(64, int(0.9 * budget)) if memory else 77_000
    big, small = _probe(path, [(64, steps), (1, 10)])
    assert big["peak"] - big["before"] > 0.5 * budget, "the run was not near the budget"
    assert small["after"] <= 1.2 * big["before"], (
        f"RSS {big['before']} before a [64, {steps}] run, {small['after']} after it (peak {big['peak']})")


def test_request_above_the_run_memory_budget_is_refused_with_the_largest_t_that_fits(tiny_repository):
    import grpc

    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    budget = 64 << 20
    settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, metrics_port=-1, http_port=0,
                              max_run_memory_bytes=budget)
    with BackgroundServer(settings) as srv:
        runtime = srv.running.repository.resolve("tiny_lstm").runtime
        longest = runtime.run_memory.max_steps(64, budget)
        with InferenceClient(srv.url) as client:
            with pytest.raises(ClientError) as refused:
                client.infer("tiny_lstm", {"input": np.zeros((64, longest + 1, 1), np.float32)})
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            message = str(refused.value)
            assert "input 'input' of batch 64 and time" in message and "needs an estimated" in message
            assert "budget of 67.1 MB (67108864 bytes, --max-run-memory-bytes)" in message
            assert f"at batch 64 the longest time axis that fits is {longest}" in message
            answer = client.infer("tiny_lstm", {"input": np.zeros((64, longest, 1), np.float32)})
            assert answer["output"].shape[0] == 64
        # REST: the same refusal, as 429 with the same text.
        import httpx

        steps = runtime.run_memory.max_steps(1, budget) + 1
        body = {"inputs": [{"name": "input", "shape": [1, steps, 1], "datatype": "FP32", "data": [0.0] * steps}]}
        reply = httpx.post(f"http://{srv.http_url}/v2/models/tiny_lstm/infer", json=body, timeout=60)
        assert reply.status_code == 429 and "--max-run-memory-bytes" in reply.json()["error"], reply.text[:300]


class Recorder:
    """A ragged model stand-in: records each run's input shape; a run whose first value is MARK waits for
    `release`, and one longer than `hold_steps` waits for `release_long`."""

    name, version = "recorder", 1
    time_input = "input"

    def __init__(self, run_memory=None, budget: int = 0, hold_steps: int = 0):
        from lstm_onnx.server.padding import RaggedPlan

        self.ragged = RaggedPlan("input")
        self.run_memory, self.max_run_memory_bytes, self.hold_steps = run_memory, budget, hold_steps
        self.runs: list[tuple[int, ...]] = []
        self.held, self.release = threading.Event(), threading.Event()
        self.long_running, self.release_long = threading.Event(), threading.Event()

    def predict(self, inputs, outputs=None, lengths=None, run_options=None):
        x = inputs["input"]  # (B, T, F)
        self.runs.append(x.shape)
        if x.reshape(-1)[0] == MARK:
            self.held.set()
            assert self.release.wait(30)
        if self.hold_steps and x.shape[1] > self.hold_steps:
            self.long_running.set()
            assert self.release_long.wait(30)
        return {"last": x[:, -1, :]}  # (B, F)


def _marked(rows: int, steps: int) -> np.ndarray:
    x = np.ones((rows, steps, 1), np.float32)
    x.flat[0] = MARK
    return x


async def _behind_held_run(batcher, recorder, requests: list[np.ndarray]):
    """Hold one run, queue `requests` behind it, release, and return their answers."""
    first = asyncio.ensure_future(batcher.infer({"input": _marked(1, 10)}, 1))
    while not recorder.held.is_set():
        await asyncio.sleep(0.001)
    calls = [asyncio.ensure_future(batcher.infer({"input": x}, x.shape[0])) for x in requests]
    await asyncio.sleep(0.05)
    recorder.release.set()
    await first
    return await asyncio.gather(*calls)


def test_batcher_never_merges_requests_above_the_run_memory_budget():
    from lstm_onnx.server.batcher import DynamicBatcher
    from lstm_onnx.server.memory import FIXED_BYTES, RecurrentNode, RunMemory
    from lstm_onnx.server.metrics import Metrics

    memory = RunMemory((RecurrentNode("LSTM", 1, 8, 1),), input_features=1)
    budget = memory.estimate(3, 40)  # three rows of 40 steps fit in one run, four do not
    recorder = Recorder(memory, budget)
    batcher = DynamicBatcher(recorder, ThreadPoolExecutor(2), Metrics(), max_batch_size=64,
                             max_queue_delay_us=0, merge=True)
    answers = asyncio.run(_behind_held_run(batcher, recorder, [sample_input(1, 40, seed=i) for i in range(8)]))
    assert len(answers) == 8 and budget > FIXED_BYTES
    merged = recorder.runs[1:]
    assert all(memory.estimate(rows, steps) <= budget for rows, steps, _ in merged), merged
    assert max(rows for rows, _, _ in merged) == 3, f"runs {merged}: expected merging up to the budget"


def test_short_requests_are_not_padded_to_a_long_ones_length():
    from lstm_onnx.server.batcher import DynamicBatcher
    from lstm_onnx.server.metrics import Metrics

    recorder = Recorder()
    batcher = DynamicBatcher(recorder, ThreadPoolExecutor(2), Metrics(), max_batch_size=64,
                             max_queue_delay_us=0, merge=True)
    short = [sample_input(1, 10, seed=i) for i in range(31)]
    answers = asyncio.run(_behind_held_run(batcher, recorder, [sample_input(1, 100_000, seed=99), *short]))
    for x, (answer, _) in zip(short, answers[1:]):
        np.testing.assert_array_equal(answer["last"], x[:, -1, :])
    padded_long = [shape for shape in recorder.runs if shape[1] == 100_000 and shape[0] > 1]
    assert not padded_long, f"short requests were padded to T=100000: runs {recorder.runs}"
    assert (31, 10, 1) in recorder.runs, f"the short requests did not merge with each other: {recorder.runs}"


def test_short_request_is_answered_while_a_long_run_is_in_progress():
    from lstm_onnx.server.batcher import DynamicBatcher
    from lstm_onnx.server.metrics import Metrics

    recorder = Recorder(hold_steps=5_000)
    batcher = DynamicBatcher(recorder, ThreadPoolExecutor(2), Metrics(), max_batch_size=64,
                             max_queue_delay_us=0, merge=True)

    async def main():
        long = asyncio.ensure_future(batcher.infer({"input": sample_input(1, 500_000)}, 1))
        while not recorder.long_running.is_set():
            await asyncio.sleep(0.001)
        try:
            short, _ = await asyncio.wait_for(batcher.infer({"input": sample_input(1, 10)}, 1), timeout=5)
        finally:
            recorder.release_long.set()
        await long
        return short

    assert asyncio.run(main())["last"].shape == (1, 1)


def test_run_memory_settings_are_checked():
    from lstm_onnx.server.settings import ServerSettings

    with pytest.raises(ValueError, match="max_run_memory_bytes: got 0, expected at least 1"):
        ServerSettings(model_repository="r", max_run_memory_bytes=0).validate()
    with pytest.raises(ValueError, match="cpu_memory_arena: got 'yes', expected off or on"):
        ServerSettings(model_repository="r", cpu_memory_arena="yes").validate()


def test_sequence_chunk_above_the_budget_is_refused_and_the_sequence_goes_on(tiny_repository):
    import grpc

    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.protocol.codec import SequenceControl
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    budget = 32 << 20
    settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, metrics_port=-1, http_port=-1,
                              max_run_memory_bytes=budget)
    x = sample_input(1, 12, seed=3)
    with BackgroundServer(settings) as srv, InferenceClient(srv.url) as client:
        runtime = srv.running.repository.resolve("tiny_lstm").runtime
        too_long = np.zeros((1, runtime.run_memory.max_steps(1, budget) + 1, 1), np.float32)
        client.infer("tiny_lstm", {"input": x[:, :5]}, sequence=SequenceControl(7, True, False))
        with pytest.raises(ClientError) as refused:
            client.infer("tiny_lstm", {"input": too_long}, sequence=SequenceControl(7, False, False))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The refused chunk was never a step: the sequence continues from the first chunk's state.
        last = client.infer("tiny_lstm", {"input": x[:, 5:]}, sequence=SequenceControl(7, False, True))
        whole = client.infer("tiny_lstm", {"input": x})
    np.testing.assert_allclose(last["output"], whole["output"], atol=1e-5, rtol=0)


def test_run_memory_refusal_says_when_no_length_fits_the_batch(tiny_repository):
    from lstm_onnx.protocol.errors import ResourceExhausted
    from lstm_onnx.server.memory import FIXED_BYTES
    from lstm_onnx.server.runtime import ModelRuntime, RuntimeOptions

    runtime = ModelRuntime("tiny_lstm", 1, tiny_repository / "tiny_lstm" / "1" / "model.onnx")
    runtime.load(RuntimeOptions(provider="cpu", max_run_memory_bytes=FIXED_BYTES + 1000))
    runtime.check_run_memory(1, 1)
    with pytest.raises(ResourceExhausted, match="no time axis fits at batch 64; send fewer rows"):
        runtime.check_run_memory(64, 1)


def test_length_buckets_pad_a_request_to_less_than_twice_its_length():
    from lstm_onnx.server.batcher import SHORT_STEPS, batch_key, length_bucket

    assert {length_bucket(t) for t in range(1, SHORT_STEPS + 1)} == {0}
    for k in range(1, 20):  # bucket k is (SHORT_STEPS * 2^(k-1), SHORT_STEPS * 2^k]
        low, high = SHORT_STEPS * 2 ** (k - 1) + 1, SHORT_STEPS * 2 ** k
        assert length_bucket(low - 1) == k - 1 and length_bucket(low) == length_bucket(high) == k
        assert length_bucket(high + 1) == k + 1 and high < 2 * low
    short, long = ({"input": np.zeros((1, t, 1), np.float32)} for t in (10, 100_000))
    assert batch_key(short, "input") != batch_key(long, "input")
