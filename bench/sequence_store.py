"""The Redis sequence store against the memory store: stream steps of one time step (T=1), at c1 and c64.

`python -m bench.sequence_store [--rounds N] [--seconds S]` starts a redis-server of its own on a free loopback
port (`--save '' --appendonly no`), serves the default bench model with `--sequence-store memory` and with
`--sequence-store redis://...` in turn, round after round, and drives ModelStreamInfer with one live sequence per
stream (c64: 64 live sequences, one T=1 step per request). Figures are the medians over the rounds; answers
are sampled and checked against in-process onnxruntime. Redis round trips per merged batch come from the store's
own counters (lstm_onnx_sequence_store_round_trips) over onnxruntime's runs (nv_inference_exec_count), scraped
from the server's metrics port before and after the level. Writes the "Sequence store" section of
docs/benchmarks.md (between markers) and docs/benchmarks_sequence_store.json.
"""
from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.head_to_head import median_row
from bench.models import DEFAULT_MODEL, build_repository
from bench.processes import ROOT, ChildServer, serving_pattern
from bench.report import section_main, write_marked_section
from lstm_onnx.client import loadgen

BEGIN, END = "<!-- sequence-store:begin -->", "<!-- sequence-store:end -->"
STEPS = 50  # T=1 requests per sequence before it ends and the stream starts the next


def start_redis() -> tuple[subprocess.Popen, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install -y redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"redis-server on port {port} did not start")


def start_server(repository: Path, store: str, extra: tuple[str, ...] = ()) -> tuple[ChildServer, int]:
    argv = [sys.executable, "-m", "lstm_onnx", "serve", "--model-repository", str(repository), "--grpc-port", "0",
            "--metrics-port", "0", "--http-port", "-1", "--sequence-store", store, *extra]
    server = ChildServer(argv, serving_pattern([]))
    port = re.search(r"metrics_port=(\d+)", server.log[-1])
    return server, int(port.group(1))


