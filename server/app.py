"""Assembles and runs the server: repository, scheduler, grpc.aio with health and reflection, REST, metrics, drain."""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from lstm_onnx import protos
from lstm_onnx.protos import grpc_service_pb2 as pb

from . import tls
from .handlers import add_inference_servicer
from .http_site import HttpLimits, HttpSite, ssl_context
from .memory import fix_mmap_threshold
from .metrics import Metrics, start_metrics_server
from .redis_store import open_store
from .repository import Repository
from .rest import RestApi
from .runtime import RuntimeOptions
from .scheduler import AdmissionLimits, Scheduler
from .sequences import SequenceStore
from .servicer import InferenceServicer
from .settings import ServerSettings

log = logging.getLogger("lstm_onnx.server")

QUIET_S = 0.25  # on drain, how long no request must arrive before the port closes (bounded by the grace period)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
STORE_HEALTH = "lstm_onnx.SequenceStore"  # health service name that reports the shared sequence store (Redis)


@dataclass
class RunningServer:
    """A started server: its parts and the ports it actually bound (port 0 picks free ones)."""

    settings: ServerSettings
    repository: Repository
    scheduler: Scheduler
    grpc_server: grpc.aio.Server
    health: health_aio.HealthServicer
    grpc_port: int
    metrics_port: int | None
    executor: ThreadPoolExecutor
    servicer: InferenceServicer | None = None
    metrics_server: HttpSite | None = None
    http_server: HttpSite | None = None  # the REST port, None when http_port is -1
    _tasks: list[asyncio.Task] = field(default_factory=list)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new requests (UNAVAILABLE), let in-flight ones finish within the grace period."""
        grace = self.settings.grace_period_s if grace is None else grace
        self.scheduler.draining = True
        streams = self.servicer.open_streams if self.servicer else 0
        if self.servicer is not None:
            self.servicer.closing.set()  # each stream answers the request it holds, then ends with UNAVAILABLE
        await self.health.enter_graceful_shutdown()
        log.info("draining", extra={"fields": {"in_flight": self.scheduler.in_flight, "streams": streams,
                                               "grace_s": grace}})
        deadline = time.monotonic() + grace
        self.scheduler.last_refused = time.monotonic()
        # Close only once requests are done and clients have stopped sending (QUIET_S without a refusal): a
        # call still in transit when the port closes is cut by gRPC (CANCELLED), not refused.
        while time.monotonic() < deadline and (
                self.scheduler.in_flight or time.monotonic() - self.scheduler.last_refused < QUIET_S
                or (self.servicer is not None and self.servicer.open_streams)):
            await asyncio.sleep(0.01)
        # What the port's closing cuts: requests still running and streams still open (0 and 0 unless the grace
        # period ran out).
        unfinished, cut = self.scheduler.in_flight, self.servicer.open_streams if self.servicer else 0
        await self.grpc_server.stop(max(0.0, deadline - time.monotonic()))
        if self.http_server is not None:
            await self.http_server.close(max(0.0, deadline - time.monotonic()))
        for task in self._tasks:
            task.cancel()
        if hasattr(self.scheduler.sequences, "close"):
            await self.scheduler.sequences.close()
        if self.metrics_server is not None:
            await self.metrics_server.close(0.0)
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("stopped", extra={"fields": {
            "unfinished": unfinished, "streams_cut": cut, "refused": self.scheduler.refused_draining,
            "streams_closed": self.servicer.streams_closed if self.servicer else 0}})


def _add_to_pool(file_descriptor) -> None:
    """Copy a descriptor file (health, reflection) into the protos pool so reflection can describe it too."""
    from google.protobuf import descriptor_pb2

    try:
        protos.POOL.FindFileByName(file_descriptor.name)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto.FromString(file_descriptor.serialized_pb)
    protos.POOL.Add(proto)


class StartupError(RuntimeError):
    """The server cannot start as asked (port taken, no usable CUDA, a model that failed with --exit-on-error)."""


async def start_server(settings: ServerSettings, metrics: Metrics | None = None) -> RunningServer:
    """Load the repository and start gRPC, REST and metrics; returns once the server is SERVING. `metrics`: counters
    to serve (a worker's know its index and restarts), a fresh set when None.

    Raises StartupError with one line naming what failed; nothing is left running then.
    """
    started = time.perf_counter()
    fix_mmap_threshold()  # large run buffers go back to the OS when freed (server/memory.py)
    if settings.provider == "cuda":
        _check_cuda()
    executor = ThreadPoolExecutor(max_workers=settings.executor_threads, thread_name_prefix="ort")
    server = http_server = metrics_server = metrics_port = None
    try:
        options = RuntimeOptions(settings.provider, settings.intra_op_threads, settings.inter_op_threads,
                                 spinning=settings.intra_op_spinning == "on",
                                 max_run_memory_bytes=settings.max_run_memory_bytes,
                                 cpu_memory_arena=settings.cpu_memory_arena == "on")
        repository = Repository(Path(settings.model_repository), options, settings.max_batch_size,
                                settings.max_queue_delay_us, settings.max_model_bytes)
        repository.strict_readiness = settings.strict_readiness == "true"
        # Loading builds sessions and self-tests them: off the loop so a slow model does not block signals.
        await asyncio.get_running_loop().run_in_executor(executor, repository.load_all)
        problems = repository.problems()
        if problems and settings.exit_on_error == "true":
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise StartupError(f"{problems[0]}{more}; --exit-on-error false serves the models that loaded")
        metrics = Metrics() if metrics is None else metrics
        if any(v.runtime is not None and getattr(v.runtime, "provider", "cpu") == "cuda"
               for e in repository.models.values() for v in e.versions.values()):
            metrics.enable_gpu()
        sequences = open_store(settings.sequence_store, settings.max_sequences, settings.sequence_idle_timeout_s,
                               idle_timeouts=repository.sequence_idle_timeouts(),
                               max_per_client=settings.sequences_per_client,
                               copies=settings.sequence_store_copies == "true")
        admission = AdmissionLimits(settings.max_queued_requests_per_model, settings.max_queued_requests,
                                    settings.max_queued_bytes_per_model, settings.max_queued_bytes)
        scheduler = Scheduler(repository, executor, metrics, sequences, settings.request_timeout_s, admission)

        limits = [("grpc.max_send_message_length", settings.max_message_bytes),
                  ("grpc.max_receive_message_length", settings.max_message_bytes)]
        # Workers share one port on purpose; a single server must not silently share its port with another.
        limits.append(("grpc.so_reuseport", 1 if settings.workers > 1 else 0))
        server = grpc.aio.server(options=limits)
        servicer = InferenceServicer(repository, scheduler, settings.max_concurrent_streams,
                                     settings.streams_per_client, settings.stream_idle_timeout_s)
        add_inference_servicer(servicer, server)  # undecodable requests: INVALID_ARGUMENT, not UNKNOWN
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for file_descriptor in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
            _add_to_pool(file_descriptor)
        _enable_reflection(server)
        port = _bind_grpc(server, settings)
        await server.start()

        http_limits = HttpLimits(settings.max_message_bytes, settings.http_max_header_bytes,
                                 max_connections=settings.http_max_connections,
                                 client_timeout_s=settings.http_client_timeout_s)
        if settings.http_port >= 0:
            context = ssl_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca) if settings.tls_cert \
                else None
            try:
                http_server = await HttpSite(RestApi(servicer, http_limits).application(), http_limits).start(
                    settings.host, settings.http_port, context, reuse_port=settings.workers > 1)
            except OSError as exc:
                raise StartupError(f"REST port {settings.host}:{settings.http_port}: cannot bind "
                                   f"({exc.strerror or exc}); choose another with --http-port, or -1 for none") from None
        if settings.metrics_port >= 0:
            try:
                metrics_server = await start_metrics_server(metrics, settings.host, settings.metrics_port, http_limits)
            except OSError as exc:
                raise StartupError(f"metrics port {settings.host}:{settings.metrics_port}: cannot bind "
                                   f"({exc.strerror or exc}); choose another with --metrics-port, or -1 for none") from None
            metrics_port = metrics_server.port
    except BaseException:
        if server is not None:  # stop it on this loop: otherwise grpc.aio's finaliser runs after the loop closed
            await server.stop(None)
        if http_server is not None:
            await http_server.close(0.0)
        executor.shutdown(wait=False, cancel_futures=True)
        raise

    status = health_pb2.HealthCheckResponse.SERVING if repository.ready else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
    if hasattr(sequences, "check"):
        # The shared store's state under a health service of its own: stateless requests go on while it is down,
        # so the server's own status (what readiness probes ask) does not follow it.
        def on_health(up: bool) -> None:
            asyncio.get_running_loop().create_task(health_servicer.set(
                STORE_HEALTH, health_pb2.HealthCheckResponse.SERVING if up
                else health_pb2.HealthCheckResponse.NOT_SERVING))

        sequences.on_health = on_health
        metrics.sequence_store = sequences
        await health_servicer.set(STORE_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING)
        await sequences.check()
    running = RunningServer(settings, repository, scheduler, server, health_servicer, port, metrics_port, executor,
                            servicer, metrics_server, http_server)
    running._tasks.append(asyncio.get_running_loop().create_task(_evict_forever(sequences)))
    models = {f"{n}/{v}": ver.state for n, e in repository.models.items() for v, ver in e.versions.items()}
    log.info("serving", extra={"fields": {"grpc": f"{settings.host}:{port}", "tls": bool(settings.tls_cert), "metrics_port": metrics_port,
                                          "http_port": http_server.port if http_server else None,
                                          "ready": repository.ready, "models": models,
                                          "startup_s": round(time.perf_counter() - started, 3)}})
    return running


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Server reflection v1alpha and v1 (grpcurl asks v1 first). grpcio-reflection ships only v1alpha; v1 is the
    same messages in another package, so the one servicer answers both."""
    names = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.aio.ReflectionServicer(names, pool=protos.POOL)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),))


