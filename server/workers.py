"""Several server processes on one gRPC port (SO_REUSEPORT): start, wait until all serve, drain all on SIGTERM.

The kernel spreads new connections over the processes; a connection, so every stream and every sequence sent on
it, stays on the process that accepted it. Each process has its own models, batcher and sequence store, so the
limits on streams and sequences are per worker. A worker that dies while serving is restarted in its slot; the
others keep serving, and the new one's metrics count the restarts of its slot (lstm_onnx_worker_restarts).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import signal
import socket
import time
from multiprocessing.connection import Connection, wait

from .settings import ServerSettings

log = logging.getLogger("lstm_onnx.server")

START_TIMEOUT_S = 120.0  # loading and self-testing every model of a large repository can take a while
EXIT_MARGIN_S = 15.0  # after the grace period, how long a draining worker gets before it is killed


class WorkerFailed(RuntimeError):
    """A worker could not start, or one exited while the others served."""


def worker_settings(settings: ServerSettings, index: int, grpc_port: int) -> ServerSettings:
    """The settings of worker `index`: the shared gRPC port, and metrics on metrics_port + index (0: a free port
    each, -1: none)."""
    metrics = settings.metrics_port + index if settings.metrics_port > 0 else settings.metrics_port
    return dataclasses.replace(settings, grpc_port=grpc_port, metrics_port=metrics)


def _reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket: it fixes the port the workers share when port 0 was asked
    for, and gets no connections itself because it never listens."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    return sock


def _worker_main(settings: ServerSettings, index: int, ready: Connection, restarts: int = 0) -> None:
    """Entry point of one worker process (spawned): serve until SIGTERM/SIGINT, then drain."""
    from .logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    for handler in logging.getLogger("lstm_onnx").handlers:
        handler.addFilter(_WorkerField(index))
    try:
        from .app import run_event_loop

        run_event_loop(_serve_worker(settings, ready, index, restarts), settings.event_loop)
    except Exception as exc:  # the parent reports it in one line
        ready.send(("failed", f"worker {index}: {type(exc).__name__}: {exc}".splitlines()[0]))
        raise SystemExit(1) from None


async def _serve_worker(settings: ServerSettings, ready: Connection, index: int, restarts: int) -> None:
    from .app import start_server
    from .metrics import Metrics

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_server(settings, Metrics(worker=index, worker_restarts=restarts))
    ready.send(("ready", running.metrics_port))
    await stop.wait()
    await running.stop()


class _WorkerField(logging.Filter):
    """Adds worker=<index> to every log line, so interleaved lines of the workers can be told apart."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {**(getattr(record, "fields", None) or {}), "worker": self.index}
        return True


def run_workers(settings: ServerSettings) -> int:
    """Run settings.workers server processes until SIGTERM/SIGINT; 0 when all drained and exited cleanly."""
    reserved = _reserve_port(settings.host, settings.grpc_port)
    port = reserved.getsockname()[1]
    context = multiprocessing.get_context("spawn")  # no forked grpc or onnxruntime state in the workers
    stopping = False

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    processes, pipes = [], []
    restarts = [0] * settings.workers

    def spawn(index: int):
        parent_end, child_end = context.Pipe(duplex=False)
        process = context.Process(target=_worker_main, name=f"lstm-onnx-worker-{index}",
                                  args=(worker_settings(settings, index, port), index, child_end, restarts[index]))
        process.start()
        child_end.close()
        return process, parent_end

    try:
        for index in range(settings.workers):
            process, pipe = spawn(index)
            processes.append(process)
            pipes.append(pipe)
        metrics_ports = _wait_ready(processes, pipes, lambda: stopping)
        if metrics_ports is not None:
            log.info("workers serving", extra={"fields": {"grpc": f"{settings.host}:{port}",
                                                          "workers": settings.workers,
                                                          "pids": [p.pid for p in processes],
                                                          "metrics_ports": metrics_ports,
                                                          "limits_per_worker": {
                                                              "max_concurrent_streams": settings.max_concurrent_streams,
                                                              "max_sequences": settings.max_sequences}}})
            while not stopping:
                if not wait([p.sentinel for p in processes], timeout=0.2) or stopping:
                    continue
                for index, process in enumerate(processes):
                    if process.exitcode is None:
                        continue
                    # One worker's death must not take the others down: restart its slot. A worker that then fails
                    # to start raises WorkerFailed, so a broken repository does not restart forever.
                    log.warning("worker died, restarting it", extra={"fields": {
                        "worker": index, "pid": process.pid, "exit_code": process.exitcode}})
                    restarts[index] += 1
                    processes[index], pipes[index] = spawn(index)
                    ports = _wait_ready([processes[index]], [pipes[index]], lambda: stopping)
                    if ports is not None:
                        log.info("worker restarted", extra={"fields": {
                            "worker": index, "pid": processes[index].pid, "restarts": restarts[index],
                            "metrics_port": ports[0]}})
        log.info("signal received", extra={"fields": {"grace_s": settings.grace_period_s, "workers": len(processes)}})
        return 0 if _stop_all(processes, settings.grace_period_s) else 1
    except BaseException:
        _stop_all(processes, 0.0)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reserved.close()


def _wait_ready(processes, pipes, stopping) -> list | None:
    """Metrics ports of all workers once each reported ready; None if a signal came first; WorkerFailed if one
    failed to start."""
    metrics_ports: list = [None] * len(processes)
    waiting = set(range(len(processes)))
    deadline = time.monotonic() + START_TIMEOUT_S
    while waiting:
        if stopping():
            return None
        if time.monotonic() > deadline:
            raise WorkerFailed(f"workers {sorted(waiting)} not serving after {START_TIMEOUT_S:g} s")
        for index in list(waiting):
            if pipes[index].poll(0.05):
                try:
                    kind, value = pipes[index].recv()
                except EOFError:
                    kind, value = "failed", f"worker {index}: exited with code {processes[index].exitcode} at start"
                if kind == "failed":
                    raise WorkerFailed(value)
                metrics_ports[index] = value
                waiting.discard(index)
    return metrics_ports


def _stop_all(processes, grace_s: float) -> bool:
    """SIGTERM every live worker (each drains within the grace period); kill those still alive after it.
    True when every worker exited with code 0."""
    for process in processes:
        if process.exitcode is None:
            process.terminate()
    deadline = time.monotonic() + grace_s + EXIT_MARGIN_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            log.warning("worker killed after the grace period", extra={"fields": {"pid": process.pid}})
            process.kill()
            process.join()
    return all(p.exitcode == 0 for p in processes)
