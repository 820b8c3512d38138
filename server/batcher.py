"""Dynamic batching: requests for one model version are merged into one onnxruntime run and split back.

Length-aware: requests merge only within a length bucket (so a short request is padded to at most twice its
length, or to SHORT_STEPS), never into a run whose estimated memory is above the model's budget, and short and
long requests queue in separate lanes that run side by side, so a long run never holds a short request.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from lstm_onnx.protocol.errors import Internal

from .metrics import Metrics
from .padding import pad_time
from .runtime import ModelRuntime, Stopped

Inputs = dict[str, np.ndarray]


@dataclass(slots=True)
class Timing:
    """Where one request's time went, in Triton's ModelStatistics phases (nanoseconds)."""

    queue_ns: int = 0  # waiting in the batcher's queue for a run to take it
    input_ns: int = 0  # run taken -> onnxruntime starts: merging (padding) requests, waiting for a thread
    infer_ns: int = 0  # onnxruntime's run
    output_ns: int = 0  # onnxruntime done -> this request's outputs are split out and back on the event loop


SHORT_STEPS = 64  # requests up to this long all share bucket 0: padding them costs at most 63 steps
LONG_STEPS = 1024  # requests longer than this queue in the long lane


def length_bucket(steps: int) -> int:
    """0 for T <= SHORT_STEPS, else k for T in (SHORT_STEPS * 2^(k-1), SHORT_STEPS * 2^k]: within a bucket the
    longest request is less than twice the shortest, so padding at most doubles a request's work."""
    return ((steps - 1) // SHORT_STEPS).bit_length()


def batch_key(inputs: Inputs, time_input: str | None = None) -> tuple:
    """Requests with equal keys can be concatenated along the batch axis.

    Same names, datatypes and non-batch dims; for a model that takes sequence_lens (`time_input` set) the time
    axis of that input is replaced by its length bucket, because merge_inputs pads it within a bucket.
    """
    key = tuple(sorted((name, a.dtype.str, a.shape[2:] if name == time_input else a.shape[1:])
                       for name, a in inputs.items()))
    if time_input is not None and time_input in inputs:
        return key + (length_bucket(inputs[time_input].shape[1]),)
    return key


def merge_inputs(parts: list[Inputs], time_input: str | None = None) -> tuple[Inputs, np.ndarray | None]:
    """Concatenate each input along axis 0; the time input zero-padded to the longest, with each row's length.

    Lengths are None when no padding was needed (every part as long as the longest).
    """
    if len(parts) == 1:
        return parts[0], None
    merged = {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0] if name != time_input}
    if time_input is None:
        return merged, None
    times = {p[time_input].shape[1] for p in parts}
    if len(times) == 1:
        merged[time_input] = np.concatenate([p[time_input] for p in parts], axis=0)
        return merged, None
    merged[time_input], lengths = pad_time([p[time_input] for p in parts])
    return merged, lengths


def split_outputs(outputs: Inputs, rows: list[int]) -> list[Inputs]:
    """Split each output back into per-request pieces of `rows` rows."""
    if len(rows) == 1:
        return [outputs]
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise Internal(f"output '{name}': shape {list(array.shape)} has no batch axis of {total} to split")
    bounds = np.cumsum(rows)[:-1]
    pieces = {name: np.split(array, bounds, axis=0) for name, array in outputs.items()}
    return [{name: pieces[name][i] for name in outputs} for i in range(len(rows))]


@dataclass(eq=False)  # compared by identity: removing an abandoned request must not compare arrays
class _Pending:
    inputs: Inputs
    rows: int
    key: tuple
    future: asyncio.Future
    enqueued_ns: int
    steps: int  # T of the time input (0 when the model has none): with rows, what the run's memory grows with