def _bind_grpc(server: grpc.aio.Server, settings: ServerSettings) -> int:
    address = f"{settings.host}:{settings.grpc_port}"
    hint = " (Triton's default port: another server may hold it)" if settings.grpc_port == 8001 else ""
    refusal = (f"gRPC port {address}: cannot bind, it is in use or not an address of this machine{hint}; "
               "choose another with --grpc-port (0 picks a free one)")
    if settings.workers == 1 and _port_taken(settings.host, settings.grpc_port):
        raise StartupError(refusal)  # found before grpc tries, which would log its own error line first
    try:
        if settings.tls_cert:
            port = server.add_secure_port(address, tls.server_credentials(settings.tls_cert, settings.tls_key,
                                                                          settings.tls_client_ca))
        else:
            port = server.add_insecure_port(address)
            if not _is_loopback(settings.host):
                log.warning("plaintext gRPC on a non-loopback address", extra={"fields": {"host": settings.host}})
    except RuntimeError:  # grpc's "Failed to bind to address ..."
        port = 0
    if port == 0:
        raise StartupError(refusal)
    return port


def _port_taken(host: str, port: int) -> bool:
    """Whether another socket holds host:port (a probe bind, closed at once; 0 is never taken)."""
    import errno
    import socket

    if port == 0:
        return False
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False  # grpc reports an unresolvable host itself
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def _check_cuda() -> None:
    """--provider cuda must mean CUDA: refuse to start rather than serve nothing ready."""
    import onnxruntime as ort

    from .runtime import CUDA, cuda_device_present

    available = ort.get_available_providers()
    if CUDA not in available:
        raise StartupError(f"provider cuda: this onnxruntime has only {', '.join(available)}; install "
                           "onnxruntime-gpu (the gpu extra), or use --provider auto or cpu")
    if not cuda_device_present():
        raise StartupError("provider cuda: onnxruntime-gpu is installed but no NVIDIA driver or device is visible "
                           "(/dev/nvidiactl, /proc/driver/nvidia/version); use --provider auto or cpu")


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


