"""Bounded resources, measured on the real server: `python -m bench.fairness [--quick] [--baseline]`.

- fairness: a short client's [1, 10, F] latency idle, then while another client sends [1, 500000, F] back to back
  (ratio p99 loaded / p99 idle, same run);
- memory: server RSS idle, after one long request, after a run near the budget;
- arena: c1 p50 of [1, 50, F] with onnxruntime's CPU arena on and off (two servers, alternated);
- mixed: one long request running, then [1, 100000, F] and 31 x [1, 10, F] at once (the issue's finding);
- ragged: c8/c1 req/s for mixed lengths 10..50 and for equal length 30, as in bench/suite.py.

--baseline runs what the code before the budget supports (no new flags) for the before/after tables.
Prints one JSON object; docs/benchmarks.md ("Bounded resources") quotes it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.models import build_repository
from bench.processes import start_model_server
from bench.suite import _levels_async
from lstm_onnx.client import loadgen
from lstm_onnx.client.client import InferenceClient

MODEL = dict(cell="lstm", input_size=1, hidden_size=32, num_layers=2, num_outputs=4)  # the findings model


def _latencies(url: str, steps: int, seconds: float, limit: int) -> list[float]:
    """Sequential [1, steps, 1] requests for `seconds` (at most `limit`); each one's latency in ms."""
    x = np.random.default_rng(0).standard_normal((1, steps, 1)).astype(np.float32)
    out = []
    with InferenceClient(url) as client:
        for _ in range(20):
            client.infer("lstm", {"input": x})
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and len(out) < limit:
            t = time.perf_counter()
            client.infer("lstm", {"input": x})
            out.append((time.perf_counter() - t) * 1e3)
    return out