class DynamicBatcher:
    """Queues requests for one model version in two lanes, short (T <= LONG_STEPS) and long, each running merged
    batches one run at a time; the lanes run side by side, so a short request waits for short runs only.

    The scheduler has checked each request's run alone against the model's memory budget
    (ModelRuntime.check_run_memory); the lanes keep merged runs within it.
    """

    def __init__(self, runtime: ModelRuntime, executor: Executor, metrics: Metrics, max_batch_size: int,
                 max_queue_delay_us: int, merge: bool, clock: Callable[[], int] = time.perf_counter_ns):
        self.runtime = runtime
        self.short = Lane(runtime, executor, metrics, max_batch_size, max_queue_delay_us, merge, clock)
        self.long = Lane(runtime, executor, metrics, max_batch_size, max_queue_delay_us, merge, clock)
        self._time_input = getattr(runtime, "time_input", None)

    @property
    def _queue(self) -> list[_Pending]:
        return self.short._queue + self.long._queue

    async def infer(self, inputs: Inputs, rows: int) -> tuple[Inputs, Timing]:
        """All outputs for these inputs, and where the request's time went."""
        steps = _steps(inputs, self._time_input)
        lane = self.long if steps > LONG_STEPS else self.short
        return await lane.infer(inputs, rows, steps)


def _steps(inputs: Inputs, time_input: str | None) -> int:
    x = inputs.get(time_input) if time_input else None
    return x.shape[1] if x is not None and x.ndim >= 2 else 0