async def _evict_forever(sequences: SequenceStore) -> None:
    period = min(1.0, sequences.shortest_idle_timeout_s / 2)
    while True:
        await asyncio.sleep(period)
        sequences.evict_idle()
        if hasattr(sequences, "check"):  # Redis: the store's health, and a reconnect when it is back
            await sequences.check()


async def serve(settings: ServerSettings) -> None:
    """Run until SIGTERM or SIGINT, then drain within the grace period."""
    running = await start_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received", extra={"fields": {"grace_s": settings.grace_period_s}})
    await running.stop()


def run_event_loop(main, kind: str = "auto"):
    """Run a coroutine to completion on the chosen loop: uvloop (when `kind` is uvloop, or auto and installed)
    or asyncio's own."""
    factory = None
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise OSError("event_loop uvloop: uvloop is not installed (pip install uvloop)") from None
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


class BackgroundServer:
    """The real server on its own event loop in a thread (tests, embedding): `with BackgroundServer(s) as srv:`."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
        self.running: RunningServer | None = None

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        self.running = asyncio.run_coroutine_threadsafe(start_server(self.settings), self.loop).result(timeout=120)
        return self

    @property
    def url(self) -> str:
        return f"{self.settings.host}:{self.running.grpc_port}"

    @property
    def http_url(self) -> str:
        """host:port of the REST port (http_port must not be -1)."""
        return f"{self.settings.host}:{self.running.http_server.port}"

    def call(self, coroutine, timeout: float = 60):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=timeout)

    def __exit__(self, *exc) -> None:
        if self.running is not None:
            self.call(self.running.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
