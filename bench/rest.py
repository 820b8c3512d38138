"""REST against gRPC on our server, JSON against binary tensors, and our REST against MLServer 1.7.1's REST.

`python -m bench.rest [--rounds N] [--seconds S]` serves the default bench model on our server (gRPC and REST
ports) and on MLServer (bench/mlserver.py), alternates them round after round at concurrency 1 and 64, takes
each figure's median over the rounds, and writes the "REST" section of docs/benchmarks.md (between markers,
kept by `make bench`) and docs/benchmarks_rest.json. Answers are sampled and checked against in-process ORT.
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

from bench import mlserver
from bench.head_to_head import median_row
from bench.models import DEFAULT_MODEL, DEFAULT_TIME, build_repository
from bench.processes import ROOT, ChildServer, serving_pattern
from bench.report import section_main, write_marked_section
from lstm_onnx.client import http_loadgen, loadgen

BEGIN, END = "<!-- rest:begin -->", "<!-- rest:end -->"


def start_server(repository: Path) -> tuple[ChildServer, str]:
    """Our server with gRPC and REST on free loopback ports; the child and the REST address."""
    argv = [sys.executable, "-m", "lstm_onnx", "serve", "--model-repository", str(repository), "--grpc-port", "0",
            "--http-port", "0", "--metrics-port", "-1"]
    server = ChildServer(argv, serving_pattern([]))
    port = re.search(r"http_port=(\d+)", server.log[-1])
    if port is None:
        server.stop()
        raise RuntimeError(f"serve: no http_port in its serving line: {server.log[-1]}")
    return server, f"127.0.0.1:{port.group(1)}"


def rest_levels(url: str, levels: list[int], seconds: float, binary: bool, model_path: Path) -> list[dict]:
    async def go() -> list[dict]:
        async with http_loadgen.open_session(max(levels)) as session:
            metadata, optional = await http_loadgen.fetch_inputs_spec(session, url, "lstm")
            payloads = http_loadgen.make_payloads(metadata, optional, 1, [DEFAULT_TIME], binary)
            rows = []
            for level in levels:
                result, samples = await http_loadgen.run_level(session, url, "lstm", payloads, level, 20000, seconds,
                                                               check_every=16)
                loadgen.check_answers(result, samples, [p.inputs for p in payloads], model_path)
                rows.append(result.as_dict())
            return rows

    return asyncio.run(go())


def grpc_levels(url: str, levels: list[int], seconds: float, model_path: Path) -> list[dict]:
    async def go() -> list[dict]:
        async with loadgen.open_channel(url) as channel:
            metadata, optional = await loadgen.fetch_inputs_spec(channel, "lstm")
            payloads = loadgen.make_payloads("lstm", metadata, optional, 1, [DEFAULT_TIME])
            rows = []
            for level in levels:
                result, samples = await loadgen.run_level(channel, payloads, level, 20000, seconds, check_every=16)
                loadgen.check_answers(result, samples, [p.inputs for p in payloads], model_path)
                rows.append(result.as_dict())
            return rows

    return asyncio.run(go())


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def measure(work: Path, rounds: int, seconds: float, top: int = 64, log=print) -> dict:
    repo = build_repository(work / "default", {"lstm": DEFAULT_MODEL})
    model_path = repo / "lstm" / "1" / "model.onnx"
    exe = mlserver.ensure_venv(log)
    out: dict = {"rounds": rounds, "seconds": seconds, "levels": [1, top], "uptime_start": _uptime(), "runs": {}}
    for round_index in range(rounds):
        server, http_url = start_server(repo)
        with server:
            runs = {"grpc": grpc_levels(server.url, [1, top], seconds, model_path),
                    "rest-binary": rest_levels(http_url, [1, top], seconds, True, model_path),
                    "rest-json": rest_levels(http_url, [1, top], seconds, False, model_path)}
        if exe is not None:
            ml = mlserver.serve_model(model_path, work, log=log)
            rest_port = json.loads((work / "mlserver-lstm" / "settings.json").read_text())["http_port"]
            with ml:
                runs["mlserver-rest-json"] = rest_levels(f"127.0.0.1:{rest_port}", [1, top], seconds, False,
                                                         model_path)
                runs["mlserver-rest-binary"] = _mlserver_binary(f"127.0.0.1:{rest_port}")
        for label, rows in runs.items():
            out["runs"].setdefault(label, []).append(rows)
            if isinstance(rows, list):
                log(f"rest bench, round {round_index + 1}, {label}: " + ", ".join(
                    f"c{r['concurrency']} {r['rps']:.0f} req/s p50 {r['p50_ms']:.3f} ms" for r in rows))
    out["uptime_end"] = _uptime()
    out["median"] = {label: [median_row([run[i] for run in runs]) for i in range(2)]
                     for label, runs in out["runs"].items() if isinstance(runs[0], list)}
    out["mlserver_binary"] = next(iter(out["runs"].get("mlserver-rest-binary", [])), None)
    out.get("runs", {}).pop("mlserver-rest-binary", None)
    if exe is None:
        out["mlserver_missing"] = f"MLServer {mlserver.VERSION} not installed in {mlserver.venv_dir()}"
    return out


def _mlserver_binary(url: str) -> str:
    """What MLServer answers to one request with Triton's binary tensors (it documents no such extension)."""
    import httpx
    import numpy as np

    from lstm_onnx.protocol.rest_codec import HEADER_LENGTH, encode_infer_request

    x = np.zeros((1, DEFAULT_TIME, DEFAULT_MODEL["input_size"]), np.float32)
    body, length = encode_infer_request({"input": x}, binary=True)
    answer = httpx.post(f"http://{url}/v2/models/lstm/infer", content=body, headers={HEADER_LENGTH: str(length)},
                        timeout=30)
    return f"HTTP {answer.status_code}: {answer.text[:160]}"


