"""End-to-end check of the CUDA path: export, verify on CPU and CUDA, time both providers, optionally serve.

Run on a machine with an NVIDIA GPU and onnxruntime-gpu: `python -m bench.gpu_check --out DIR`.
Writes DIR/gpu_check.json and prints a summary. Exit 1 when CUDA is missing or parity fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _time_session(session, feed: dict, repeat: int) -> float:
    for _ in range(5):
        session.run(None, feed)
    start = time.perf_counter()
    for _ in range(repeat):
        session.run(None, feed)
    return (time.perf_counter() - start) / repeat * 1e3


def _make_run(out: Path, **model) -> Path:
    import torch

    from lstm_onnx.model.checkpoint import save_weights, write_json
    from lstm_onnx.model.config import ModelConfig, RunConfig
    from lstm_onnx.model.network import StackedRNN

    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(**model)
    torch.manual_seed(0)
    net = StackedRNN(cfg)
    write_json(out / "config.json", RunConfig(model=cfg).to_dict())
    save_weights(net, out / "init.safetensors")
    save_weights(net, out / "model.safetensors")
    return out


def _check_server(repo: Path) -> dict:
    """Serve the repository with --provider auto (must pick CUDA), answer unary and streamed requests."""
    from lstm_onnx.client.client import InferenceClient
    from lstm_onnx.export.parity import open_session
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    out: dict = {}
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 50, 8)).astype(np.float32)
    z = np.zeros((4, 3, 64), np.float32)
    reference_session = open_session(repo / "lstm3x64" / "1" / "model.onnx", "CUDAExecutionProvider")
    reference = reference_session.run(None, {"input": x, "h0": z, "c0": z})
    for provider in ("auto", "cpu"):
        settings = ServerSettings(model_repository=str(repo), grpc_port=0,
                                  metrics_port=-1, http_port=-1, provider=provider)
        started = time.perf_counter()
        with BackgroundServer(settings) as server:
            startup = time.perf_counter() - started
            runtime = server.running.repository.models["lstm3x64"].versions[1].runtime
            with InferenceClient(server.url) as client:
                got = client.infer("lstm3x64", {"input": x})
                latencies = []
                one = {"input": x[:1]}
                for _ in range(200):
                    t0 = time.perf_counter()
                    client.infer("lstm3x64", one)
                    latencies.append((time.perf_counter() - t0) * 1e3)
                chunks = [{"input": x[:, s:s + 10]} for s in range(0, 50, 10)]
                streamed = list(client.stream_sequence("lstm3x64", chunks, sequence_id=42))
            # Requests of different lengths at once: the server merges them into one ragged run
            # (sequence_lens wired in at load); each answer must equal its own run alone.
            from concurrent.futures import ThreadPoolExecutor

            lengths = [3, 50, 17, 1, 33, 8, 50, 24] * 4
            singles = [x[i % 4 : i % 4 + 1, :t] for i, t in enumerate(lengths)]

            def _one(arr: np.ndarray) -> np.ndarray:
                with InferenceClient(server.url) as c:
                    return c.infer("lstm3x64", {"input": arr})["output"]

            runs_before = server.running.scheduler.metrics.counters("lstm3x64", "1").exec_count
            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(_one, singles))
            ragged_runs = server.running.scheduler.metrics.counters("lstm3x64", "1").exec_count - runs_before
            ragged_err = 0.0
            for arr, answer in zip(singles, answers):
                zz = np.zeros((1, 3, 64), np.float32)
                alone = reference_session.run(None, {"input": arr, "h0": zz, "c0": zz})[0]
                ragged_err = max(ragged_err, float(np.abs(alone - answer).max()))
            out[provider] = {"provider_used": runtime.provider, "startup_s": round(startup, 3),
                             "ragged_requests": len(singles), "ragged_runs": ragged_runs,
                             "ragged_max_abs_vs_alone": ragged_err,
                             "p50_ms_b1_t50": round(float(np.percentile(latencies, 50)), 4),
                             "p90_ms_b1_t50": round(float(np.percentile(latencies, 90)), 4)}
            if provider == "auto":
                out["cuda_chosen"] = runtime.provider == "cuda"
                out["max_abs_vs_in_process"] = float(np.abs(got["output"] - reference[0]).max())
                out["stream_vs_whole_max_abs"] = float(np.abs(streamed[-1]["output"] - reference[0]).max())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu finds the CUDA/cuDNN libraries of the nvidia-* wheels only when told to.
        ort.preload_dlls()
    result: dict = {"host": platform.node(), "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    try:
        result["gpu"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError as exc:
        result["gpu"] = f"nvidia-smi: {exc}"
    print(json.dumps(result, indent=2), flush=True)
    if "CUDAExecutionProvider" not in result["providers"]:
        print("CUDAExecutionProvider is not available in this onnxruntime", file=sys.stderr)
        Path(args.out, "gpu_check.json").write_text(json.dumps(result, indent=2))
        return 1

    from lstm_onnx.export.repository import export_to_repository
    from lstm_onnx.export.verification import verify_model

    work = Path(tempfile.mkdtemp())
    ok = True
    result["verify"] = {}
    for name, model in {
        "lstm3x64": dict(cell="lstm", input_size=8, hidden_size=64, num_layers=3, num_outputs=4),
        "bigru2x32": dict(cell="gru", input_size=8, hidden_size=32, num_layers=2, bidirectional=True, num_outputs=3),
    }.items():
        run = _make_run(work / name, **model)
        export_to_repository(run, work / "repo", name=name)
        report = verify_model(work / "repo" / name / "1" / "model.onnx", run, provider="all")
        per_provider = {}
        for provider in report["parity"]["providers"]:
            cases = [c for c in report["parity"]["cases"] if c["provider"] == provider]
            per_provider[provider] = {"cases": len(cases), "failed": sum(not c["passed"] for c in cases),
                                      "worst_abs": max(e["max_abs"] for c in cases for e in c["outputs"].values())}
        result["verify"][name] = {"passed": report["passed"], "providers": per_provider}
        ok &= report["passed"]
        print(name, json.dumps(result["verify"][name]), flush=True)

    # Latency per provider for the bench model at batch 1 and a large batch.
    from lstm_onnx.export.parity import open_session

    timings = {}
    path = work / "repo" / "lstm3x64" / "1" / "model.onnx"
    for provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
        session = open_session(path, provider, threads=4)
        for batch, t in ((1, 50), (256, 50)):
            x = np.random.default_rng(0).standard_normal((batch, t, 8)).astype(np.float32)
            z = np.zeros((batch, 3, 64), np.float32)
            timings[f"{provider}/b{batch}xt{t}_ms"] = round(_time_session(session, {"input": x, "h0": z, "c0": z}, 50), 4)
    result["timings"] = timings
    print(json.dumps(timings, indent=2), flush=True)
    result["repository"] = str(work / "repo")
    try:
        result["server"] = _check_server(work / "repo")
        ok &= result["server"]["cuda_chosen"] and result["server"]["max_abs_vs_in_process"] <= 1e-4
        ok &= result["server"]["stream_vs_whole_max_abs"] <= 1e-4
        ok &= all(result["server"][p]["ragged_max_abs_vs_alone"] <= 1e-4 for p in ("auto", "cpu"))
    except Exception as exc:  # report what broke, keep the figures gathered so far
        result["server"] = {"error": f"{type(exc).__name__}: {exc}"}
        ok = False
    print(json.dumps(result["server"], indent=2), flush=True)
    Path(args.out, "gpu_check.json").write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
