"""The scheduler: resolves the model, supplies omitted state, carries sequences, batches, and counts."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from lstm_onnx.protocol.codec import SequenceControl
from lstm_onnx.protocol.errors import DeadlineExceeded, InvalidArgument, ServerError, Unavailable

from .batcher import DynamicBatcher
from .metrics import Metrics
from .repository import ModelVersion, Repository
from .sequences import SequenceStore


@dataclass
class InferResult:
    """What a request gets back: the version that ran it and its outputs in the order asked for."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]


class Scheduler:
    """Entry point for every inference; knows nothing of protobuf."""

    def __init__(self, repository: Repository, executor: Executor, metrics: Metrics, sequences: SequenceStore,
                 request_timeout_s: float = 0.0):
        self.repository = repository
        self.executor = executor
        self.metrics = metrics
        self.sequences = sequences
        self.request_timeout_s = request_timeout_s  # 0: no limit
        self.draining = False
        self.last_refused = 0.0  # monotonic time of the last request refused while draining
        self.in_flight = 0
        self._batchers: dict[tuple[str, int], DynamicBatcher] = {}

    def batcher(self, name: str, version: ModelVersion) -> DynamicBatcher:
        key = (name, version.version)
        if key not in self._batchers:
            entry = self.repository.get(name)
            self._batchers[key] = DynamicBatcher(
                version.runtime, self.executor, self.metrics,
                max_batch_size=max(1, entry.max_batch_size), max_queue_delay_us=entry.max_queue_delay_us,
                merge=entry.dynamic_batching)
        return self._batchers[key]

    async def infer(self, name: str, version: str, inputs: dict[str, np.ndarray], requested: list[str] | None,
                    sequence: SequenceControl | None = None) -> InferResult:
        """Run one request; raises a ServerError subclass for anything the client should hear about."""
        if self.draining:
            self.last_refused = time.monotonic()
            raise Unavailable("server is shutting down: no new requests")
        start = time.perf_counter_ns()
        entry = self.repository.get(name)
        resolved = entry.resolve(version)
        labels = (name, str(resolved.version))
        self.in_flight += 1
        self.metrics.add_pending(*labels, 1)
        try:
            work = self._infer(entry.max_batch_size, resolved, inputs, requested, sequence)
            if self.request_timeout_s > 0:
                try:
                    # asyncio.timeout, not wait_for: wait_for wraps the work in a task of its own per request.
                    async with asyncio.timeout(self.request_timeout_s):
                        outputs, queue_ns, rows = await work
                except TimeoutError:
                    raise DeadlineExceeded(f"model '{name}': request took longer than the server's limit of "
                                           f"{self.request_timeout_s:g} s (request_timeout_s)") from None
            else:
                outputs, queue_ns, rows = await work
        except ServerError:
            self.metrics.record_request(*labels, ok=False, duration_ns=time.perf_counter_ns() - start)
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            self.metrics.record_request(*labels, ok=False, duration_ns=time.perf_counter_ns() - start)
            raise
        finally:
            self.in_flight -= 1
            self.metrics.add_pending(*labels, -1)
        self.metrics.record_request(*labels, ok=True, duration_ns=time.perf_counter_ns() - start,
                                    queue_ns=queue_ns, rows=rows)
        return InferResult(name, resolved.version, outputs)

    async def _infer(self, max_batch_size: int, resolved: ModelVersion, inputs: dict[str, np.ndarray],
                     requested: list[str] | None, sequence: SequenceControl | None):
        runtime = resolved.runtime
        output_names = [s.name for s in runtime.outputs]
        for name in requested or []:
            if name not in output_names:
                raise InvalidArgument(f"requested output '{name}': model '{runtime.name}' has outputs {output_names}")
        runtime.check_inputs(inputs)
        rows = _batch_rows(inputs, max_batch_size, runtime.name)
        if sequence is not None and not runtime.state:
            raise InvalidArgument(f"model '{runtime.name}' carries no recurrent state, so it takes no sequence_id")
        if sequence is not None and runtime.bidirectional and not (sequence.start and sequence.end):
            # The reverse direction reads a sequence from its end: state carried from an earlier chunk
            # would give answers that differ from sending the sequence whole.
            raise InvalidArgument(f"model '{runtime.name}' is bidirectional: a sequence must come whole in one request "
                                  "(sequence_start and sequence_end both true), not in chunks")
        batcher = self.batcher(runtime.name, resolved)
        if sequence is None:
            full = self._with_zero_state(runtime, inputs, rows)
            outputs, queue_ns = await batcher.infer(full, rows)
        else:
            seq = self.sequences.open(runtime.name, sequence)
            async with seq.lock:
                full = dict(inputs)
                for pair in runtime.state:
                    if pair.input in full or seq.state is None:
                        continue
                    carried = seq.state[pair.output]
                    if carried.shape[0] != rows:
                        raise InvalidArgument(f"sequence {sequence.id!r}: input has batch {rows}, but its state "
                                              f"'{pair.output}' has batch {carried.shape[0]}")
                    full[pair.input] = carried
                full = self._with_zero_state(runtime, full, rows)
                try:
                    outputs, queue_ns = await batcher.infer(full, rows)
                except asyncio.CancelledError:  # its state never came back: a later chunk must not reuse the old
                    self.sequences.close(seq)
                    raise
                seq.state = {pair.output: outputs[pair.output] for pair in runtime.state}
                self.sequences.touch(seq)
                if sequence.end:
                    self.sequences.close(seq)
        names = requested or output_names
        return {n: outputs[n] for n in names}, queue_ns, rows

    @staticmethod
    def _with_zero_state(runtime, inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        missing = [p.input for p in runtime.state if p.input not in inputs]
        if not missing:
            return inputs
        full = dict(inputs)
        for name in missing:
            full[name] = runtime.zero_state(name, rows)
        return full


def _batch_rows(inputs: dict[str, np.ndarray], max_batch_size: int, model: str) -> int:
    """Rows in the request (its batch axis), checked against max_batch_size; 1 for models without batching."""
    if max_batch_size <= 0:
        return 1
    sizes = {name: a.shape[0] for name, a in inputs.items() if a.ndim}
    rows = next(iter(sizes.values()), 1)
    if len(set(sizes.values())) > 1:
        raise InvalidArgument(f"model '{model}': inputs disagree on the batch axis: {sizes}")
    if rows > max_batch_size or rows < 1:
        raise InvalidArgument(f"model '{model}': got batch size {rows}, expected 1..{max_batch_size}")
    return rows
