"""Triton's perf_analyzer (from the tritonclient wheel) drives our server unchanged: gRPC, streamed sequences and
REST, and its CSV report reads the server-side statistics it takes from ModelStatistics."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import missing_tool

MODEL = "tiny_lstm"
# Generous stability settings: this machine is shared, and the test checks that the tool works, not speed.
STEADY = ["-p", "500", "-s", "1000", "--max-trials", "3"]


def _perf_analyzer() -> tuple[str, dict]:
    exe = shutil.which("perf_analyzer", path=str(Path(sys.executable).parent))
    if exe is None:
        missing_tool("perf_analyzer is not installed (it ships in the tritonclient wheel: the test extra)")
    try:
        import nvidia.cuda_runtime
    except ImportError:
        missing_tool("perf_analyzer loads libcudart even against a CPU server: pip nvidia-cuda-runtime-cu12 "
                     "(the test extra)")
    lib = str(Path(nvidia.cuda_runtime.__path__[0]) / "lib")
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(p for p in (lib, os.environ.get("LD_LIBRARY_PATH")) if p))
    probe = subprocess.run([exe, "--help"], capture_output=True, text=True, env=env, timeout=60)
    if "error while loading shared libraries" in probe.stderr:
        missing_tool(f"perf_analyzer cannot start: {probe.stderr.strip().splitlines()[-1]} (apt libb64-0d)")
    return exe, env


@pytest.fixture(scope="module")
def server(tiny_repository):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    with BackgroundServer(ServerSettings(model_repository=str(tiny_repository), grpc_port=0, http_port=0,
                                         metrics_port=-1)) as srv:
        yield srv


def _run(server, tmp_path: Path, name: str, *args: str) -> list[dict]:
    exe, env = _perf_analyzer()
    report = tmp_path / f"{name}.csv"
    proc = subprocess.run([exe, "-m", MODEL, *args, "--concurrency-range", "1:4:3", *STEADY, "-f", str(report)],
                          capture_output=True, text=True, env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "must be the same" not in output, output[-3000:]
    with report.open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["Concurrency"]) for r in rows) == [1, 4], rows
    for row in rows:
        assert float(row["Inferences/Second"]) > 0, row
        # The server-side phases perf_analyzer read from ModelStatistics: compute time was measured.
        assert int(row["Server Compute Infer"]) > 0, row
        assert int(row["Server Compute Input"]) >= 0 and int(row["Server Compute Output"]) >= 0, row
    return rows


def test_perf_analyzer_over_grpc(server, tmp_path):
    _run(server, tmp_path, "grpc", "-u", server.url, "-i", "grpc", "--shape", "input:50,1")


def test_perf_analyzer_streams_sequences(server, tmp_path):
    # The model's config has sequence_batching: perf_analyzer sends correlation ids with start and end flags,
    # 10 requests per sequence, over ModelStreamInfer; the server carries the state between them.
    rows = _run(server, tmp_path, "stream", "-u", server.url, "-i", "grpc", "--shape", "input:5,1",
                "--streaming", "--sequence-length", "10")
    assert len(rows) == 2
    # perf_analyzer ends every sequence it starts (sequence_end on its last request), so none is left live.
    assert len(server.running.scheduler.sequences) == 0, "sequences left live after perf_analyzer ended them"


def test_perf_analyzer_over_rest(server, tmp_path):
    _run(server, tmp_path, "http", "-u", server.http_url, "-i", "http", "--shape", "input:50,1")


def test_bench_perf_analyzer_row(server):
    """`make bench`'s perf_analyzer row: the figures and the page's lines, from a real run."""
    _perf_analyzer()
    from bench import perf_analyzer
    from bench.report import perf_analyzer_lines

    result = perf_analyzer.measure(server.url, MODEL, "input:5,1", [1, 2], interval_ms=300, stability_percent=1000)
    assert "error" not in result, result
    assert [r["concurrency"] for r in result["rows"]] == [1, 2] and all(r["rps"] > 0 for r in result["rows"])
    lines = perf_analyzer_lines({"perf_analyzer": {"ours": result}, "batching_on": [
        {"concurrency": 1, "rps": 100.0, "p50_ms": 1.0, "p99_ms": 2.0}]})
    assert sum(line.startswith("| perf_analyzer | ours |") for line in lines) == 2
    assert any(line.startswith("| our load generator | ours | 1 | 100 |") for line in lines)
    broken = perf_analyzer.measure("127.0.0.1:1", MODEL, "input:5,1", [1], interval_ms=300)
    assert broken["error"].startswith("exit "), broken
