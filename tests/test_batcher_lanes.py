"""The batcher on its own (a fake runtime, a fake clock, no server): which requests share a run, what each gets
back, the timings and metrics recorded, and what abandoned or failing requests do to the others.

Runs are held on a threading.Event inside the fake runtime's predict, so requests queue behind a run for sure;
nothing waits on time except the queue-delay test, which waits for an event with a one-hour bound.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from lstm_onnx.protocol.errors import Internal
from lstm_onnx.server.batcher import (
    LONG_STEPS,
    SHORT_STEPS,
    DynamicBatcher,
    Lane,
    Timing,
    batch_key,
    length_bucket,
    merge_inputs,
    split_outputs,
)
from lstm_onnx.server.padding import RaggedPlan
from lstm_onnx.server.runtime import Stopped

HOUR_US = 3_600_000_000
# Every wait in these tests is bounded by WAIT seconds (they take milliseconds): a mutant that leaves a request
# unanswered fails the test at once instead of hanging it (a blocked wait uses no CPU, so mutmut's CPU-time
# limit would not stop it). Held runs are released after each test, passed or failed.
WAIT = 5
RUNTIMES: list = []
pytestmark = pytest.mark.timeout(4 * WAIT)  # a mutant that spins the event loop (no await) is stopped too


def run(main):
    return asyncio.run(asyncio.wait_for(main, WAIT))


@pytest.fixture(autouse=True)
def _release_held_runs():
    yield
    for runtime in RUNTIMES:
        for gate in (*getattr(runtime, "gates", {}).values(), getattr(runtime, "gate", None)):
            if gate is not None:
                gate.set()
    RUNTIMES.clear()


class Clock:
    """Each reading 2x further from the last: every phase of a Timing has its own length."""

    def __init__(self):
        self._values = (100 * 2 ** i for i in itertools.count())
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            return next(self._values)


class Memory:
    def estimate(self, rows: int, steps: int) -> int:
        return rows * steps


class Runtime:
    """y = 2x (+ each row's length when given); x[0, 0, ...] == -1 fails the run; runs can be held by `hold`."""

    name, version = "m", 3

    def __init__(self, time_input=None, ragged=False, budget=0):
        RUNTIMES.append(self)
        self.calls: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.gates: dict[int, threading.Event] = {}  # run number -> held until set
        self.started = [threading.Event() for _ in range(16)]  # run number -> set when it has started
        self.terminated: list[bool] = []
        self.threads: list[str] = []
        self.time_input = time_input
        if ragged:
            self.ragged = RaggedPlan(time_input)
        if budget:
            self.run_memory, self.max_run_memory_bytes = Memory(), budget

    def predict(self, inputs, outputs=None, lengths=None, run_options=None):
        number = len(self.calls)
        self.calls.append((inputs["x"].copy(), None if lengths is None else lengths.copy()))
        self.threads.append(threading.current_thread().name)
        self.started[number].set()
        if number in self.gates:
            assert self.gates[number].wait(WAIT)
        self.terminated.append(bool(run_options is not None and run_options.terminate))
        if self.terminated[-1]:
            raise Stopped("terminated")
        if (inputs["x"].reshape(inputs["x"].shape[0], -1)[:, 0] == -1).any():
            raise ValueError("bad row")
        y = inputs["x"] * 2
        if lengths is not None:
            y = y + lengths.reshape(-1, *([1] * (y.ndim - 1)))
        return {"y": y}


    def hold(self, number: int) -> threading.Event:
        """Hold run `number` (0 first) until the returned event is set."""
        self.gates[number] = threading.Event()
        return self.gates[number]


async def _started(runtime, number: int) -> None:
    assert await asyncio.get_running_loop().run_in_executor(None, runtime.started[number].wait, WAIT)


class Metrics:
    def __init__(self):
        self.executions: list[tuple] = []
        self.stopped: list[tuple] = []

    def record_execution(self, *args):
        self.executions.append(args)

    def record_stopped(self, *args):
        self.stopped.append(args)


def _x(value: float, rows: int = 1, width: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, width), value, np.float32)}


