"""Int8 (export --quantize int8) against FP32, measured in the same run: in process and served.

In process: the exported FP32 model and its int8 model in onnxruntime (one intra-op thread each, the same
inputs), batch 1 and 32, T=50, hidden 256, with the end-to-end error of each against PyTorch FP32 beside
the timing. Served: `lstm-onnx serve` on a repository holding both, c1 p50 latency and c64 throughput.
Rounds alternate FP32 and int8 so that a change in machine load hits both; the figures are medians.

    python -m bench.quantized [--hidden 256] [--rounds 5] [--served-seconds 8] [--json FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from .inprocess import open_ort, time_call
from .models import DEFAULT_MODEL, DEFAULT_TIME, make_run


def _feed(batch: int, steps: int, features: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, steps, features)).astype(np.float32)


def _torch_outputs(run_dir: Path, x: np.ndarray) -> list[np.ndarray]:
    import torch

    from lstm_onnx.model.checkpoint import load_run

    net, _ = load_run(run_dir)
    with torch.no_grad():
        return [t.numpy() for t in net.eval()(torch.from_numpy(x))]


def measure_inprocess(run_dir: Path, fp32: Path, int8: Path, batches: list[int], steps: int, features: int,
                      hidden: int, layers: int, rounds: int) -> list[dict]:
    rows = []
    sessions = {"fp32": open_ort(fp32, threads=1), "int8": open_ort(int8, threads=1)}
    for batch in batches:
        x = _feed(batch, steps, features)
        zeros = np.zeros((batch, layers, hidden), np.float32)
        feed = {"input": x, "h0": zeros, "c0": zeros}
        expected = _torch_outputs(run_dir, x)
        errors = {}
        for name, session in sessions.items():
            got = session.run(None, feed)
            errors[name] = {out: float(np.abs(g.astype(np.float64) - e).max())
                            for out, g, e in zip(("output", "hn", "cn"), got, expected)}
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        for _ in range(rounds):
            for name, session in sessions.items():
                times[name].append(time_call(lambda s=session: s.run(None, feed), repeat=20, budget_s=3.0))
        fp32_ms, int8_ms = float(np.median(times["fp32"])), float(np.median(times["int8"]))
        rows.append({"batch": batch, "time": steps, "fp32_ms": fp32_ms, "int8_ms": int8_ms,
                     "speedup": fp32_ms / int8_ms, "fp32_error": errors["fp32"], "int8_error": errors["int8"]})
        print(f"in process  batch {batch:>2} T {steps}: FP32 {fp32_ms:8.3f} ms  int8 {int8_ms:8.3f} ms  "
              f"int8 {fp32_ms / int8_ms:.2f}x faster; max |error| vs PyTorch FP32: FP32 "
              f"{max(errors['fp32'].values()):.1e}, int8 {max(errors['int8'].values()):.1e} "
              f"(output {errors['int8']['output']:.1e})", flush=True)
    return rows


def measure_served(repo: Path, models: list[str], steps: int, seconds: float) -> list[dict]:
    from lstm_onnx.client import loadgen

    from .processes import start_model_server

    rows = []
    with start_model_server(repo) as server:
        url = f"127.0.0.1:{server.port}"

        async def level(model: str, concurrency: int):
            async with loadgen.open_channel(url) as channel:
                metadata, optional = await loadgen.fetch_inputs_spec(channel, model)
                payloads = loadgen.make_payloads(model, metadata, optional, 1, [steps] * 8)
                result, _ = await loadgen.run_level(channel, payloads, concurrency, 10**9, seconds, check_every=10**9)
                return result

        for concurrency in (1, 64):
            for model in models:
                r = asyncio.run(level(model, concurrency))
                rows.append({"model": model, "concurrency": concurrency, "p50_ms": r.p50_ms, "rps": r.rps,
                             "errors": r.errors})
                print(f"served      {model:<10} c{concurrency:<3} p50 {r.p50_ms:7.2f} ms  {r.rps:8.1f} req/s  "
                      f"errors {r.errors}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--served-seconds", type=float, default=8.0)
    parser.add_argument("--no-served", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    from lstm_onnx.export.quantization import export_int8
    from lstm_onnx.export.repository import export_to_repository

    model = dict(DEFAULT_MODEL, hidden_size=args.hidden)
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        work = Path(tmp)
        run = make_run(work / "run", **model)
        repo = work / "repo"
        export_to_repository(run, repo, name="fp32")
        started = time.perf_counter()
        q = export_int8(run, repo, "fp32")
        print(f"int8 export: {time.perf_counter() - started:.1f} s; parity against PyTorch FP32 over "
              f"{q['parity']['cases_run']} cases: atol needed {q['parity']['tolerance_that_would_pass']:.2e} "
              f"(saturating x100 inputs included), within the int8 budget: {q['parity']['passed']}", flush=True)
        rows = measure_inprocess(run, repo / "fp32" / "1" / "model.onnx", repo / "fp32_int8" / "1" / "model.onnx",
                                 [1, 32], DEFAULT_TIME, model["input_size"], args.hidden, model["num_layers"], args.rounds)
        served = [] if args.no_served else measure_served(repo, ["fp32", "fp32_int8"], DEFAULT_TIME, args.served_seconds)
    result = {"model": model, "time": DEFAULT_TIME, "load_before": load, "load_after": os.getloadavg(),
              "inprocess": rows, "served": served, "int8_parity": {k: q["parity"][k] for k in
                                                                   ("passed", "tolerance_that_would_pass", "worst_abs_error")}}
    print(f"load average before {load[0]:.2f}, after {result['load_after'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
