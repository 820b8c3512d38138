"""docs/benchmarks.md and its plot from the suite's figures: every target with its measured ratio and verdict."""
from __future__ import annotations

from pathlib import Path

from bench.findings import FINDINGS

# The reference figures for MLServer 1.7.1 on this machine: used only when MLServer did not run here.
MLSERVER_RPS_C64 = 1050.0
MLSERVER_P50_C1_MS = 2.0


def _by_level(rows: list[dict], level: int) -> dict:
    return next(r for r in rows if r["concurrency"] == level)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def evaluate_targets(f: dict) -> list[dict]:
    """One row per target: what was measured, the limit, and whether it is met."""
    top = f["levels"][-1]
    rows = []
    for r in f["torch_vs_ort"]:
        need = 2.0 if r["batch"] == 1 else 1.0
        rows.append({"target": f"ORT vs PyTorch eager, hidden {r['hidden']}, batch {r['batch']}",
                     "measured": f"{r['speedup']:.2f}x faster ({r['ort_ms']:.3f} vs {r['torch_ms']:.3f} ms)",
                     "limit": f">= {need:g}x", "ok": r["speedup"] >= need})
    fl = f["flops"]
    rows.append({"target": f"LSTM FLOP/s vs same-sized MatMul (batch {fl['batch']}, hidden {fl['hidden']})",
                 "measured": f"{fl['fraction']:.0%} ({fl['lstm_gflops']:.1f} vs {fl['matmul_gflops']:.1f} GFLOP/s)",
                 "limit": ">= 60%", "ok": fl["fraction"] >= 0.6})
    echo1, level_on1 = _by_level(f["echo"], 1), _by_level(f["batching_on"], 1)
    floor = echo1["p50_ms"] + f["inprocess_ms"]
    rows.append({"target": "server p50 at concurrency 1 vs (echo p50 + in-process p50)",
                 "measured": f"{level_on1['p50_ms']:.3f} ms = {level_on1['p50_ms'] / floor:.2f}x of {floor:.3f} ms",
                 "limit": "<= 1.25x", "ok": level_on1["p50_ms"] <= 1.25 * floor})
    on1, on_top, off1, off_top, ml1, ml_top, where = _ratio_rows(f)
    if ml_top is not None:
        peer = f"MLServer {f['head_to_head']['mlserver']['version']} in this run ({ml_top['rps']:.0f} req/s)"
        ml_rps = ml_top["rps"]
    else:
        peer, ml_rps = f"MLServer 1.7.1, the issue's reference ({MLSERVER_RPS_C64:g} req/s; not run here)", MLSERVER_RPS_C64
    rows.append({"target": f"throughput at concurrency {top} vs {peer}",
                 "measured": f"{on_top['rps']:.0f} req/s = {on_top['rps'] / ml_rps:.2f}x{where}",
                 "limit": ">= 2.5x", "ok": on_top["rps"] >= 2.5 * ml_rps if top == 64 else None})
    rows.append({"target": f"batching on vs off, throughput at concurrency {top}",
                 "measured": f"{on_top['rps'] / off_top['rps']:.2f}x ({on_top['rps']:.0f} vs {off_top['rps']:.0f} req/s"
                             f"{where})", "limit": ">= 1.5x", "ok": on_top["rps"] >= 1.5 * off_top["rps"]})
    rows.append({"target": "batching on vs off, p50 at concurrency 1",
                 "measured": f"{on1['p50_ms'] / off1['p50_ms']:.2f}x ({on1['p50_ms']:.3f} vs {off1['p50_ms']:.3f} ms"
                             f"{where})", "limit": "<= 1.1x", "ok": on1["p50_ms"] <= 1.1 * off1["p50_ms"]})
    rg = f["ragged"]
    eq_gain = _by_level(rg["equal"], top)["rps"] / _by_level(rg["equal"], 1)["rps"]
    mx_gain = _by_level(rg["mixed"], top)["rps"] / _by_level(rg["mixed"], 1)["rps"]
    bad = sum(r["mismatches"] + r["errors"] for r in rg["mixed"])
    checked = sum(r["checked"] for r in rg["mixed"])
    rows.append({"target": "ragged: mixed-length answers equal each request alone (in-process ORT)",
                 "measured": f"{checked - bad}/{checked} sampled answers equal (atol 1e-4)", "limit": "all",
                 "ok": bad == 0 and checked > 0})
    rows.append({"target": f"ragged: mixed-length gain (c{top}/c1 req/s) like equal-length gain",
                 "measured": f"{mx_gain:.2f}x vs {eq_gain:.2f}x = {mx_gain / eq_gain:.2f}",
                 "limit": ">= 0.8 of equal", "ok": mx_gain >= 0.8 * eq_gain})
    st, un = f["stream"]["stream_t1"][0], f["stream"]["unary_t1"][0]
    rows.append({"target": "streaming: one step per request on ModelStreamInfer vs unary one step, p50",
                 "measured": f"{st['p50_ms'] / un['p50_ms']:.2f}x ({st['p50_ms']:.3f} vs {un['p50_ms']:.3f} ms)",
                 "limit": "<= 1.1x", "ok": st["p50_ms"] <= 1.1 * un["p50_ms"]})
    rows.append({"target": "cold start: spawn to SERVING, default repository", "measured": f"{f['cold_start_s']:.2f} s",
                 "limit": "<= 2 s", "ok": f["cold_start_s"] <= 2.0})
    rows.append({"target": "server resident memory, default model loaded (after load)",
                 "measured": f"{f['rss_loaded_mb']:.0f} MB (idle {f['rss_idle_mb']:.0f} MB)", "limit": "<= 200 MB",
                 "ok": f["rss_loaded_mb"] <= 200})
    rows.append({"target": "server process imports no torch", "measured": "torch mapped" if f["torch_loaded"]
                 else "no torch library mapped", "limit": "none", "ok": not f["torch_loaded"]})
    if f["workers"]:
        w1, w2 = f["workers"]["1"], f["workers"]["2"]
        rows.append({"target": f"--workers 2 vs 1, throughput at concurrency {top}",
                     "measured": f"{w2['rps'] / w1['rps']:.2f}x ({w2['rps']:.0f} vs {w1['rps']:.0f} req/s, "
                                 f"{f.get('worker_connections', 8)} client connections)",
                     "limit": "report", "ok": None})
    else:
        rows.append({"target": "--workers N (SO_REUSEPORT), N = 1 and 2", "measured": "not measured: `serve` has no "
                     "--workers flag yet", "limit": "report", "ok": False})
    return rows


