"""Head to head: our server with batching on, with batching off, and MLServer, served in turn round after round at
concurrency 1 and the top level, so that every ratio compares figures taken minutes apart at most.

On a machine shared with other work, load from others moves single figures by up to 2x between runs a few
minutes apart; alternating the servers and taking the median of each spreads that load over all of them alike.
"""
from __future__ import annotations

import asyncio
import statistics
from collections import Counter
from pathlib import Path

from bench import mlserver
from bench.processes import ChildServer, start_model_server


def fetch_batch_stats(url: str, model: str) -> dict:
    """The server's cumulative counters for `model` (ModelStatistics): requests, runs, queue ns, rows per run."""
    import grpc

    from lstm_onnx.protos import grpc_service_pb2 as pb
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    async def go():
        async with grpc.aio.insecure_channel(url) as channel:
            return await pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                pb.ModelStatisticsRequest(name=model), timeout=30)

    stats = asyncio.run(go()).model_stats[0]
    return {"requests": stats.inference_stats.success.count, "runs": stats.execution_count,
            # onnxruntime time summed over runs (batch_stats), so that per request it is the run's cost shared out;
            # inference_stats.compute_infer adds a merged run's time once per request in it, as Triton does.
            "queue_ns": stats.inference_stats.queue.ns,
            "compute_ns": sum(b.compute_infer.ns for b in stats.batch_stats),
            "rows": {b.batch_size: b.compute_infer.count for b in stats.batch_stats}}


def batch_stats_between(before: dict, after: dict) -> dict:
    """What happened between two fetch_batch_stats: requests, runs, mean rows per run, queue µs per request, the
    median and 90th percentile of rows per run (by requests: the batch a typical request ran in), and runs of 1."""
    runs_by_rows = Counter(after["rows"])
    runs_by_rows.subtract(before["rows"])
    runs_by_rows = +runs_by_rows  # drop zero counts
    requests = after["requests"] - before["requests"]
    runs = after["runs"] - before["runs"]
    weighted = sorted((rows, rows * count) for rows, count in runs_by_rows.items())
    total = sum(w for _, w in weighted)

    def by_request(q: float) -> int:
        seen = 0
        for rows, w in weighted:
            seen += w
            if seen >= q * total:
                return rows
        return 0

    return {"requests": requests, "runs": runs, "mean_rows": requests / runs if runs else 0.0,
            "queue_us": (after["queue_ns"] - before["queue_ns"]) / max(1, requests) / 1e3,
            "compute_us_per_request": (after["compute_ns"] - before["compute_ns"]) / max(1, requests) / 1e3,
            "p50_rows_by_request": by_request(0.5), "p90_rows_by_request": by_request(0.9),
            "runs_of_1": runs_by_rows.get(1, 0), "runs_by_rows": {str(k): v for k, v in sorted(runs_by_rows.items())}}


def measure(repo: Path, nobatch_repo: Path, model_path: Path, work: Path, top: int, seconds: float, rounds: int,
            levels_async, install_mlserver: bool, log=print, steps: int = 50) -> dict:
    """Alternate the three servers for `rounds` rounds at [1, top]; per server the rounds' rows and their medians.

    `levels_async(url, levels)` runs the load and returns one row per level (answers checked against ORT).
    MLServer is left out (and `mlserver_missing` says why) when its venv is absent and cannot be installed.
    """
    exe = mlserver.ensure_venv(log, install=install_mlserver)
    servers = {"on": lambda: start_model_server(repo), "off": lambda: start_model_server(nobatch_repo)}
    out: dict = {"rounds": rounds, "seconds": seconds, "levels": [1, top], "runs": {}, "batch_stats": []}
    if exe is not None:
        folder = mlserver.write_settings(work / "mlserver", model_path, "lstm", max_batch_size=64,
                                         max_batch_time_s=mlserver.MAX_BATCH_TIME_S, grpc_port=mlserver.free_port(),
                                         http_port=mlserver.free_port(), parallel_workers=0)
        out["mlserver"] = {"version": mlserver.VERSION, "settings": mlserver.describe(folder)}

        def start_ml() -> ChildServer:
            mlserver.write_settings(folder, model_path, "lstm", 64, mlserver.MAX_BATCH_TIME_S, mlserver.free_port(),
                                    mlserver.free_port(), 0)  # fresh ports each round
            return mlserver.start_mlserver(exe, folder)

        servers["mlserver"] = start_ml
    else:
        out["mlserver_missing"] = f"MLServer {mlserver.VERSION} not installed in {mlserver.venv_dir()}"
    for round_index in range(rounds):
        for label, start in servers.items():
            with start() as server:
                rows = levels_async(server.url, [1])
                before = fetch_batch_stats(server.url, "lstm") if label == "on" else None
                rows += levels_async(server.url, [top])
                if before is not None:
                    out["batch_stats"].append(batch_stats_between(before, fetch_batch_stats(server.url, "lstm")))
                if label == "mlserver" and round_index == 0:  # can Triton's own load tool drive MLServer?
                    from bench import perf_analyzer

                    features = mlserver._features(model_path)
                    out["mlserver_perf_analyzer"] = perf_analyzer.measure(
                        server.url, "lstm", f"input:{steps},{features}", [1, top], interval_ms=2000)
                    log(f"perf_analyzer on MLServer: {out['mlserver_perf_analyzer']}")
            out["runs"].setdefault(label, []).append(rows)
            log(f"head to head, round {round_index + 1}, {label}: " + ", ".join(
                f"c{r['concurrency']} {r['rps']:.0f} req/s p50 {r['p50_ms']:.3f} ms" for r in rows))
    out["median"] = {label: [median_row([run[i] for run in runs]) for i in range(2)]
                     for label, runs in out["runs"].items()}
    return out


def median_row(rows: list[dict]) -> dict:
    """One level's row over rounds: median req/s and percentiles, summed requests, errors and checks."""
    merged = dict(rows[0])
    for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "seconds"):
        merged[key] = statistics.median(r[key] for r in rows)
    for key in ("requests", "errors", "checked", "mismatches"):
        merged[key] = sum(r[key] for r in rows)
    merged["worst_abs"] = max(r["worst_abs"] for r in rows)
    merged["first_error"] = next((r["first_error"] for r in rows if r["first_error"]), "")
    return merged