def render(f: dict) -> str:
    m = f["median"]
    g1, g64 = m["grpc"]
    b1, b64 = m["rest-binary"]
    j1, j64 = m["rest-json"]
    lines = [BEGIN, "## REST (KServe v2 over HTTP)", "",
             f"Written by `python -m bench.rest`: our server's gRPC and REST ports and MLServer {mlserver.VERSION}'s "
             f"REST, served in turn for {f['rounds']} rounds of {f['seconds']:g} s per level, medians of the rounds; "
             "the same model, load generator (one aiohttp session, one keep-alive connection per worker) and machine. "
             "Every answer sampled was checked against in-process onnxruntime.", "",
             f"_Machine load (`uptime`): at the start `{f['uptime_start']}`; at the end `{f['uptime_end']}`._", "",
             "| target | measured | limit | verdict |", "|---|---|---|---|"]
    ml = m.get("mlserver-rest-json")
    if ml:
        ratio = b64["rps"] / ml[1]["rps"]
        lines.append(f"| REST c{f['levels'][1]} throughput, binary tensors, vs MLServer's REST (JSON: it has no binary "
                     f"extension) | {b64['rps']:.0f} vs {ml[1]['rps']:.0f} req/s = {ratio:.2f}x | >= 2x | "
                     f"{'met' if ratio >= 2 else '**missed**'} |")
        ratio_json = j64["rps"] / ml[1]["rps"]
        lines.append(f"| REST c{f['levels'][1]} throughput, JSON both sides, vs MLServer | {j64['rps']:.0f} vs "
                     f"{ml[1]['rps']:.0f} req/s = {ratio_json:.2f}x | report | n/a |")
    else:
        lines.append(f"| REST vs MLServer | not run: {f.get('mlserver_missing', '')} | >= 2x | n/a |")
    p50 = b1["p50_ms"] / g1["p50_ms"]
    lines += [f"| REST c1 p50 vs gRPC c1 p50 (binary tensors) | {b1['p50_ms']:.3f} vs {g1['p50_ms']:.3f} ms = "
              f"{p50:.2f}x | <= 1.3x | {'met' if p50 <= 1.3 else '**missed**'} |",
              f"| REST JSON vs binary, c1 p50 | {j1['p50_ms']:.3f} vs {b1['p50_ms']:.3f} ms = "
              f"{j1['p50_ms'] / b1['p50_ms']:.2f}x | report | n/a |",
              f"| REST JSON vs binary, c{f['levels'][1]} throughput | {j64['rps']:.0f} vs {b64['rps']:.0f} req/s = "
              f"{j64['rps'] / b64['rps']:.2f}x | report | n/a |", "",
              "| server / protocol | concurrency | req/s | p50 ms | p90 ms | p99 ms | checked vs ORT | req/s per round |",
              "|---|---:|---:|---:|---:|---:|---|---|"]
    names = {"grpc": "ours, gRPC", "rest-binary": "ours, REST binary", "rest-json": "ours, REST JSON",
             "mlserver-rest-json": f"MLServer {mlserver.VERSION}, REST JSON"}
    for label, rows in m.items():
        for i, row in enumerate(rows):
            per_round = ", ".join(f"{run[i]['rps']:.0f}" for run in f["runs"][label])
            lines.append(f"| {names[label]} | {row['concurrency']} | {row['rps']:.0f} | {row['p50_ms']:.3f} | "
                         f"{row['p90_ms']:.3f} | {row['p99_ms']:.3f} | {row['checked'] - row['mismatches']}/"
                         f"{row['checked']} | {per_round} |")
    if f.get("mlserver_binary"):
        lines += ["", f"MLServer's answer to a request in Triton's binary tensor format: `{f['mlserver_binary']}`."]
    lines += ["", f.get("notes", ""), END] if f.get("notes") else ["", END]
    return "\n".join(lines) + "\n"


def write_section(page: Path, section: str) -> None:
    """Put this section on the benchmark page, replacing the one there."""
    write_marked_section(page, section, BEGIN, END)


def main(argv: list[str] | None = None) -> int:
    return section_main(argv, __doc__, measure, render, "rest", BEGIN, END, ROOT / "docs")


if __name__ == "__main__":
    sys.exit(main())