class Lane:
    """Queues requests for one model version and runs them in merged batches, one run at a time.

    An idle model runs a request at once; only while a run is in progress do requests accumulate, and
    then the batcher waits at most `max_queue_delay_us` for a batch to fill.

    Abandoned requests (the caller's task cancelled: the client went away, or a deadline passed) leave the queue
    at once and are never merged into a run; a run whose requests are all abandoned is stopped with
    RunOptions.terminate, so the model is free for the next.
    """

    def __init__(self, runtime: ModelRuntime, executor: Executor, metrics: Metrics, max_batch_size: int,
                 max_queue_delay_us: int, merge: bool, clock: Callable[[], int] = time.perf_counter_ns):
        self.runtime = runtime
        self.executor = executor
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.merge = merge
        self._clock = clock
        self._queue: list[_Pending] = []
        self._worker: asyncio.Future | None = None  # the drain task, or the executor job of an inline run
        self._arrived = asyncio.Event()
        self._labels = (runtime.name, str(runtime.version))
        ragged = getattr(runtime, "ragged", None)
        self._time_input = ragged.time_input if ragged is not None else None
        self._memory = getattr(runtime, "run_memory", None)
        self._budget = getattr(runtime, "max_run_memory_bytes", 0)

    async def infer(self, inputs: Inputs, rows: int, steps: int = 0) -> tuple[Inputs, Timing]:
        """All outputs for these inputs, and where the request's time went."""
        if not self.merge:
            start = self._clock()
            run_options = _run_options()
            try:
                outputs, began, ended = await self._execute(inputs, rows, None, run_options, start)
            except asyncio.CancelledError:  # queued for a thread: never starts; running: stops at the next node
                run_options.terminate = True
                raise
            self.metrics.record_execution(*self._labels, rows, began - start, ended - began, 0)
            return outputs, Timing(0, began - start, ended - began, self._clock() - ended)
        if not self._queue and (self._worker is None or self._worker.done()):
            return await self._run_inline(inputs, rows)
        item = _Pending(inputs, rows, batch_key(inputs, self._time_input),
                        asyncio.get_running_loop().create_future(), self._clock(), steps)
        self._queue.append(item)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())
        try:
            return await item.future
        except asyncio.CancelledError:  # abandoned: out of the queue now, not when a run would have taken it
            if item in self._queue:
                self._queue.remove(item)
            raise

    async def _run_inline(self, inputs: Inputs, rows: int) -> tuple[Inputs, Timing]:
        """Idle model: run in the caller's task, saving a task and a future per request at low load.

        The run marks the model busy until its executor job ends, even if the caller is cancelled, so that runs
        stay one at a time; requests arriving meanwhile queue, and a drain task starts when the job ends. A
        cancelled caller sets terminate: the job stops at its next node (or at once, if it had not started).
        """
        loop = asyncio.get_running_loop()
        start = self._clock()
        run_options = _run_options()
        job = loop.run_in_executor(self.executor, self._timed_predict, inputs, None, run_options)
        self._worker = job
        job.add_done_callback(lambda done: self._after_inline(done, rows, start))
        try:
            outputs, began, ended = await asyncio.shield(job)
        except asyncio.CancelledError:
            run_options.terminate = True
            raise
        return outputs, Timing(0, began - start, ended - began, self._clock() - ended)

    def _after_inline(self, job: asyncio.Future, rows: int, start: int) -> None:
        if not job.cancelled():
            if job.exception() is None:
                _, began, ended = job.result()
                self.metrics.record_execution(*self._labels, rows, began - start, ended - began, 0)
            elif isinstance(job.exception(), Stopped):
                self.metrics.record_stopped(*self._labels)
        if self._queue and self._worker is job:
            self._worker = asyncio.get_running_loop().create_task(self._drain(busy=True))

    async def _execute(self, inputs: Inputs, rows: int, lengths: np.ndarray | None, run_options,
                       started: int) -> tuple[Inputs, int, int]:
        """Run in an executor thread: outputs and the clock when onnxruntime began and ended. The execution's
        input phase counts from `started` (the run was taken from the queue), its output phase is the split."""
        loop = asyncio.get_running_loop()
        try:
            outputs, began, ended = await loop.run_in_executor(self.executor, self._timed_predict, inputs, lengths,
                                                               run_options)
        except Stopped:
            self.metrics.record_stopped(*self._labels)
            raise
        return outputs, began, ended

    def _timed_predict(self, inputs: Inputs, lengths: np.ndarray | None,
                       run_options=None) -> tuple[Inputs, int, int]:
        began = self._clock()
        outputs = self.runtime.predict(inputs, None, lengths, run_options)
        return outputs, began, self._clock()

    def _take(self, batch: list[_Pending]) -> list[_Pending]:
        """Queued requests that can join `batch` (the first in the queue when it is empty): the same key, room
        in max_batch_size, and the merged run's estimated memory within the budget."""
        key = batch[0].key if batch else None
        rows = sum(item.rows for item in batch)
        steps = max((item.steps for item in batch), default=0)
        taken, kept = [], []
        for item in self._queue:
            if ((key is None or item.key == key) and rows + item.rows <= self.max_batch_size
                    and ((not batch and not taken) or self._fits(rows + item.rows, max(steps, item.steps)))):
                key = item.key
                taken.append(item)
                rows += item.rows
                steps = max(steps, item.steps)
            else:
                kept.append(item)
        self._queue = kept
        return taken

    def _fits(self, rows: int, steps: int) -> bool:
        return self._memory is None or not self._budget or self._memory.estimate(rows, steps) <= self._budget

    async def _drain(self, busy: bool = False) -> None:
        while self._queue:
            batch = self._take([])
            rows = sum(item.rows for item in batch)
            if busy and rows < self.max_batch_size and self.max_queue_delay_s > 0:
                # Under load a short wait lets the batch fill; at low load (busy False) nothing waits.
                deadline = asyncio.get_running_loop().time() + self.max_queue_delay_s
                while rows < self.max_batch_size:
                    self._arrived.clear()
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
                    more = self._take(batch)
                    batch += more
                    rows += sum(item.rows for item in more)
            await self._run(batch, rows)
            busy = bool(self._queue)

    async def _run(self, batch: list[_Pending], rows: int) -> None:
        batch = [item for item in batch if not item.future.done()]  # abandoned while the batch filled
        if not batch:
            return
        rows = sum(item.rows for item in batch)
        started = self._clock()
        run_options = _run_options()

        def stop_if_abandoned(_: asyncio.Future) -> None:
            if all(item.future.done() for item in batch):
                run_options.terminate = True

        for item in batch:
            item.future.add_done_callback(stop_if_abandoned)
        try:
            merged, lengths = merge_inputs([item.inputs for item in batch], self._time_input)
            outputs, began, ended = await self._execute(merged, rows, lengths, run_options, started)
            pieces = split_outputs(outputs, [item.rows for item in batch])
        except Stopped:
            return  # every request in it was abandoned: nobody to answer
        except Exception as exc:
            if len(batch) > 1:  # one bad request must not fail the others merged with it: run each alone
                for item in batch:
                    await self._run([item], item.rows)
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        finally:
            for item in batch:
                item.future.remove_done_callback(stop_if_abandoned)
        split = self._clock()
        self.metrics.record_execution(*self._labels, rows, began - started, ended - began, split - ended)
        for item, piece in zip(batch, pieces):
            if not item.future.done():  # a cancelled client leaves a done future
                item.future.set_result((piece, Timing(started - item.enqueued_ns, began - started, ended - began,
                                                      split - ended)))


def _run_options():
    """A fresh onnxruntime.RunOptions per run: its terminate flag stops that run only."""
    import onnxruntime as ort

    return ort.RunOptions()
