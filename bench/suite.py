"""The whole benchmark suite (`make bench`): floors, server levels, batching, ragged, streaming, cold start,
memory and workers, measured in one run; writes docs/benchmarks.md, docs/benchmarks.png and a JSON of figures.

`python -m bench.suite [--quick] [--work DIR] [--docs DIR]`; --quick is the smoke version (tiny times).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import inprocess
from bench.models import DEFAULT_MODEL, DEFAULT_TIME, build_repository
from bench.processes import ROOT, start_echo_server, start_model_server
from lstm_onnx.client import loadgen

WORKER_CONNECTIONS = 8  # client connections in the --workers measurement (2^-7 odds all land on one of 2)


def _levels_async(url: str, model: str, levels: list[int], seconds: float, requests: int, times: list[int],
                  model_path: Path | None, stream: bool = False, batch: int = 1, connections: int = 1) -> list[dict]:
    async def go() -> list[dict]:
        extra = [loadgen.open_channel(url, own_connection=True) for _ in range(connections - 1)]
        async with loadgen.open_channel(url, own_connection=connections > 1) as channel:
            if model_path is None:  # the echo floor has no metadata: send the default model's request
                import numpy as np

                from lstm_onnx.protocol import codec

                x = np.random.default_rng(0).standard_normal((batch, times[0], DEFAULT_MODEL["input_size"]))
                inputs = {"input": x.astype(np.float32)}
                payloads = [loadgen.Payload(inputs, codec.encode_request(model, inputs).SerializeToString())]
            else:
                metadata, optional = await loadgen.fetch_inputs_spec(channel, model)
                if stream:
                    payloads = loadgen.make_stream_payloads(model, metadata, optional, batch, times[0], max(levels))
                else:
                    payloads = loadgen.make_payloads(model, metadata, optional, batch, times)
            rows = []
            for level in levels:
                result, samples = await loadgen.run_level([channel, *extra], payloads, level, requests, seconds,
                                                          stream=stream, check_every=16)
                if model_path is not None:
                    loadgen.check_answers(result, samples, [p.inputs for p in payloads], model_path)
                rows.append(result.as_dict())
            for other in extra:
                await other.close()
            return rows

    return asyncio.run(go())


def _without_batching(repo: Path, work: Path, name: str) -> Path:
    """A copy of the repository whose config.pbtxt asks for no batcher (requests run one by one).

    Only our server reads it: the implicit state becomes optional inputs again (the server fills them, the
    load generator leaves them out as it does with batching on), and the scheduling choice is dropped.
    """
    from google.protobuf import text_format

    from lstm_onnx.protos import model_config_pb2 as mc

    out = work / "repo_nobatch"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(repo / name, out / name)
    path = out / name / "config.pbtxt"
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    for state in config.sequence_batching.state:
        config.input.add(name=state.input_name, data_type=state.data_type, dims=state.dims, optional=True)
    config.ClearField("sequence_batching")
    config.ClearField("dynamic_batching")
    path.write_text(text_format.MessageToString(config))
    return out


def _machine() -> dict:
    import platform

    import grpc
    import numpy
    import onnxruntime

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    versions = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "grpcio": grpc.__version__,
                "numpy": numpy.__version__}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except OSError:
        commit = ""
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "commit": commit, "versions": versions,
            "load_start": os.getloadavg()[0]}


def _serve_supports_workers() -> bool:
    text = subprocess.run([sys.executable, "-m", "lstm_onnx", "serve", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60).stdout
    return "--workers" in text


def run_suite(work: Path, quick: bool = False, log=print) -> dict:
    """Measure everything; returns the figures (also the input of the report)."""
    seconds = 0.5 if quick else 4.0
    requests = 50 if quick else 20000
    levels = [1, 4] if quick else [1, 4, 16, 64]
    top = levels[-1]
    steps = 5 if quick else DEFAULT_TIME
    model = dict(DEFAULT_MODEL, hidden_size=8, num_layers=2) if quick else DEFAULT_MODEL
    figures: dict = {"machine": _machine(), "quick": quick, "model": model, "steps": steps, "levels": levels}

    t0 = time.perf_counter()
    repo = build_repository(work / "default", {"lstm": model})
    model_path = repo / "lstm" / "1" / "model.onnx"
    log(f"exported default model in {time.perf_counter() - t0:.1f} s")

    # In-process comparisons (the 256-hidden model is exported once and cached in the work dir).
    hiddens = [model["hidden_size"]] if quick else [64, 256]
    figures["torch_vs_ort"] = []
    for hidden in hiddens:
        sub = build_repository(work / f"h{hidden}", {f"h{hidden}": dict(model, hidden_size=hidden)})
        figures["torch_vs_ort"] += inprocess.compare_torch(work / f"h{hidden}" / "runs" / f"h{hidden}",
                                                           sub / f"h{hidden}" / "1" / "model.onnx", [1, 32], steps)
        log(f"torch vs ort h{hidden}: {figures['torch_vs_ort'][-2:]}")
    big = 8 if quick else 256
    big_repo = build_repository(work / f"h{big}", {f"h{big}": dict(model, hidden_size=big)})
    figures["flops"] = inprocess.measure_flops(big_repo / f"h{big}" / "1" / "model.onnx", 16 if quick else 256, steps,
                                               model["input_size"], big, model["num_layers"])
    log(f"flops: {figures['flops']}")
    args = (model_path, 1, steps, model["input_size"], model["hidden_size"], model["num_layers"])
    figures["session_options"] = inprocess.compare_session_options(*args)
    figures["ort_profile"] = inprocess.profile_operators(*args, runs=10 if quick else 200)
    from bench.breakdown import measure_pieces

    figures["pieces"] = measure_pieces(model_path, "lstm", 1, steps, model["input_size"])
    session = inprocess.open_ort(model_path)
    feed = inprocess._feed(1, steps, model["input_size"], model["num_layers"], model["hidden_size"])
    figures["inprocess_ms"] = inprocess.time_call(lambda: session.run(None, feed), 500)
    log(f"in-process ort p50 {figures['inprocess_ms']:.3f} ms")

    # The gRPC floor: same request bytes, an answer of the real answer's size.
    answer = loadgen.reference_outputs(model_path, {"input": feed["input"]})
    from lstm_onnx.protocol import codec

    answer_bytes = len(codec.encode_response("lstm", 1, "", answer).SerializeToString())
    with start_echo_server(answer_bytes) as echo:
        figures["echo"] = _levels_async(echo.url, "lstm", levels, seconds, requests, [steps], None)
    log(f"echo: {[(r['concurrency'], round(r['rps']), round(r['p50_ms'], 3)) for r in figures['echo']]}")

    # The server, batching on: levels, memory, cold start, streaming, ragged.
    with start_model_server(repo) as server:
        figures["cold_start_s"] = server.cold_start_s
        figures["rss_idle_mb"] = server.rss_mb()
        figures["torch_loaded"] = server.loaded_torch()
        figures["batching_on"] = _levels_async(server.url, "lstm", levels, seconds, requests, [steps], model_path)
        log(f"batching on: {[(r['concurrency'], round(r['rps']), round(r['p50_ms'], 3)) for r in figures['batching_on']]}")
        figures["rss_loaded_mb"] = server.rss_mb()
        mixed = loadgen.parse_times(f"{max(1, steps // 5)}:{steps}")
        mean = max(1, round(sum(mixed) / len(mixed)))
        figures["ragged"] = {
            "times": mixed, "mean": mean,
            "equal": _levels_async(server.url, "lstm", [1, top], seconds, requests, [mean], model_path),
            "mixed": _levels_async(server.url, "lstm", [1, top], seconds, requests, mixed, model_path)}
        log(f"ragged: {figures['ragged']}")
        from bench import perf_analyzer

        # Triton's own load tool on the same server and request (batch 1, T steps), at c1 and the top level.
        figures["perf_analyzer"] = {"ours": perf_analyzer.measure(
            server.url, "lstm", f"input:{steps},{model['input_size']}", [1, top], interval_ms=500 if quick else 3000)}
        log(f"perf_analyzer: {figures['perf_analyzer']}")
        figures["stream"] = {
            "unary_t1": _levels_async(server.url, "lstm", [1], seconds, requests, [1], model_path),
            "stream_t1": _levels_async(server.url, "lstm", [1], seconds, requests, [steps], model_path, stream=True)}
        log(f"stream: {figures['stream']}")
    # Cold start again with nothing else running (the first start above paid for file caches).
    with start_model_server(repo) as server:
        figures["cold_start_s"] = min(figures["cold_start_s"], server.cold_start_s)

    nobatch = _without_batching(repo, work, "lstm")
    with start_model_server(nobatch) as server:
        figures["batching_off"] = _levels_async(server.url, "lstm", levels, seconds, requests, [steps], model_path)
    log(f"batching off: {[(r['concurrency'], round(r['rps']), round(r['p50_ms'], 3)) for r in figures['batching_off']]}")

    # The ratios of the targets: batching on, off and MLServer alternated round by round.
    from bench import head_to_head

    def levels_at(url: str, at: list[int]) -> list[dict]:
        return _levels_async(url, "lstm", at, h2h_seconds, requests, [steps], model_path)

    h2h_seconds = 0.5 if quick else 3.0
    figures["head_to_head"] = head_to_head.measure(repo, nobatch, model_path, work, top, h2h_seconds,
                                                   1 if quick else 5, levels_at, install_mlserver=not quick, log=log,
                                                   steps=steps)

    figures["workers"] = {}
    figures["worker_connections"] = WORKER_CONNECTIONS
    if _serve_supports_workers():
        for n in (1, 2):
            # Several connections for both N, so the kernel can spread them over the workers.
            with start_model_server(repo, "--workers", str(n)) as server:
                figures["workers"][str(n)] = _levels_async(server.url, "lstm", [top], seconds, requests, [steps],
                                                           model_path, connections=WORKER_CONNECTIONS)[0]
        log(f"workers: {figures['workers']}")
    import os

    # Others' work on the shared cores moves every figure: the page states how busy the machine was.
    figures["machine"]["load_end"] = os.getloadavg()[0]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke version: tiny model, half-second levels")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lstm-onnx-bench"),
                        help="where bench models are exported and cached (default: the temp dir)")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="where benchmarks.md/.png/.json are written")
    args = parser.parse_args(argv)
    from bench.report import write_report

    work = Path(args.work)
    figures = run_suite(work / ("quick" if args.quick else "full"), quick=args.quick)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmarks.json").write_text(json.dumps(figures, indent=1, default=float))
    write_report(figures, docs / "benchmarks.md", docs / "benchmarks.png")
    print(f"wrote {docs / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
