"""The scheduler: resolves the model, supplies omitted state, carries sequences, batches, and counts."""
from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from lstm_onnx.protocol.codec import SequenceControl
from lstm_onnx.protocol.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    Unavailable,
    clip,
)

from .batcher import DynamicBatcher
from .clients import ANONYMOUS, Client
from .metrics import CANCELED, Metrics
from .repository import ModelVersion, Repository
from .sequences import SequenceStore


@dataclass
class InferResult:
    """What a request gets back: the version that ran it, its outputs in the order asked for, and for a sequence
    step its number and the request id of the step whose state it continued."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]
    sequence_step: int = 0
    sequence_previous_id: str = ""


@dataclass
class AdmissionLimits:
    """Bounds on what the scheduler holds at once (waiting or running), per model and in total; 0: no bound."""

    requests_per_model: int = 0
    requests: int = 0
    bytes_per_model: int = 0
    bytes: int = 0


@dataclass
class _Held:
    requests: int = 0
    bytes: int = 0
    per_model: dict[str, list[int]] = field(default_factory=dict)  # model -> [requests, bytes]


class Scheduler:
    """Entry point for every inference; knows nothing of protobuf."""

    def __init__(self, repository: Repository, executor: Executor, metrics: Metrics, sequences: SequenceStore,
                 request_timeout_s: float = 0.0, admission: AdmissionLimits | None = None):
        self.repository = repository
        self.admission = admission or AdmissionLimits()
        self._held = _Held()
        self.executor = executor
        self.metrics = metrics
        self.sequences = sequences
        self.request_timeout_s = request_timeout_s  # 0: no limit
        self.draining = False
        self.last_refused = 0.0  # monotonic time of the last request refused while draining
        self.refused_draining = 0  # requests refused (UNAVAILABLE) because the server was draining
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
                    sequence: SequenceControl | None = None, request_id: str = "",
                    client_deadline_s: float | None = None, client: Client = ANONYMOUS,
                    request_bytes: int = 0) -> InferResult:
        """Run one request; raises a ServerError subclass for anything the client should hear about.

        `client_deadline_s`: the seconds the client's own deadline leaves (None: none); the request gives up at
        whichever of that and request_timeout_s comes first, so abandoned work leaves the queue at once.
        `client`: who sent it (its share of the sequence slots, its sequences' owner). `request_bytes`: the
        message as received, which the request holds until it is answered (admission counts it).
        """
        if self.draining:
            self.last_refused = time.monotonic()
            self.refused_draining += 1
            raise Unavailable("server is shutting down: no new requests")
        start = time.perf_counter_ns()
        entry = self.repository.get(name)
        resolved = entry.resolve(version)
        labels = (name, str(resolved.version))
        try:
            self._admit(name, request_bytes)
        except ResourceExhausted as exc:
            self.metrics.record_request(*labels, ok=False, duration_ns=time.perf_counter_ns() - start,
                                        reason=failure_reason(exc))
            raise
        held = self._held.per_model[name]
        self.in_flight += 1
        self.metrics.add_pending(*labels, 1)
        limits = [t for t in (self.request_timeout_s or None, client_deadline_s) if t is not None]
        try:
            deadline = asyncio.get_running_loop().time() + min(limits) if limits else math.inf
            work = self._infer(entry.max_batch_size, resolved, inputs, requested, sequence, request_id, deadline,
                               client)
            if limits:
                try:
                    # asyncio.timeout, not wait_for: wait_for wraps the work in a task of its own per request.
                    async with asyncio.timeout(min(limits)):
                        result = await work
                except TimeoutError:
                    if client_deadline_s is not None and client_deadline_s <= (self.request_timeout_s or math.inf):
                        raise DeadlineExceeded(f"model '{name}': the client's deadline of {client_deadline_s:.3g} s "
                                               "passed before the request was answered") from None
                    raise DeadlineExceeded(f"model '{name}': request took longer than the server's limit of "
                                           f"{self.request_timeout_s:g} s (request_timeout_s)") from None
            else:
                result = await work
        except DeadlineExceeded:
            self.metrics.record_request(*labels, ok=False, duration_ns=time.perf_counter_ns() - start,
                                        reason=CANCELED)
            raise
        except ServerError as exc:
            self.metrics.record_request(*labels, ok=False, duration_ns=time.perf_counter_ns() - start,
                                        reason=failure_reason(exc))
            raise
        except asyncio.CancelledError:  # the client went away: Triton counts it a failure, reason CANCELED
            self.metrics.record_request(*labels, ok=False, duration_ns=time.perf_counter_ns() - start,
                                        reason=CANCELED)
            raise
        except Exception:
            self.metrics.record_request(*labels, ok=False, duration_ns=time.perf_counter_ns() - start,
                                        reason="OTHER")
            raise
        finally:
            self.in_flight -= 1
            self.metrics.add_pending(*labels, -1)
            held[0] -= 1
            held[1] -= request_bytes
            self._held.requests -= 1
            self._held.bytes -= request_bytes
        outputs, timing, rows, turn = result
        self.metrics.record_request(*labels, ok=True, duration_ns=time.perf_counter_ns() - start,
                                    timing=timing, rows=rows)
        if turn is None:
            return InferResult(name, resolved.version, outputs)
        return InferResult(name, resolved.version, outputs, turn.step, turn.previous_id)

    def _admit(self, name: str, request_bytes: int) -> None:
        """Count the request in, or refuse it (RESOURCE_EXHAUSTED) naming the first bound it would pass."""
        limits, held = self.admission, self._held
        model = held.per_model.setdefault(name, [0, 0])
        bounds = ((model[0] + 1, limits.requests_per_model, f"{model[0]} requests are held for model '{name}'",
                   "max_queued_requests_per_model"),
                  (held.requests + 1, limits.requests, f"{held.requests} requests are held over all models",
                   "max_queued_requests"),
                  (model[1] + request_bytes, limits.bytes_per_model,
                   f"model '{name}' holds {model[1]} request bytes and this request has {request_bytes}",
                   "max_queued_bytes_per_model"),
                  (held.bytes + request_bytes, limits.bytes,
                   f"all models hold {held.bytes} request bytes and this request has {request_bytes}",
                   "max_queued_bytes"))
        for wanted, limit, what, setting in bounds:
            if limit and wanted > limit:
                raise ResourceExhausted(f"{what} (waiting or running), the limit is {limit} ({setting}, per "
                                        "worker); retry later, or send to another replica")
        model[0] += 1
        model[1] += request_bytes
        held.requests += 1
        held.bytes += request_bytes

    def queued_bytes(self, name: str | None = None) -> int:
        """Request bytes held (waiting or running), for one model or all."""
        return self._held.bytes if name is None else self._held.per_model.get(name, [0, 0])[1]

    async def _infer(self, max_batch_size: int, resolved: ModelVersion, inputs: dict[str, np.ndarray],
                     requested: list[str] | None, sequence: SequenceControl | None, request_id: str,
                     deadline: float, client: Client = ANONYMOUS):
        runtime = resolved.runtime
        output_names = [s.name for s in runtime.outputs]
        for name in requested or []:
            if name not in output_names:
                raise InvalidArgument(f"requested output '{clip(name)}': model '{runtime.name}' has outputs {output_names}")
        runtime.check_inputs(inputs)
        rows = _batch_rows(inputs, max_batch_size, runtime.name)
        runtime.check_run_memory(rows, runtime.steps_of(inputs))  # before a sequence step is reserved: refusal keeps it
        if sequence is not None and not runtime.state:
            raise InvalidArgument(f"model '{runtime.name}' carries no recurrent state, so it takes no sequence_id")
        if sequence is not None and runtime.bidirectional and not (sequence.start and sequence.end):
            # The reverse direction reads a sequence from its end: state carried from an earlier chunk
            # would give answers that differ from sending the sequence whole.
            raise InvalidArgument(f"model '{runtime.name}' is bidirectional: a sequence must come whole in one request "
                                  "(sequence_start and sequence_end both true), not in chunks")
        batcher = self.batcher(runtime.name, resolved)
        names = requested or output_names
        if sequence is None:
            full = self._with_zero_state(runtime, inputs, rows)
            outputs, timing = await batcher.infer(full, rows)
            return {n: outputs[n] for n in names}, timing, rows, None
        step = self.sequences.reserve(runtime.name, sequence, request_id, client, version=resolved.version)
        try:
            turn = await self.sequences.turn(step)  # refusals resolve the step themselves
        except asyncio.CancelledError:
            self.sequences.abandon(step, _why_abandoned(deadline))
            raise
        try:
            full = dict(inputs)
            for pair in runtime.state:
                if pair.input in full or turn.state is None:
                    continue
                carried = turn.state[pair.output]
                if carried.shape[0] != rows:
                    raise InvalidArgument(f"sequence {sequence.id!r}: input has batch {rows}, but its state "
                                          f"'{pair.output}' has batch {carried.shape[0]}")
                full[pair.input] = carried
            full = self._with_zero_state(runtime, full, rows)
            outputs, timing = await batcher.infer(full, rows)
        except asyncio.CancelledError:
            self.sequences.abandon(step, _why_abandoned(deadline))
            raise
        except ServerError as exc:
            self.sequences.abandon(step, f"failed ({exc.code.name}: {exc})")
            raise
        except BaseException as exc:
            self.sequences.abandon(step, f"failed ({type(exc).__name__})")
            raise
        # The memory store's commit never suspends: a step is either applied and answered, or abandoned. The Redis
        # store's is one compare-and-set that a cancellation does not interrupt (it resolves the step itself).
        await self.sequences.commit(step, turn, {pair.output: outputs[pair.output] for pair in runtime.state})
        return {n: outputs[n] for n in names}, timing, rows, turn

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


def failure_reason(exc: ServerError) -> str:
    """Triton's failure reason for a refused request: BACKEND (the model failed), REJECTED (the server would not
    take it: a bound, draining, or a sequence it cannot continue), OTHER (the request itself was wrong)."""
    if isinstance(exc, Internal):
        return "BACKEND"
    if isinstance(exc, (ResourceExhausted, Unavailable, Aborted, FailedPrecondition, PermissionDenied)):
        return "REJECTED"
    return "OTHER"



def _why_abandoned(deadline: float) -> str:
    """What the steps after an abandoned one are told: its deadline passed, or its call was cancelled."""
    if asyncio.get_running_loop().time() >= deadline:
        return "passed its deadline before it was applied"
    return "was cancelled (its call ended) before it was applied"
