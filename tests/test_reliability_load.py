"""Shortened soak and fault runs (the full ones are `make reliability`): nothing lost, nothing wrong, nothing leaked."""
from __future__ import annotations

import asyncio
import time

import pytest
from reliability.faults import (
    ServerProcess,
    inject_client_faults,
    resident_bytes,
    run_fragile_model,
    set_sequence_idle,
    sigterm_under_load,
    write_fragile_model,
)
from reliability.fuzz import shape_of_repository
from reliability.soak import SoakClients, build_cases

MODEL = "tiny_lstm"
MESSAGE_BYTES = 1 << 20


async def _live_tasks() -> int:
    return len(asyncio.all_tasks())


def _settle(srv, want_sequences: int = 0, timeout_s: float = 10.0) -> tuple[int, int]:
    """Wait until the server holds no request and at most `want_sequences` sequences; returns (sequences, in flight)."""
    scheduler = srv.running.scheduler
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and (scheduler.in_flight or len(scheduler.sequences) > want_sequences):
        time.sleep(0.05)
    return len(scheduler.sequences), scheduler.in_flight


def _tasks_settled(srv, at_most: int, timeout_s: float = 5.0) -> int:
    """Live tasks on the server loop, polled until at most `at_most` (a call finishing may hold one briefly)."""
    end = time.monotonic() + timeout_s
    count = srv.call(_live_tasks())
    while count > at_most and time.monotonic() < end:
        time.sleep(0.05)
        count = srv.call(_live_tasks())
    return count


@pytest.fixture(scope="module")
def repository(tmp_path_factory, tiny_repository):
    import shutil

    repo = tmp_path_factory.mktemp("load") / "repo"
    shutil.copytree(tiny_repository, repo)
    write_fragile_model(repo)
    set_sequence_idle(repo, 0.5)  # config.pbtxt's idle timeout wins over the server's setting
    return repo


@pytest.fixture(scope="module")
def server(repository):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    settings = ServerSettings(model_repository=str(repository), grpc_port=0, metrics_port=-1, http_port=-1,
                              max_message_bytes=MESSAGE_BYTES, executor_threads=2, sequence_idle_timeout_s=0.5)
    with BackgroundServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def cases(repository):
    shape = shape_of_repository(repository, MODEL, MESSAGE_BYTES)
    unary, sequences = build_cases(repository / MODEL / "1" / "model.onnx", shape, 24, seed=0)
    return shape, unary, sequences


def test_soak_of_mixed_unary_and_streams_has_no_errors_and_leaks_nothing(server, cases, capsys):
    shape, unary, sequences = cases
    clients = SoakClients(server.url, shape, unary, sequences, stream_share=0.3)
    warm = asyncio.run(clients.run(clients=64, requests=300, time_limit_s=60, seed=1))
    assert warm.errors == 0 and warm.wrong == 0, warm.samples
    _settle(server)
    tasks_before, rss_before = server.call(_live_tasks()), resident_bytes()
    result = asyncio.run(clients.run(clients=64, requests=2000, time_limit_s=120, seed=2))
    live, in_flight = _settle(server)
    tasks_after, rss_after = _tasks_settled(server, tasks_before), resident_bytes()
    with capsys.disabled():
        print(f"\n[reliability] soak: {result.sent} requests, {result.errors} errors, {result.wrong} wrong, "
              f"rss {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB, tasks {tasks_before} -> {tasks_after}, "
              f"{result.sent / result.seconds:.0f} req/s")
    assert result.sent >= 2000 and result.answered == result.sent, result.samples
    assert result.errors == 0 and result.wrong == 0, result.samples
    assert live == 0 and in_flight == 0, f"{live} sequences and {in_flight} requests still held after the soak"
    assert tasks_after <= tasks_before, f"server loop tasks grew from {tasks_before} to {tasks_after}"
    assert rss_after <= rss_before * 1.10, f"resident memory grew {rss_before} -> {rss_after} bytes (> 10%)"


def test_client_faults_leave_the_server_healthy_and_free_what_they_held(server, cases, capsys):
    shape, unary, sequences = cases
    _settle(server)
    tasks_before = server.call(_live_tasks())
    result = asyncio.run(inject_client_faults(server.url, shape, unary, sequences, count=80, seed=3))
    with capsys.disabled():
        print(f"\n[reliability] client faults: injected {result.injected}, survived {result.survived}")
    assert result.injected == result.survived, result.samples
    assert all(result.injected[k] == 20 for k in result.injected), result.injected
    # Dropped streams and never-ended sequences hold state until the idle timeout (0.5 s here) evicts them.
    live, in_flight = _settle(server, want_sequences=0, timeout_s=10)
    assert live == 0 and in_flight == 0, f"{live} sequences, {in_flight} requests still held after idle eviction"
    assert _tasks_settled(server, tasks_before) <= tasks_before


def test_a_model_run_that_raises_fails_only_its_own_request(server):
    result = asyncio.run(run_fragile_model(server.url, rounds=12, seed=4))
    assert result.survived == result.injected, result.samples


def test_sigterm_under_load_answers_or_refuses_every_request_and_cuts_none(repository, cases, capsys):
    shape, unary, sequences = cases
    process = ServerProcess(repository, "--grace-period-s", "10")
    try:
        result = asyncio.run(sigterm_under_load(process, shape, unary, sequences, clients=12, term_after_s=1.5))
    finally:
        process.stop()
    with capsys.disabled():
        print(f"\n[reliability] SIGTERM under load: {result.answered} answered, {result.refused} refused cleanly, "
              f"{result.cut} cut, {result.status_lost} with the status lost by grpc.aio (grpc/grpc#36066), "
              f"{result.wrong} wrong, exit {result.exit_code}")
    assert result.answered > 0 and result.refused > 0, result
    assert result.cut == 0 and result.wrong == 0, result.samples
    assert result.exit_code == 0
    stopped = process.events("stopped")
    assert stopped and stopped[-1].get("unfinished") == 0, process.lines[-5:]
    # A lost status is the client's artefact only if the server ended that stream cleanly: none cut by the port.
    assert stopped[-1].get("streams_cut") == 0, process.lines[-5:]