def scrape(metrics_port: int) -> dict[str, float]:
    """The store's counters and onnxruntime's runs, summed over labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    wanted = {"lstm_onnx_sequence_store_round_trips", "lstm_onnx_sequence_store_commands", "nv_inference_exec_count",
              "nv_inference_count", "lstm_onnx_sequence_store_reads", "lstm_onnx_sequence_store_copy_hits"}
    out = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            out[family.name] = sum(s.value for s in family.samples if not s.name.endswith("_created"))
    return out


def stream_levels(url: str, metrics_port: int, levels: list[int], seconds: float, model_path: Path) -> list[dict]:
    async def go() -> list[dict]:
        async with loadgen.open_channel(url) as channel:
            metadata, optional = await loadgen.fetch_inputs_spec(channel, "lstm")
            payloads = loadgen.make_stream_payloads("lstm", metadata, optional, 1, STEPS, max(levels))
            rows = []
            for level in levels:
                before = scrape(metrics_port)
                result, samples = await loadgen.run_level(channel, payloads, level, 10 ** 7, seconds, stream=True,
                                                          check_every=4)
                after = scrape(metrics_port)
                loadgen.check_answers(result, samples, [p.inputs for p in payloads], model_path)
                row = result.as_dict()
                delta = {k: after[k] - before[k] for k in after}
                runs = delta["nv_inference_exec_count"]
                row["runs"] = runs
                row["rows_per_run"] = delta["nv_inference_count"] / runs if runs else 0.0
                row["round_trips"] = delta["lstm_onnx_sequence_store_round_trips"]
                row["commands"] = delta["lstm_onnx_sequence_store_commands"]
                row["round_trips_per_run"] = row["round_trips"] / runs if runs else 0.0
                row["commands_per_round_trip"] = row["commands"] / row["round_trips"] if row["round_trips"] else 0.0
                steps = delta["lstm_onnx_sequence_store_reads"] + delta["lstm_onnx_sequence_store_copy_hits"]
                row["reads_per_step"] = delta["lstm_onnx_sequence_store_reads"] / steps if steps else 0.0
                rows.append(row)
            return rows

    return asyncio.run(go())


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def measure(work: Path, rounds: int, seconds: float, top: int = 64, log=print) -> dict:
    repo = build_repository(work / "default", {"lstm": DEFAULT_MODEL})
    model_path = repo / "lstm" / "1" / "model.onnx"
    redis, port = start_redis()
    out: dict = {"rounds": rounds, "seconds": seconds, "levels": [1, top], "steps_per_sequence": STEPS,
                 "model": DEFAULT_MODEL, "uptime_start": _uptime(),
                 "runs": {"memory": [], "redis": [], "redis, copies off": []},
                 "redis_version": subprocess.run(["redis-server", "--version"], capture_output=True,
                                                 text=True).stdout.strip()}
    try:
        for round_index in range(rounds):
            url = f"redis://127.0.0.1:{port}/0"
            for label, store, extra in (("memory", "memory", ()), ("redis", url, ("--sequence-store-copies", "true")),
                                        ("redis, copies off", url, ("--sequence-store-copies", "false"))):
                server, metrics_port = start_server(repo, store, extra)
                with server:
                    rows = stream_levels(server.url, metrics_port, [1, top], seconds, model_path)
                out["runs"][label].append(rows)
                log(f"sequence store bench, round {round_index + 1}, {label}: " + ", ".join(
                    f"c{r['concurrency']} {r['rps']:.0f} req/s p50 {r['p50_ms']:.3f} ms, {r['rows_per_run']:.1f} "
                    f"rows/run, {r['round_trips_per_run']:.2f} round trips/run" for r in rows))
    finally:
        redis.terminate()
        redis.wait(timeout=10)
    out["uptime_end"] = _uptime()
    out["median"] = {label: [dict(median_row([run[i] for run in runs]),
                                  **{k: sorted(run[i][k] for run in runs)[len(runs) // 2]
                                     for k in ("rows_per_run", "round_trips_per_run", "commands_per_round_trip",
                                               "reads_per_step")})
                             for i in range(2)] for label, runs in out["runs"].items()}
    return out


def render(f: dict) -> str:
    m1, m64 = f["median"]["memory"]
    r1, r64 = f["median"]["redis"]
    top = f["levels"][1]
    p50 = r1["p50_ms"] / m1["p50_ms"]
    rps = r64["rps"] / m64["rps"]
    lines = [BEGIN, "## Sequence store: Redis against memory (stream steps, T=1)", "",
             f"Written by `python -m bench.sequence_store`: the default bench model ({f['model']['num_layers']} layers, "
             f"hidden {f['model']['hidden_size']}) served with `--sequence-store memory`, and with a local "
             f"redis-server ({f['redis_version'].split(' sha')[0]}, no persistence, loopback) both with "
             "`--sequence-store-copies true` (a replica continues the sequences it wrote from its own copy, which Redis invalidates when "
             "another process writes the key: one round trip per step) and with `--sequence-store-copies false`, the default "
             "(a read and a compare-and-set per step, what a sequence that alternates between replicas costs), in "
             "turn for "
             f"{f['rounds']} rounds of {f['seconds']:g} s per level, medians of the rounds. Each stream carries one "
             f"live sequence of {f['steps_per_sequence']} one-step requests (then the next), so c{top} holds {top} "
             "live sequences. Every answer sampled was checked against in-process onnxruntime over the whole "
             "sequence. Client, server and Redis share the machine.", "",
             f"_Machine load (`uptime`): at the start `{f['uptime_start']}`; at the end `{f['uptime_end']}`._", "",
             "| target | measured | limit | verdict |", "|---|---|---|---|",
             f"| c1 p50, Redis vs memory | {r1['p50_ms']:.3f} vs {m1['p50_ms']:.3f} ms = {p50:.2f}x | <= 1.5x | "
             f"{'met' if p50 <= 1.5 else '**missed**'} |",
             f"| c{top} throughput ({top} live sequences), Redis vs memory | {r64['rps']:.0f} vs {m64['rps']:.0f} "
             f"req/s = {rps:.2f}x | >= 0.7x | {'met' if rps >= 0.7 else '**missed**'} |",
             f"| Redis round trips per merged batch (c{top}, store counters / onnxruntime runs) | "
             f"{r64['round_trips_per_run']:.2f} ({r64['rows_per_run']:.1f} rows per run, "
             f"{r64['commands_per_round_trip']:.1f} commands per round trip) | report | n/a |", "",
             "| store | concurrency | req/s | p50 ms | p90 ms | p99 ms | rows/run | round trips/run | "
             "commands/round trip | reads/step | checked vs ORT | req/s per round |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for label, rows in f["median"].items():
        for i, row in enumerate(rows):
            per_round = ", ".join(f"{run[i]['rps']:.0f}" for run in f["runs"][label])
            lines.append(f"| {label} | {row['concurrency']} | {row['rps']:.0f} | {row['p50_ms']:.3f} | "
                         f"{row['p90_ms']:.3f} | {row['p99_ms']:.3f} | {row['rows_per_run']:.1f} | "
                         f"{row['round_trips_per_run']:.2f} | {row['commands_per_round_trip']:.1f} | "
                         f"{row.get('reads_per_step', 0.0):.2f} | "
                         f"{row['checked'] - row['mismatches']}/{row['checked']} | {per_round} |")
    lines += ["", f.get("notes", ""), END] if f.get("notes") else ["", END]
    return "\n".join(lines) + "\n"


def write_section(page: Path, section: str) -> None:
    """Put this section on the benchmark page, replacing the one there."""
    write_marked_section(page, section, BEGIN, END)


def main(argv: list[str] | None = None) -> int:
    return section_main(argv, __doc__, measure, render, "sequence_store", BEGIN, END, ROOT / "docs")


if __name__ == "__main__":
    sys.exit(main())