def _lane(runtime=None, max_batch_size=8, delay_us=0, merge=True):
    runtime = runtime or Runtime()
    metrics = Metrics()
    lane = Lane(runtime, ThreadPoolExecutor(1), metrics, max_batch_size, delay_us, merge, clock=Clock())
    return lane, runtime, metrics


async def _first_run_held(lane, runtime):
    """A first request (value 0) whose run has started and is held: (its gate, its future)."""
    gate = runtime.hold(0)
    first = asyncio.ensure_future(lane.infer(_x(0), 1))
    await _started(runtime, 0)
    return gate, first


async def _behind_a_held_run(lane, runtime, requests):
    """Start a first request (value 0) and hold its run; queue `requests` ((inputs, rows, steps)) behind it; release.
    Returns the first answer and the others' (answers or exceptions), in order."""
    gate, first = await _first_run_held(lane, runtime)
    rest = [asyncio.ensure_future(lane.infer(*r)) for r in requests]
    await asyncio.sleep(0)  # each queued request reaches its future
    assert len(lane._queue) == len(requests)
    gate.set()
    return await first, await asyncio.gather(*rest, return_exceptions=True)


def test_length_bucket_edges():
    assert [length_bucket(t) for t in (1, SHORT_STEPS, SHORT_STEPS + 1, 2 * SHORT_STEPS, 2 * SHORT_STEPS + 1,
                                       4 * SHORT_STEPS, 4 * SHORT_STEPS + 1)] == [0, 0, 1, 1, 2, 2, 3]


def test_batch_key_is_names_dtypes_and_non_batch_dims_plus_the_length_bucket():
    a = {"x": np.zeros((1, 5, 3), np.float32), "h": np.zeros((1, 2), np.float64)}
    assert batch_key(a) == (("h", "<f8", (2,)), ("x", "<f4", (5, 3)))
    assert batch_key(a, "x") == (("h", "<f8", (2,)), ("x", "<f4", (3,)), 0)
    assert batch_key({"x": np.zeros((2, 65, 3), np.float32)}, "x") == (("x", "<f4", (3,)), 1)
    # A time input the request lacks: no bucket.
    assert batch_key({"h": np.zeros((1, 2), np.float32)}, "x") == (("h", "<f4", (2,)),)


def test_merge_inputs_concatenates_and_pads_only_when_lengths_differ():
    one = {"x": np.ones((1, 2, 1), np.float32)}
    assert merge_inputs([one], "x") == (one, None)
    parts = [{"x": np.full((1, 2, 1), 1, np.float32), "h": np.full((1, 1), 5, np.float32)},
             {"x": np.full((2, 3, 1), 2, np.float32), "h": np.full((2, 1), 6, np.float32)}]
    merged, lengths = merge_inputs(parts, "x")
    np.testing.assert_array_equal(lengths, [2, 3, 3])
    np.testing.assert_array_equal(merged["x"][:, :, 0], [[1, 1, 0], [2, 2, 2], [2, 2, 2]])
    np.testing.assert_array_equal(merged["h"][:, 0], [5, 6, 6])
    same, none = merge_inputs([parts[1], parts[1]], "x")
    assert none is None and same["x"].shape == (4, 3, 1) and same["h"].shape == (4, 1)
    plain, none = merge_inputs(parts[:1] + [{"x": np.full((1, 2, 1), 3, np.float32), "h": parts[0]["h"]}])
    assert none is None
    np.testing.assert_array_equal(plain["x"][:, :, 0], [[1, 1], [3, 3]])


def test_split_outputs_gives_each_request_its_rows_and_refuses_outputs_without_the_batch_axis():
    whole = {"y": np.arange(6).reshape(3, 2)}
    assert split_outputs(whole, [3])[0] is whole
    parts = split_outputs({"y": np.arange(6).reshape(3, 2), "z": np.arange(3)}, [1, 2])
    np.testing.assert_array_equal(parts[0]["y"], [[0, 1]])
    np.testing.assert_array_equal(parts[1]["y"], [[2, 3], [4, 5]])
    np.testing.assert_array_equal(parts[1]["z"], [1, 2])
    with pytest.raises(Internal, match=r"output 'y': shape \[4\] has no batch axis of 3 to split"):
        split_outputs({"y": np.arange(4)}, [1, 2])
    with pytest.raises(Internal, match=r"output 'y': shape \[\] has no batch axis of 2 to split"):
        split_outputs({"y": np.array(1.0)}, [1, 1])