def _summary(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": ordered[min(len(ms) - 1, int(0.99 * len(ms)))]}


def measure_fairness(url: str, long_steps: int, seconds: float, rounds: int) -> dict:
    """Idle and loaded windows alternated `rounds` times (the machine's load drifts; alternating shares it out),
    latencies pooled per phase."""
    idle_ms, loaded_ms, long_runs = [], [], []
    x = np.random.default_rng(1).standard_normal((1, long_steps, 1)).astype(np.float32)
    for _ in range(rounds):
        idle_ms += _latencies(url, 10, seconds, 5000)
        stop = threading.Event()

        def hammer():
            with InferenceClient(url, timeout_s=300) as client:
                while not stop.is_set():
                    t = time.perf_counter()
                    client.infer("lstm", {"input": x})
                    long_runs.append(time.perf_counter() - t)

        thread = threading.Thread(target=hammer, daemon=True)
        thread.start()
        time.sleep(0.5)  # the long client's first request is in the model
        try:
            loaded_ms += _latencies(url, 10, seconds, 5000)
        finally:
            stop.set()
            thread.join(300)  # its last long request ends before the next idle window
    idle, loaded = _summary(idle_ms), _summary(loaded_ms)
    return {"long_steps": long_steps, "rounds": rounds, "idle": idle, "loaded": loaded,
            "long_requests": len(long_runs), "long_s_mean": statistics.mean(long_runs) if long_runs else None,
            "p99_ratio": loaded["p99_ms"] / idle["p99_ms"], "p50_ratio": loaded["p50_ms"] / idle["p50_ms"]}


def measure_mixed(server, url: str, long_steps: int, short: int) -> dict:
    """The issue's case: a long request keeps the model busy, then another long one and `short` [1, 10, 1]
    requests arrive together; each short one's latency, and the server's peak RSS (VmHWM)."""
    import asyncio

    from lstm_onnx.protocol.codec import encode_request
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    rng = np.random.default_rng(2)
    longs = [encode_request("lstm", {"input": rng.standard_normal((1, long_steps, 1)).astype(np.float32)})
             for _ in range(2)]
    shorts = [encode_request("lstm", {"input": rng.standard_normal((1, 10, 1)).astype(np.float32)})
              for _ in range(short)]

    async def go():
        async with loadgen.open_channel(url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def timed(request):
                t = time.perf_counter()
                await stub.ModelInfer(request, timeout=300)
                return (time.perf_counter() - t) * 1e3

            busy = asyncio.ensure_future(timed(longs[0]))
            await asyncio.sleep(0.05)  # the first long request is running
            results = await asyncio.gather(*(timed(r) for r in [longs[1], *shorts]))
            return await busy, results

    rss_before = server.rss_mb()
    first, results = asyncio.run(go())
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    peak = next(int(line.split()[1]) * 1024 / 1e6 for line in status.splitlines() if line.startswith("VmHWM:"))
    short_ms = results[1:]
    return {"long_steps": long_steps, "short_requests": short, "rss_before_mb": rss_before, "peak_rss_mb": peak,
            "rss_after_mb": server.rss_mb(), "long_ms": [first, results[0]],
            "short_p50_ms": statistics.median(short_ms), "short_max_ms": max(short_ms)}


def measure_memory(server, url: str, rows: int, steps: int) -> dict:
    """RSS idle, then after one [rows, steps, 1] request: its peak stays (arena) or comes back."""
    before = server.rss_mb()
    x = np.zeros((rows, steps, 1), np.float32)
    with InferenceClient(url, timeout_s=300) as client:
        try:
            client.infer("lstm", {"input": x})
            answered = "ok"
        except Exception as exc:  # refused by the budget: that is the figure
            answered = str(exc)[:200]
    time.sleep(0.5)
    return {"shape": [rows, steps, 1], "rss_before_mb": before, "rss_after_mb": server.rss_mb(), "answer": answered}


def measure_arena(repo: Path, model_path: Path, seconds: float, requests: int, rounds: int) -> dict:
    p50 = {"on": [], "off": []}
    for _ in range(rounds):
        for arena in ("on", "off"):
            with start_model_server(repo, "--cpu-memory-arena", arena) as server:
                row = _levels_async(server.url, "lstm", [1], seconds, requests, [50], model_path)[0]
                p50[arena].append(row["p50_ms"])
    return {k: {"p50_ms": v, "best_p50_ms": min(v)} for k, v in p50.items()} | {
        "off_over_on": min(p50["off"]) / min(p50["on"])}


def measure_ragged(url: str, model_path: Path, seconds: float, requests: int) -> dict:
    mixed = loadgen.parse_times("10:50")
    equal = _levels_async(url, "lstm", [1, 8], seconds, requests, [30], model_path)
    ragged = _levels_async(url, "lstm", [1, 8], seconds, requests, mixed, model_path)
    return {"equal_gain": equal[1]["rps"] / equal[0]["rps"], "mixed_gain": ragged[1]["rps"] / ragged[0]["rps"],
            "equal": equal, "mixed": ragged}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short levels and a 50k-step long request")
    parser.add_argument("--baseline", action="store_true", help="no new flags: the code before the budget")
    parser.add_argument("--only", default="fairness,mixed,memory,arena,ragged", help="comma-separated sections")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lstm-onnx-bench" / "fairness"))
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    seconds, requests = (1.0, 500) if args.quick else (6.0, 5000)
    repo = build_repository(Path(args.work), {"lstm": MODEL})
    model_path = repo / "lstm" / "1" / "model.onnx"
    figures: dict = {"uptime": os.popen("uptime").read().strip(), "baseline": args.baseline, "model": MODEL}
    with start_model_server(repo) as server:
        if "fairness" in only:
            figures["fairness"] = measure_fairness(server.url, 50_000 if args.quick else 500_000, seconds / 2,
                                                   1 if args.quick else 3)
            print(json.dumps({"fairness": figures["fairness"]}), file=sys.stderr)
        if "ragged" in only:
            figures["ragged"] = measure_ragged(server.url, model_path, seconds, requests)
    if "mixed" in only:
        with start_model_server(repo) as server:
            figures["mixed"] = measure_mixed(server, server.url, 100_000, 31)
    if "memory" in only:
        for rows, steps in ((1, 500_000), (64, 20_000), (64, 50_000)):
            with start_model_server(repo) as server:
                figures.setdefault("memory", []).append(measure_memory(server, server.url, rows, steps))
    if "arena" in only and not args.baseline:
        figures["arena"] = measure_arena(repo, model_path, seconds, requests, 1 if args.quick else 2)
    figures["uptime_end"] = os.popen("uptime").read().strip()
    print(json.dumps(figures, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
