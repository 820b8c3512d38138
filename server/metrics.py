"""Per model-version counters with Triton's metric names; prometheus_client exposes them, ModelStatistics reads them."""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .http_site import HttpLimits, HttpSite
from .system_metrics import CpuCollector, GpuCollector

log = logging.getLogger("lstm_onnx.server")

CANCELED = "CANCELED"  # the client went away or its deadline passed: a failure in Triton's counts
FAILURE_REASONS = ("REJECTED", CANCELED, "BACKEND", "OTHER")  # Triton's reason label on request failures


@dataclass
class ModelCounters:
    """Cumulative figures for one model version (durations in nanoseconds)."""

    success: int = 0
    failure: int = 0
    failure_reasons: Counter = field(default_factory=Counter)  # FAILURE_REASONS -> requests
    inference_count: int = 0  # rows (batch items) inferred, as Triton counts
    exec_count: int = 0  # onnxruntime runs; below success count when requests were merged
    exec_stopped: int = 0  # runs stopped (RunOptions.terminate) because every request in them was abandoned
    request_ns: int = 0
    failure_ns: int = 0
    queue_ns: int = 0
    # Per successful request, as Triton counts them: each request adds the phases of the run it was in.
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    pending: int = 0
    last_inference_ms: int = 0
    batch_sizes: Counter = field(default_factory=Counter)  # rows per run -> number of runs
    batch_ns: Counter = field(default_factory=Counter)  # rows per run -> onnxruntime ns (compute_infer)
    batch_input_ns: Counter = field(default_factory=Counter)  # rows per run -> compute_input ns
    batch_output_ns: Counter = field(default_factory=Counter)  # rows per run -> compute_output ns


class Metrics:
    """Thread-safe counters keyed by (model, version)."""

    def __init__(self, worker: int | None = None, worker_restarts: int = 0) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, str], ModelCounters] = {}
        self.registry = CollectorRegistry(auto_describe=False)  # one per server: tests run several in a process
        self.registry.register(TritonCollector(self))
        self.registry.register(CpuCollector())
        self._gpu = False
        self.worker = worker  # with --workers: this process's index
        self.worker_restarts = worker_restarts  # times the parent restarted this worker's slot after it died
        self.sequence_store = None  # the shared store (Redis), whose own counters are served too; None: memory

    def enable_gpu(self) -> None:
        """Add Triton's GPU families (a model runs on CUDA)."""
        if not self._gpu:
            self._gpu = True
            self.registry.register(GpuCollector())

    def counters(self, model: str, version: str) -> ModelCounters:
        with self._lock:
            return self._counters.setdefault((model, version), ModelCounters())

    def record_request(self, model: str, version: str, ok: bool, duration_ns: int, timing=None,
                       rows: int = 0, reason: str = "OTHER") -> None:
        """One request's outcome; `timing` (batcher.Timing) for a successful one."""
        c = self.counters(model, version)
        with self._lock:
            if ok:
                c.success += 1
                c.request_ns += duration_ns
                if timing is not None:
                    c.queue_ns += timing.queue_ns
                    c.compute_input_ns += timing.input_ns
                    c.compute_infer_ns += timing.infer_ns
                    c.compute_output_ns += timing.output_ns
                c.inference_count += rows
                c.last_inference_ms = int(time.time() * 1000)
            else:
                c.failure += 1
                c.failure_reasons[reason] += 1
                c.failure_ns += duration_ns

    def record_execution(self, model: str, version: str, rows: int, input_ns: int, infer_ns: int,
                         output_ns: int) -> None:
        """One onnxruntime run of `rows` rows (Triton's batch_stats)."""
        c = self.counters(model, version)
        with self._lock:
            c.exec_count += 1
            c.batch_sizes[rows] += 1
            c.batch_input_ns[rows] += input_ns
            c.batch_ns[rows] += infer_ns
            c.batch_output_ns[rows] += output_ns

    def record_stopped(self, model: str, version: str) -> None:
        c = self.counters(model, version)
        with self._lock:
            c.exec_stopped += 1

    def add_pending(self, model: str, version: str, delta: int) -> None:
        c = self.counters(model, version)
        with self._lock:
            c.pending += delta

    def snapshot(self) -> dict[tuple[str, str], ModelCounters]:
        with self._lock:
            return {k: ModelCounters(**{f: (Counter(v) if isinstance(v, Counter) else v)
                                        for f, v in vars(c).items()}) for k, c in self._counters.items()}

    def render(self) -> str:
        """Prometheus text exposition (0.0.4) of Triton's families, written by prometheus_client."""
        return generate_latest(self.registry).decode()


