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
    rows.sort(key=lambda r: r["concurrency"])  # its CSV is ordered by throughput, not by level
    wanted = sorted({levels[0], levels[-1]})
    if sorted(r["concurrency"] for r in rows) != wanted:  # it stops at the first level it cannot stabilise
        measured = sorted(r["concurrency"] for r in rows)
        return {"error": f"measured concurrency {measured} of {wanted}: {last[0] if last else ''}", "rows": rows,
                "argv": argv[1:]}
    return {"rows": rows, "argv": argv[1:]}


BEGIN, END = "<!-- perf-analyzer:begin -->", "<!-- perf-analyzer:end -->"


def run_standalone(work: Path, top: int = 64, seconds: float = 3.0, log=print) -> dict:
    """Our server (perf_analyzer and our load generator, alternated) and MLServer (perf_analyzer), same model."""
    import json as _json

    from bench import mlserver
    from bench.models import DEFAULT_MODEL, DEFAULT_TIME, build_repository
    from bench.processes import start_model_server
    from bench.rest import _uptime, grpc_levels

    repo = build_repository(work / "default", {"lstm": DEFAULT_MODEL})
    model_path = repo / "lstm" / "1" / "model.onnx"
    shape = f"input:{DEFAULT_TIME},{DEFAULT_MODEL['input_size']}"
    out: dict = {"uptime_start": _uptime(), "levels": [1, top], "shape": shape}
    with start_model_server(repo) as server:
        out["loadgen"] = grpc_levels(server.url, [1, top], seconds, model_path)
        # Shared cores: perf_analyzer's default 10% stability between windows is rarely met here, so 100%.
        out["ours"] = measure(server.url, "lstm", shape, [1, top], interval_ms=int(seconds * 1000),
                              stability_percent=100)
        log(f"perf_analyzer, ours: {out['ours']}")
    exe = mlserver.ensure_venv(log)
    if exe is None:
        out["mlserver"] = {"error": f"MLServer {mlserver.VERSION} could not be installed in {mlserver.venv_dir()}"}
    else:
        with mlserver.serve_model(model_path, work, log=log) as ml:
            out["mlserver"] = measure(ml.url, "lstm", shape, [1, top], interval_ms=int(seconds * 1000))
            settings = _json.loads((work / "mlserver-lstm" / "settings.json").read_text())
            out["mlserver"]["http"] = measure(f"127.0.0.1:{settings['http_port']}", "lstm", shape, [1],
                                              protocol="http", interval_ms=int(seconds * 1000))
        log(f"perf_analyzer, MLServer: {out['mlserver']}")
    out["uptime_end"] = _uptime()
    return out


def section(figures: dict) -> str:
    """The benchmark page's perf_analyzer section."""
    lines = [BEGIN, "## perf_analyzer (Triton's load tool) against our server and MLServer", "",
             f"Written by `python -m bench.perf_analyzer`: Triton's perf_analyzer (tritonclient wheel) over gRPC, "
             f"`--shape {figures['shape']}`, batch 1, `-p` 3 s windows, stability 100% (the cores are shared), against our server, then our own load "
             "generator on the same server process, then MLServer 1.7.1 on the same model file. Server columns are "
             "what perf_analyzer read from ModelStatistics (µs per request).", "",
             f"_Machine load (`uptime`): at the start `{figures['uptime_start']}`; at the end "
             f"`{figures['uptime_end']}`._", "",
             "| client | server | concurrency | req/s | p50 ms | p99 ms | queue µs | compute input µs | "
             "compute infer µs | compute output µs |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def rows(client: str, server: str, result: dict) -> None:
        if "error" in result:
            lines.append(f"| {client} | {server} | - | - | - | - | - | - | - | {result['error']} |")
        for r in result.get("rows", []):
            lines.append(f"| {client} | {server} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | "
                         f"{r['p99_ms']:.3f} | {r['server_queue_us']} | {r['server_input_us']} | "
                         f"{r['server_infer_us']} | {r['server_output_us']} |")

    rows("perf_analyzer (gRPC)", "ours", figures["ours"])
    for r in figures["loadgen"]:
        lines.append(f"| our load generator (gRPC) | ours | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.3f} "
                     f"| {r['p99_ms']:.3f} | | | | |")
    rows("perf_analyzer (gRPC)", "MLServer 1.7.1", figures["mlserver"])
    if "http" in figures["mlserver"]:
        rows("perf_analyzer (REST)", "MLServer 1.7.1", figures["mlserver"]["http"])
    lines += ["", END, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from bench.processes import ROOT

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lstm-onnx-bench" / "full"))
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    args = parser.parse_args(argv)
    figures = run_standalone(Path(args.work))
    page = Path(args.docs) / "benchmarks.md"
    text = section(figures)
    from bench.report import write_marked_section

    write_marked_section(page, text, BEGIN, END)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
