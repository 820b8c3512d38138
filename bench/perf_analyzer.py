"""Triton's perf_analyzer (from the tritonclient wheel) against a server, beside our own load generator.

`measure(url, model, ...)` runs it at the given concurrencies and returns its CSV rows as figures, or the reason
it could not run. It needs apt libb64-0d and pip nvidia-cuda-runtime-cu12 (libcudart, loaded even for CPU work).
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def command() -> tuple[str, dict] | str:
    """The perf_analyzer executable and the environment it needs, or why there is none."""
    exe = shutil.which("perf_analyzer", path=str(Path(sys.executable).parent)) or shutil.which("perf_analyzer")
    if exe is None:
        return "perf_analyzer is not installed (tritonclient wheel)"
    try:
        import nvidia.cuda_runtime
    except ImportError:
        return "perf_analyzer needs libcudart: pip install nvidia-cuda-runtime-cu12"
    lib = str(Path(nvidia.cuda_runtime.__path__[0]) / "lib")
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(p for p in (lib, os.environ.get("LD_LIBRARY_PATH")) if p))
    return exe, env


def measure(url: str, model: str, shape: str, levels: list[int], protocol: str = "grpc", interval_ms: int = 2000,
            stability_percent: int = 25, extra: tuple[str, ...] = ()) -> dict:
    """perf_analyzer at each concurrency in `levels` (the first and last, with one step between):
    {"rows": [...]} from its CSV, or {"error": "..."} naming the levels it could not measure."""
    found = command()
    if isinstance(found, str):
        return {"error": found}
    exe, env = found
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        argv = [exe, "-m", model, "-u", url, "-i", protocol, "--shape", shape, "--concurrency-range",
                f"{levels[0]}:{levels[-1]}:{max(1, levels[-1] - levels[0])}" if len(levels) > 1 else str(levels[0]),
                "-p", str(interval_ms), "-s", str(stability_percent), "--max-trials", "5", "-f", str(report), *extra]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        last = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()][-1:]
        if proc.returncode != 0 or not report.exists():
            return {"error": f"exit {proc.returncode}: {last[0] if last else 'no output'}", "argv": argv[1:]}
        with report.open() as f:
            rows = [{"concurrency": int(r["Concurrency"]), "rps": float(r["Inferences/Second"]),
                     "p50_ms": int(r["p50 latency"]) / 1e3, "p99_ms": int(r["p99 latency"]) / 1e3,
                     "server_queue_us": int(r["Server Queue"]), "server_input_us": int(r["Server Compute Input"]),
                     "server_infer_us": int(r["Server Compute Infer"]),
                     "server_output_us": int(r["Server Compute Output"])} for r in csv.DictReader(f)]
    wanted = sorted({levels[0], levels[-1]})
    if sorted(r["concurrency"] for r in rows) != wanted:  # it stops at the first level it cannot stabilise
        measured = sorted(r["concurrency"] for r in rows)
        return {"error": f"measured concurrency {measured} of {wanted}: {last[0] if last else ''}", "rows": rows,
                "argv": argv[1:]}
    return {"rows": rows, "argv": argv[1:]}