# Triton's families (docs/user_guide/metrics.md): name, type, help, value of one model version's counters.
FAMILIES: tuple[tuple[str, str, str, Callable[[ModelCounters], float]], ...] = (
    ("nv_inference_request_success", "counter", "Number of successful inference requests, all batch sizes",
     lambda c: c.success),
    ("nv_inference_count", "counter", "Number of inferences performed (does not include cached requests)",
     lambda c: c.inference_count),
    ("nv_inference_exec_count", "counter", "Number of model executions performed (does not include cached requests)",
     lambda c: c.exec_count),
    ("lstm_onnx_exec_stopped", "counter", "Number of model executions stopped (RunOptions.terminate) because "
     "every request in them was abandoned", lambda c: c.exec_stopped),
    ("nv_inference_request_duration_us", "counter", "Cumulative inference request duration in microseconds "
     "(includes cached requests)", lambda c: (c.request_ns + c.failure_ns) // 1000),
    ("nv_inference_queue_duration_us", "counter", "Cumulative inference queuing duration in microseconds "
     "(includes cached requests)", lambda c: c.queue_ns // 1000),
    ("nv_inference_compute_input_duration_us", "counter", "Cumulative compute input duration in microseconds "
     "(does not include cached requests)", lambda c: c.compute_input_ns // 1000),
    ("nv_inference_compute_infer_duration_us", "counter", "Cumulative compute inference duration in microseconds "
     "(does not include cached requests)", lambda c: c.compute_infer_ns // 1000),
    ("nv_inference_compute_output_duration_us", "counter", "Cumulative inference compute output duration in "
     "microseconds (does not include cached requests)", lambda c: c.compute_output_ns // 1000),
    ("nv_inference_pending_request_count", "gauge", "Instantaneous number of pending requests awaiting execution "
     "per-model.", lambda c: c.pending),
)


class TritonCollector:
    """A prometheus_client collector that reads the counters at scrape time (no second copy of the figures)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap = sorted(self.metrics.snapshot().items())
        # Triton labels failures by reason (REJECTED, CANCELED, BACKEND, OTHER); abandoned requests are CANCELED.
        failures = CounterMetricFamily("nv_inference_request_failure", "Number of failed inference requests, all "
                                       "batch sizes", labels=("model", "reason", "version"))
        for (model, version), c in snap:
            for reason in FAILURE_REASONS:
                failures.add_metric((model, reason, version), c.failure_reasons[reason])
        yield failures
        if self.metrics.worker is not None:
            restarts = CounterMetricFamily("lstm_onnx_worker_restarts", "Times the parent restarted this worker "
                                           "after it died", labels=("worker",))
            restarts.add_metric((str(self.metrics.worker),), self.metrics.worker_restarts)
            yield restarts
        store = self.metrics.sequence_store
        if store is not None:
            labels = ("store",)
            for name, help_text, value in (
                    ("lstm_onnx_sequence_store_round_trips", "Round trips to the sequence store (one pipeline "
                     "each)", store.round_trips),
                    ("lstm_onnx_sequence_store_commands", "Commands sent to the sequence store (reads, "
                     "compare-and-sets, abandon marks)", store.commands),
                    ("lstm_onnx_sequence_store_reads", "Sequence steps that read their state from the store",
                     getattr(store, "reads", 0)),
                    ("lstm_onnx_sequence_store_copy_hits", "Sequence steps that ran on this process's copy of the "
                     "state it last wrote, with no read (Redis invalidates the copy when another process writes)",
                     getattr(store, "copy_hits", 0))):
                family = CounterMetricFamily(name, help_text, labels=labels)
                family.add_metric((store.name,), value)
                yield family
            up = GaugeMetricFamily("lstm_onnx_sequence_store_up", "1 while the sequence store answered its last "
                                   "command, else 0", labels=labels)
            up.add_metric((store.name,), 1 if store.healthy else 0)
            yield up
        for name, kind, help_text, value in FAMILIES:
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = family_type(name, help_text, labels=("model", "version"))
            for (model, version), c in snap:
                family.add_metric((model, version), value(c))
            yield family


def metrics_application(metrics: Metrics) -> web.Application:
    """GET /metrics answers prometheus_client's text exposition; any other path is a 404."""

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def not_found(request: web.Request) -> web.Response:
        return web.Response(status=404, text="not found: try /metrics\n")

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


async def start_metrics_server(metrics: Metrics, host: str, port: int, limits: HttpLimits) -> HttpSite:
    """The metrics port on aiohttp, on the running event loop (no thread); plaintext, as Triton's."""
    return await HttpSite(metrics_application(metrics), limits).start(host, port)