def test_unmerged_lane_runs_each_request_and_times_it():
    lane, runtime, metrics = _lane(merge=False)
    out, timing = run(lane.infer(_x(3), 1))
    np.testing.assert_array_equal(out["y"], [[6, 6]])
    # Clock readings 100 (start), 200 (began), 400 (ended), 800 (split).
    assert timing == Timing(0, 100, 200, 400)
    assert metrics.executions == [("m", "3", 1, 100, 200, 0)]


def test_idle_lane_runs_inline_and_records_the_run():
    lane, runtime, metrics = _lane(delay_us=HOUR_US)

    async def main():
        out = await asyncio.wait_for(lane.infer(_x(4, rows=2), 2), WAIT)
        await asyncio.sleep(0)  # the job's done callback
        return out

    out, timing = run(main())
    np.testing.assert_array_equal(out["y"], [[8, 8], [8, 8]])
    assert timing == Timing(0, 100, 200, 400)
    assert metrics.executions == [("m", "3", 2, 100, 200, 0)]
    assert lane._worker.done() and not lane._queue


def test_requests_queued_behind_a_run_merge_into_one_and_each_gets_its_rows():
    lane, runtime, metrics = _lane()

    async def main():
        return await _behind_a_held_run(lane, runtime, [(_x(1), 1), (_x(2, rows=2), 2), (_x(3), 1)])

    (first, _), rest = run(main())
    np.testing.assert_array_equal(first["y"], [[0, 0]])
    assert [r[0]["y"][:, 0].tolist() for r in rest] == [[2], [4, 4], [6]]
    assert len(runtime.calls) == 2
    np.testing.assert_array_equal(runtime.calls[1][0][:, 0], [1, 2, 2, 3])
    assert [e[2] for e in metrics.executions] == [1, 4]
    # Clock readings: 100 start, 200 began, 400/800/1600 the three enqueued, 3200 ended (the first run), 6400 the
    # merged run taken (started), 12800 the first caller's split, 25600 began, 51200 ended, 102400 split. Each
    # queued request's queue time counts from its own enqueue reading; the run's phases are shared.
    assert [r[1] for r in rest] == [Timing(6400 - q, 19200, 25600, 51200) for q in (400, 800, 1600)]
    assert metrics.executions[1] == ("m", "3", 4, 19200, 25600, 51200)


def test_queued_requests_with_other_keys_or_beyond_max_batch_size_run_apart():
    lane, runtime, metrics = _lane(max_batch_size=3)

    async def main():
        return await _behind_a_held_run(lane, runtime, [(_x(1, rows=2), 2), (_x(2, width=3), 1), (_x(3), 1),
                                                        (_x(4, rows=2), 2), (_x(5, width=3), 1)])

    _, rest = run(main())
    assert [r[0]["y"][:, 0].tolist() for r in rest] == [[2, 2], [4], [6], [8, 8], [10]]
    # Runs: the held one; [1, 1, 3] (2 + 1 rows, the width-3 request kept); [2, 5] (width 3); [4, 4].
    assert [c[0][:, 0].tolist() for c in runtime.calls[1:]] == [[1, 1, 3], [2, 5], [4, 4]]
    assert [e[2] for e in metrics.executions] == [1, 3, 2, 2]


def test_a_merged_run_stays_within_the_memory_budget():
    # estimate = rows * steps; budget 8. Steps 4 + 4 fit exactly (2 * 4 = 8); a third of 4 would be 12; a
    # request of 6 steps joins none (2 * 6 = 12) but runs alone (a first request is always taken).
    lane, runtime, metrics = _lane(Runtime(budget=8))

    async def main():
        return await _behind_a_held_run(lane, runtime, [(_x(1), 1, 4), (_x(2), 1, 4), (_x(3), 1, 4),
                                                        (_x(4), 1, 6), (_x(5), 1, 2)])

    _, rest = run(main())
    assert [r[0]["y"][0, 0] for r in rest] == [2, 4, 6, 8, 10]
    assert [c[0][:, 0].tolist() for c in runtime.calls[1:]] == [[1, 2], [3, 5], [4]]