def _ratio_rows(f: dict) -> tuple:
    """c1 and top-level rows for batching on, off and MLServer (None when it did not run): the head-to-head
    medians when the suite ran them, else the level tables; and a note saying which."""
    top = f["levels"][-1]
    h2h = f.get("head_to_head")
    if h2h:
        med = h2h["median"]
        ml = med.get("mlserver", [None, None])
        return (*med["on"], *med["off"], *ml, f"; median of {h2h['rounds']} alternated rounds")
    return (_by_level(f["batching_on"], 1), _by_level(f["batching_on"], top), _by_level(f["batching_off"], 1),
            _by_level(f["batching_off"], top), None, None, "")


def perf_analyzer_lines(f: dict) -> list[str]:
    """Triton's perf_analyzer beside our load generator: same server, request and levels."""
    pa = f.get("perf_analyzer")
    if not pa:
        return []
    lines = ["## perf_analyzer (Triton's load tool) beside our load generator", "",
             "The same server process and request (batch 1), perf_analyzer's own closed loop over gRPC. The server "
             "columns are what it read from ModelStatistics (µs per request).", "",
             "| client | server | concurrency | req/s | p50 ms | p99 ms | queue | compute input | compute infer "
             "| compute output |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ours = {r["concurrency"]: r for r in f.get("batching_on", [])}
    for server, result in (("ours", pa.get("ours", {})),
                           ("MLServer", (f.get("head_to_head") or {}).get("mlserver_perf_analyzer"))):
        if result is None:
            continue
        if "error" in result:
            lines.append(f"| perf_analyzer | {server} | - | - | - | - | - | - | - | {result['error']} |")
            continue
        for r in result["rows"]:
            lines.append(f"| perf_analyzer | {server} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | "
                         f"{r['p99_ms']:.3f} | {r['server_queue_us']} | {r['server_input_us']} | "
                         f"{r['server_infer_us']} | {r['server_output_us']} |")
            own = ours.get(r["concurrency"]) if server == "ours" else None
            if own:
                lines.append(f"| our load generator | ours | {own['concurrency']} | {own['rps']:.0f} | "
                             f"{own['p50_ms']:.3f} | {own.get('p99_ms', float('nan')):.3f} | | | | |")
    return lines + [""]


def head_to_head_lines(f: dict) -> list[str]:
    """The head-to-head section: medians per server and level, the rounds, and the merged batch sizes at the top."""
    h2h = f.get("head_to_head")
    if not h2h:
        return []
    top = h2h["levels"][-1]
    names = {"on": "server, batching on", "off": "server, batching off", "mlserver": "MLServer, adaptive batching"}
    lines = ["### Head to head: batching on, batching off and MLServer, alternated", "",
             f"Each round serves the three in turn ({h2h['seconds']:g} s per level, answers sampled and checked against "
             f"in-process ORT); the table gives the median of {h2h['rounds']} rounds, and the targets use these rows.",
             "", "| server | concurrency | req/s | p50 ms | p90 ms | p99 ms | checked vs ORT | req/s per round |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for label, rows in h2h["median"].items():
        for i, r in enumerate(rows):
            per_round = ", ".join(f"{run[i]['rps']:.0f}" for run in h2h["runs"][label])
            check = f"{r['checked'] - r['mismatches'] - r['errors']}/{r['checked']}" if r["checked"] else "-"
            lines.append(f"| {names[label]} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | "
                         f"{r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {check} | {per_round} |")
    lines.append("")
    if "mlserver" in h2h:
        lines += [f"MLServer {h2h['mlserver']['version']} ran here: {h2h['mlserver']['settings']}, same exported "
                  f"model, same load generator (raw tensors over KServe v2 gRPC, one connection).", ""]
    else:
        lines += [f"MLServer did **not** run here ({h2h['mlserver_missing']}): the MLServer target uses the issue's "
                  f"reference ({MLSERVER_RPS_C64:g} req/s at concurrency 64, p50 {MLSERVER_P50_C1_MS:g} ms at "
                  "concurrency 1).", ""]
    if h2h["batch_stats"]:
        lines += [f"Merged batches at concurrency {top}, batching on (ModelStatistics over the level, per round):", "",
                  "| requests | runs | mean rows per run | rows of a typical request's run (p50 / p90) | runs of 1 | "
                  "queue µs per request | ORT µs per request |", "|---:|---:|---:|---|---:|---:|---:|"]
        for b in h2h["batch_stats"]:
            lines.append(f"| {b['requests']} | {b['runs']} | {b['mean_rows']:.1f} | {b['p50_rows_by_request']} / "
                         f"{b['p90_rows_by_request']} | {b['runs_of_1']} | {b['queue_us']:.0f} | "
                         f"{b['compute_us_per_request']:.0f} |")
        lines.append("")
    return lines


def _level_table(rows: list[dict]) -> list[str]:
    out = ["| concurrency | requests | errors | req/s | p50 ms | p90 ms | p99 ms | checked vs ORT |",
           "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        check = f"{r['checked'] - r['mismatches']}/{r['checked']}" if r["checked"] else "-"
        out.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['rps']:.0f} | {r['p50_ms']:.3f} | "
                   f"{r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {check} |")
    return out


def write_plot(f: dict, path: Path) -> None:
    """Throughput and p50 latency against concurrency for the echo floor and the server, batching on and off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("echo", "gRPC echo floor"), ("batching_on", "server, batching on"),
                       ("batching_off", "server, batching off")):
        xs = [r["concurrency"] for r in f[key]]
        left.plot(xs, [r["rps"] for r in f[key]], marker="o", label=label)
        right.plot(xs, [r["p50_ms"] for r in f[key]], marker="o", label=label)
    ml = (f.get("head_to_head") or {}).get("median", {}).get("mlserver")
    if ml:
        xs = [r["concurrency"] for r in ml]
        left.plot(xs, [r["rps"] for r in ml], marker="s", linestyle="--", color="grey", label="MLServer (this run)")
        right.plot(xs, [r["p50_ms"] for r in ml], marker="s", linestyle="--", color="grey", label="MLServer (this run)")
    else:
        left.axhline(MLSERVER_RPS_C64, color="grey", linestyle="--", label="MLServer c64 (reference)")
    for ax, ylabel in ((left, "requests/s"), (right, "p50 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(f"lstm-onnx, {f['model']['num_layers']}x{f['model']['hidden_size']} LSTM, T={f['steps']}, "
                 f"batch 1 per request ({f['machine']['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(f: dict, md_path: Path, png_path: Path, notes: str = "") -> None:
    """The benchmark page: machine, targets, every table, and what the profile showed."""
    m = f["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    load = (f", load average {m['load_start']:.1f} at the start and {m['load_end']:.1f} at the end (the machine's "
            f"1-minute average, others' work included)" if "load_end" in m else "")
    stamp = f"_{m['date']}, {m['cpu']} ({m['cores']} cores, shared), {versions}, commit {m['commit']}{load}_"
    model = f["model"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python -m bench.suite`){' in --quick mode: smoke figures only' if f['quick'] else ''}.",
        f"Model: {model['cell'].upper()} {model['num_layers']} layers, hidden {model['hidden_size']}, "
        f"{model['input_size']} features, T = {f['steps']}, batch 1 per request, FP32, CPU, random weights.",
        "Every ratio below compares figures taken in the same run on the same machine. The machine has 2 cores "
        "shared with other work, and the load generator runs on those same cores, so absolute figures are noisy.",
        "",
        stamp,
        "",
        "## Targets",
        "",
        "| target | measured | limit | verdict |",
        "|---|---|---|---|",
    ]
    for row in evaluate_targets(f):
        lines.append(f"| {row['target']} | {row['measured']} | {row['limit']} | {_verdict(row['ok'])} |")
    lines.append("")
    if not f.get("head_to_head"):
        lines += [f"MLServer was **not** run here: the throughput comparison uses the issue's reference figures for "
                  f"MLServer 1.7.1 with an onnxruntime runtime on this machine ({MLSERVER_RPS_C64:g} req/s at "
                  f"concurrency 64 with adaptive batching, p50 {MLSERVER_P50_C1_MS:g} ms at concurrency 1).", ""]
    lines += head_to_head_lines(f)
    lines += perf_analyzer_lines(f)
    lines += [FINDINGS, ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += ["![throughput and latency against concurrency](benchmarks.png)", "",
              "## Floors and the server", "", stamp, "",
              f"In-process onnxruntime, same input, 1 intra-op thread: p50 **{f['inprocess_ms']:.3f} ms**.", "",
              "### gRPC echo floor (grpc.aio, bytes in, same-sized bytes out, no protobuf work)", ""]
    lines += _level_table(f["echo"])
    lines += ["", "### Server, dynamic batching on (the exported config.pbtxt)", ""]
    lines += _level_table(f["batching_on"])
    lines += ["", "### Server, dynamic batching off (config.pbtxt without dynamic_batching)", ""]
    lines += _level_table(f["batching_off"])
    rg = f["ragged"]
    lines += ["", "### Ragged load (batching on)", "",
              f"Mixed: each request draws T from {rg['times'][0]}..{rg['times'][-1]} ({len(rg['times'])} lengths). "
              f"Equal: every request has T = {rg['mean']} (the mean). Sampled answers are compared with the same "
              "request run alone in in-process onnxruntime.", "", "Equal length:", ""]
    lines += _level_table(rg["equal"])
    lines += ["", "Mixed lengths:", ""]
    lines += _level_table(rg["mixed"])
    lines += ["", "### Streaming (concurrency 1)", "",
              f"ModelStreamInfer with one time step per request, sequences of {f['steps']} steps (state carried by the "
              "server; the last step of each sampled sequence is checked against the whole sequence in ORT), against "
              "unary ModelInfer with T = 1.", ""]
    lines += _level_table(f["stream"]["unary_t1"] + f["stream"]["stream_t1"])
    lines += ["", "(first row unary, second row stream)", ""]
    if f["workers"]:
        lines += ["### Workers (SO_REUSEPORT)", "",
                  f"`serve --workers N`, the load spread over {f.get('worker_connections', 8)} client connections "
                  "(one connection would reach one worker).", ""]
        lines += _level_table([dict(f["workers"][n], concurrency=f"{f['levels'][-1]} (N={n})") for n in ("1", "2")])
        lines.append("")
    lines += ["### Cold start and memory", "",
              f"Spawn of `lstm-onnx serve` to its `serving` log line (health SERVING): **{f['cold_start_s']:.2f} s**. "
              f"Resident memory: {f['rss_idle_mb']:.0f} MB after start, {f['rss_loaded_mb']:.0f} MB after the load "
              f"levels. torch mapped into the server: {'yes' if f['torch_loaded'] else 'no'}.", "",
              "## In-process: onnxruntime against PyTorch eager", "", stamp, "",
              "Same process, same input, 1 thread each (`torch.set_num_threads(1)`, ORT intra-op 1), median of runs.", "",
              "| hidden | batch | T | ORT ms | PyTorch ms | speedup | recurrent GEMMs alone, ms | max abs diff |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in f["torch_vs_ort"]:
        floor = f"{r['floor_ms']:.3f}" if "floor_ms" in r else "-"
        lines.append(f"| {r['hidden']} | {r['batch']} | {r['steps']} | {r['ort_ms']:.3f} | {r['torch_ms']:.3f} | "
                     f"{r['speedup']:.2f}x | {floor} | {r['max_abs_diff']:.2e} |")
    lines += ["", "*Recurrent GEMMs alone*: the `layers x T` dependent `[B, H] @ [H, 4H]` products every LSTM must run "
              "one after another (an onnxruntime chain of MatMul nodes, 1 thread; it also pays onnxruntime's ~1 µs "
              "per node, so at small sizes it exceeds the fused LSTM kernel). No kernel can beat it by much: a 2x "
              "target is out of reach where PyTorch's time is under twice this floor."]
    fl = f["flops"]
    lines += ["", f"Large batch: batch {fl['batch']}, hidden {fl['hidden']}, {fl['layers']} layers, T = {fl['steps']}: "
              f"LSTM {fl['lstm_ms']:.1f} ms = {fl['lstm_gflops']:.1f} GFLOP/s of useful GEMM work; an FP32 MatMul "
              f"{fl['matmul_shape'][0]}x{fl['matmul_shape'][1]} @ {fl['matmul_shape'][1]}x{fl['matmul_shape'][2]} in "
              f"onnxruntime (MLAS) in the same process: {fl['matmul_gflops']:.1f} GFLOP/s; fraction "
              f"**{fl['fraction']:.0%}**.", "",
              "## Where the time goes", "", stamp, "",
              "### Per request, piece by piece (measured in-process)", "", "| piece | µs |", "|---|---:|"]
    for r in f["pieces"]:
        lines.append(f"| {r['piece']} | {r['us']:.1f} |")
    echo1 = _by_level(f["echo"], 1)["p50_ms"]
    on1 = _by_level(f["batching_on"], 1)["p50_ms"]
    lines += ["", f"At concurrency 1 the server's p50 is {on1:.3f} ms: the gRPC round trip (echo floor) "
              f"{echo1:.3f} ms, onnxruntime {f['inprocess_ms']:.3f} ms, leaving "
              f"{max(0.0, on1 - echo1 - f['inprocess_ms']):.3f} ms for the server's Python path (protobuf, scheduler, "
              "executor hop, batcher).", "",
              "### onnxruntime's profiler (batch 1, per run)", "", "| operator | µs per run | share of run |",
              "|---|---:|---:|"]
    for r in f["ort_profile"]:
        lines.append(f"| {r['op']} | {r['us_per_run']:.1f} | {r['share_of_run']:.0%} |")
    lines += ["", "### Session options (batch 1, in-process)", "", "| options | ms |", "|---|---:|"]
    for r in f["session_options"]:
        lines.append(f"| {r['options']} | {r['ms']:.3f} |")
    lines.append("")
    text = "\n".join(lines)
    # The REST section is written by `python -m bench.rest`; a rerun of the suite keeps it.
    old = md_path.read_text() if md_path.exists() else ""
    if "<!-- rest:begin -->" in old and "<!-- rest:end -->" in old:
        text = text.rstrip("\n") + "\n\n<!-- rest:begin -->" + old.split("<!-- rest:begin -->", 1)[1].split(
            "<!-- rest:end -->", 1)[0] + "<!-- rest:end -->\n"
    md_path.write_text(text)
    write_plot(f, png_path)


def write_marked_section(page: Path, section: str, begin: str, end: str) -> None:
    """Put `section` (which starts with `begin` and ends with `end`) on the benchmark page, replacing the one
    between those markers, or appending it; the rest of the page is left as it is."""
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    page.write_text(text)


def section_main(argv: list[str] | None, description: str, measure, render, name: str, begin: str, end: str,
                 docs_default: Path) -> int:
    """The command line of a bench script that writes one marked section: `measure(work, rounds, seconds)`,
    then its figures as docs/benchmarks_<name>.json and `render(figures)` on the benchmark page."""
    import argparse
    import json
    import os
    import tempfile
    import time

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lstm-onnx-bench" / "full"))
    parser.add_argument("--docs", default=str(docs_default))
    parser.add_argument("--notes", default="", help="a paragraph to add under the tables")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    figures = measure(Path(args.work), args.rounds, args.seconds)
    figures["notes"] = args.notes
    figures["load_average"] = os.getloadavg()
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"benchmarks_{name}.json").write_text(json.dumps(figures, indent=1, default=float))
    section = render(figures)
    write_marked_section(docs / "benchmarks.md", section, begin, end)
    print(section)
    return 0