@pytest.mark.parametrize("budget, runs", [(1, [[1, 2]]), (0, [[1, 2, 3]])])
def test_without_steps_or_without_a_budget_memory_does_not_split_runs(budget, runs):
    # Requests without a time input (0 steps) estimate 0 bytes whatever their rows; a model with a memory
    # estimate but no budget (0) merges as if it had no estimate. max_batch_size 2 or 3 bounds the run instead.
    runtime = Runtime(budget=1)
    runtime.max_run_memory_bytes = budget
    lane, runtime, metrics = _lane(runtime, max_batch_size=2 if budget else 3)

    async def main():
        return await _behind_a_held_run(lane, runtime, [(_x(v), 1, 0) for v in (1, 2, 3)][:3 if not budget else 2])

    _, rest = run(main())
    assert [c[0][:, 0].tolist() for c in runtime.calls[1:]] == runs


def test_ragged_lane_pads_within_a_bucket_and_passes_each_rows_length():
    lane, runtime, metrics = _lane(Runtime(time_input="x", ragged=True))
    a = {"x": np.full((1, 2, 1), 1, np.float32)}
    b = {"x": np.full((1, 3, 1), 2, np.float32)}
    far = {"x": np.full((1, SHORT_STEPS + 1, 1), 3, np.float32)}

    async def main():
        return await _behind_a_held_run(lane, runtime, [(a, 1, 2), (b, 1, 3), (far, 1, SHORT_STEPS + 1)])

    _, rest = run(main())
    np.testing.assert_array_equal(rest[0][0]["y"][0, :, 0], [4, 4, 2])  # 2x + length 2; the pad row: 0 + 2
    np.testing.assert_array_equal(rest[1][0]["y"][0, :, 0], [7, 7, 7])
    assert rest[2][0]["y"].shape == (1, SHORT_STEPS + 1, 1)
    np.testing.assert_array_equal(runtime.calls[1][1], [2, 3])
    assert runtime.calls[2][1] is None  # alone: no padding


def test_one_bad_request_in_a_merged_run_fails_alone():
    lane, runtime, metrics = _lane()

    async def main():
        return await _behind_a_held_run(lane, runtime, [(_x(1), 1), (_x(-1), 1), (_x(3), 1)])

    _, rest = run(main())
    assert rest[0][0]["y"][0, 0] == 2 and rest[2][0]["y"][0, 0] == 6
    assert isinstance(rest[1], ValueError) and str(rest[1]) == "bad row"
    assert [c[0][:, 0].tolist() for c in runtime.calls[1:]] == [[1, -1, 3], [1], [-1], [3]]
    assert [e[2] for e in metrics.executions] == [1, 1, 1]


def test_an_abandoned_queued_request_leaves_the_queue_and_is_never_run():
    lane, runtime, metrics = _lane()

    async def main():
        gate, first = await _first_run_held(lane, runtime)
        gone = asyncio.ensure_future(lane.infer(_x(1), 1))
        kept = asyncio.ensure_future(lane.infer(_x(2), 1))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert [item.inputs["x"][0, 0] for item in lane._queue] == [2]
        gate.set()
        await first
        return await kept

    out, _ = run(main())
    assert out["y"][0, 0] == 4
    assert [c[0][:, 0].tolist() for c in runtime.calls] == [[0], [2]]


async def _a_merged_pair_held(lane, runtime):
    """One run held while two more requests queue; then the first ends, and the pair runs merged, held."""
    gate, first = await _first_run_held(lane, runtime)
    queued = [asyncio.ensure_future(lane.infer(_x(v), 1)) for v in (1, 2)]
    await asyncio.sleep(0)
    merged = runtime.hold(1)
    gate.set()
    await first
    await _started(runtime, 1)
    return queued, merged


def test_a_run_whose_callers_all_left_is_terminated_and_counted_stopped():
    lane, runtime, metrics = _lane()

    async def main():
        queued, merged = await _a_merged_pair_held(lane, runtime)  # both callers go
        queued[0].cancel()
        await asyncio.sleep(0)
        queued[1].cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        await asyncio.sleep(0)  # the futures' done callbacks
        merged.set()
        await lane._worker
        return queued

    run(main())
    assert [c[0][:, 0].tolist() for c in runtime.calls] == [[0], [1, 2]]
    assert metrics.stopped == [("m", "3")]
    assert [e[2] for e in metrics.executions] == [1]


def test_a_merged_run_with_one_caller_left_is_not_terminated():
    lane, runtime, metrics = _lane()

    async def main():
        queued, merged = await _a_merged_pair_held(lane, runtime)
        queued[0].cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        merged.set()
        return await queued[1]

    out, _ = run(main())
    assert out["y"][0, 0] == 4
    assert metrics.stopped == []
    assert [e[2] for e in metrics.executions] == [1, 2]


def test_a_cancelled_inline_caller_terminates_its_run_and_the_queue_behind_it_still_drains():
    lane, runtime, metrics = _lane()

    async def main():
        gate, first = await _first_run_held(lane, runtime)
        second = asyncio.ensure_future(lane.infer(_x(5), 1))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        return await second

    out, timing = run(main())
    assert out["y"][0, 0] == 10
    assert metrics.stopped == [("m", "3")]
    assert [e[2] for e in metrics.executions] == [1]


def test_a_cancelled_unmerged_caller_terminates_its_run():
    lane, runtime, metrics = _lane(merge=False)

    async def main():
        gate = runtime.hold(0)
        call = asyncio.ensure_future(lane.infer(_x(0), 1))
        await _started(runtime, 0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        gate.set()
        await asyncio.get_running_loop().run_in_executor(lane.executor, lambda: None)  # the run has ended

    run(main())
    assert runtime.terminated == [True] and metrics.executions == []


def test_under_load_the_batch_waits_for_arrivals_until_it_is_full():
    # Queue delay one hour, max_batch_size 3: after the held run the next batch (1 row) waits; a request of
    # another width arriving then does not join it; the two of its width that arrive fill it, and it runs at
    # once, as one run; the other width (3 rows, a full batch) runs after it.
    lane, runtime, metrics = _lane(max_batch_size=3, delay_us=HOUR_US)

    async def main():
        gate, first = await _first_run_held(lane, runtime)
        waiting = asyncio.ensure_future(lane.infer(_x(1), 1))
        await asyncio.sleep(0)
        gate.set()
        await first
        while lane._queue:  # the drain task takes the waiting request
            await asyncio.sleep(0)
        other = asyncio.ensure_future(lane.infer(_x(9, rows=3, width=3), 3))  # a full batch: runs without waiting
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert [item.inputs["x"][0, 0] for item in lane._queue] == [9]  # not taken into the waiting batch
        late = [asyncio.ensure_future(lane.infer(_x(v), 1)) for v in (2, 3)]
        return await asyncio.wait_for(asyncio.gather(waiting, *late, other), WAIT)

    rest = run(main())
    assert [r[0]["y"][0, 0] for r in rest] == [2, 4, 6, 18]
    assert [c[0][:, 0].tolist() for c in runtime.calls] == [[0], [1, 2, 3], [9, 9, 9]]


def test_under_load_without_a_delay_nothing_waits():
    lane, runtime, metrics = _lane(max_batch_size=3, delay_us=0)

    async def main():
        gate, first = await _first_run_held(lane, runtime)
        waiting = asyncio.ensure_future(lane.infer(_x(1), 1))
        await asyncio.sleep(0)
        gate.set()
        await first
        return await asyncio.wait_for(waiting, WAIT)

    out, _ = run(main())
    assert out["y"][0, 0] == 2


def test_long_requests_run_in_their_own_lane_beside_short_ones():
    runtime = Runtime(time_input="x")
    metrics = Metrics()
    batcher = DynamicBatcher(runtime, ThreadPoolExecutor(2, thread_name_prefix="given"), metrics, 8, 0, True,
                             clock=Clock())
    long_x = [{"x": np.full((1, LONG_STEPS + 1, 1), v, np.float32)} for v in (1, 2, 3)]
    edge_x = {"x": np.full((1, LONG_STEPS, 1), 5, np.float32)}

    async def main():
        gate = runtime.hold(0)
        slow = asyncio.ensure_future(batcher.infer(long_x[0], 1))
        await _started(runtime, 0)
        queued = [asyncio.ensure_future(batcher.infer(x, 1)) for x in long_x[1:]]
        await asyncio.sleep(0)
        assert len(batcher.long._queue) == 2 and batcher.short._worker is None
        edge = await batcher.infer(edge_x, 1)  # T = LONG_STEPS: the short lane, not held by the long run
        assert len(batcher.long._queue) == 2 and batcher._queue == batcher.long._queue
        gate.set()
        return edge, await slow, await asyncio.gather(*queued)

    edge, slow, queued = run(main())
    assert edge[0]["y"][0, 0, 0] == 10 and slow[0]["y"][0, 0, 0] == 2
    assert [q[0]["y"][0, 0, 0] for q in queued] == [4, 6]
    assert [c[0][:, 0, 0].tolist() for c in runtime.calls] == [[1], [5], [2, 3]]
    assert all(name.startswith("given") for name in runtime.threads)
    # One clock for both lanes (2x further each reading): the phases of each run, as the lanes read it.
    assert edge[1] == Timing(0, 1600, 3200, 6400) and slow[1] == Timing(0, 100, 25400, 76800)
    assert [q[1] for q in queued] == [Timing(50800, 153600, 204800, 409600), Timing(50400, 153600, 204800, 409600)]
    assert metrics.executions == [("m", "3", 1, 1600, 3200, 0), ("m", "3", 1, 100, 25400, 0),
                                  ("m", "3", 2, 153600, 204800, 409600)]
    assert batcher._queue == []


class Plain:
    """A runtime with none of the optional attributes (no time input, ragged plan or memory estimate)."""

    name, version = "p", 7

    def __init__(self):
        RUNTIMES.append(self)
        self.calls, self.threads = [], []
        self.gate, self.started = threading.Event(), threading.Event()

    def predict(self, inputs, outputs=None, lengths=None, run_options=None):
        self.calls.append(inputs["x"][:, 0].tolist())
        self.threads.append(threading.current_thread().name)
        self.started.set()
        if len(self.calls) == 1:
            assert self.gate.wait(WAIT)
        return {"y": inputs["x"] + 1}


@pytest.mark.parametrize("merge", [True, False])
def test_the_batcher_passes_its_settings_to_the_lane_that_runs(merge):
    runtime, metrics = Plain(), Metrics()
    batcher = DynamicBatcher(runtime, ThreadPoolExecutor(1, thread_name_prefix="given"), metrics, 2, 0, merge,
                             clock=Clock())

    async def main():
        first = asyncio.ensure_future(batcher.infer(_x(0), 1))
        assert await asyncio.get_running_loop().run_in_executor(None, runtime.started.wait, WAIT)
        rest = [asyncio.ensure_future(batcher.infer(_x(v), 1)) for v in (1, 2, 3)]
        await asyncio.sleep(0)
        runtime.gate.set()
        return await asyncio.wait_for(asyncio.gather(first, *rest), WAIT)

    answers = run(main())
    assert [a[0]["y"][0, 0] for a in answers] == [1, 2, 3, 4]
    assert batcher.long._worker is None and batcher.short._queue == []
    assert all(name.startswith("given") for name in runtime.threads)
    if merge:
        assert runtime.calls == [[0], [1, 2], [3]]  # max_batch_size 2
        assert [e[:3] for e in metrics.executions] == [("p", "7", 1), ("p", "7", 2), ("p", "7", 1)]
        # Clock: 100 start, 200 began, 400/800/1600 three enqueued, 3200 ended, ... as in the lane's own test.
        assert answers[0][1] == Timing(0, 100, 3000, 9600)
        assert answers[1][1] == Timing(6000, 19200, 25600, 51200)
        assert metrics.executions == [("p", "7", 1, 100, 3000, 0), ("p", "7", 2, 19200, 25600, 51200),
                                      ("p", "7", 1, 204800, 409600, 819200)]
    else:
        assert runtime.calls == [[0], [1], [2], [3]]
        assert [e[:3] for e in metrics.executions] == [("p", "7", 1)] * 4
