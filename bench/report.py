"""docs/benchmarks.md and its plot from the suite's figures: every target with its measured ratio and verdict."""
from __future__ import annotations

from pathlib import Path

# Measured by the author on this machine (MLServer was not installed in this run; see the page).
MLSERVER_RPS_C64 = 1050.0
MLSERVER_P50_C1_MS = 2.0


# What profiling found and why targets are missed; kept with the code that measures them, reviewed each run.
FINDINGS = """\
## What the profiles showed, why targets are missed, and what each server change bought

Each change was measured before/after with `python -m bench.compare --before <commit>` (the older server from
`git archive`, served alternately with the new one, same load, median of 3-4 rounds at c1 and c64, T = 50 unless
said). On this machine (2 cores shared with other engineers' training and tests, load average 1-6 during the
runs) single rounds swing by up to 2x, so ratios within +-10% are noise.

| change (commit) | c1 p50 after/before | c64 req/s after/before |
|---|---:|---:|
| ragged batching: `sequence_lens` wired in at load, batcher pads (7712415), T 10..50 mixed | 1.03x | 0.87x, then 1.47x on a rerun (noise) |
| `--workers 2` vs 1, 8 client connections (dfa8405) | - | 0.76x (this page's suite run: 1.12x) |
| idle model runs in the caller's task; deadline via `asyncio.timeout` (697dacc) | 0.99x | 1.02x |
| uvloop under grpc.aio (e548f47) | 0.92x | 1.04x |
| ORT intra-op threads do not spin (195cd66) | 0.94x | 1.03x |
| all of this round together (9d09798 -> 195cd66) | 0.97x | 1.19x |
| not taken: `--intra-op-threads 1` | 0.89x | 0.75x |
| not taken: gRPC option `grpc.optimization_target` = latency | 1.02x | 0.93x |
| not kept (measurement only): ORT run on the event loop, no executor hop | 0.94x | - |

- **Server p50 at concurrency 1 (missed, 1.78x of echo + in-process, limit 1.25x).** py-spy (`py-spy record
  -r 400 -g` on the server at c1) puts ~56% of the GIL-holding samples in grpc.aio's Cython callbacks
  (`Handle._run`), ~14% in our servicer, codec, scheduler and batcher together (half of it the ORT call), ~9% on
  the executor threads. Removing the executor hop altogether (a measurement only: ORT must stay off the loop)
  bought 0.08 ms of the 0.5 ms gap, and uvloop, no spinning and the task savings ~0.1 ms together. What remains is
  grpc.aio's per-call cost for a typed unary method over the echo floor's generic bytes handler; meeting 1.25x
  (0.80 ms here) would need a server not written on grpc.aio's Python path (e.g. Triton's C++ on the same
  repository).
- **Throughput at concurrency 64 (missed: 1.00x MLServer's reference with one client connection, limit 2.5x).**
  The server's CPU goes to gRPC's Python per call, not to ORT: the batch statistics at c64 show mostly batches
  of 1-4 and ~1 s of ORT compute in 3 s of load, i.e. requests reach the batcher too slowly to fill batches.
  One client connection is itself a limit: the same server (N = 1) did 1804 req/s with the load spread over 8
  connections (the workers rows) against 1047 req/s over one, 1.72x the reference. 2.5x (2625 req/s) needs
  more cores than the 2 shared with the load generator.
- **Batching on vs off at c64 (missed in this run, 1.04x; 1.76x in the previous round's run).** For the same
  reason: when the server's Python, not ORT, is the bottleneck, merged runs save little. The figure moves with
  the machine's load between runs.
- **Ragged batching** is in: every LSTM/GRU node of a model with the lstm-onnx contract (or a foreign model whose
  graph shows only final states are read, from a batch-major input transposed into the node) gets an int32
  `sequence_lens` input at load; the batcher merges any lengths, pads with zeros and passes the lengths.
  Answers equal each request alone (bit-exact in ORT here; tests: mixed lengths over gRPC, bidirectional LSTM
  and GRU, sequences streamed in different chunk lengths). Mixed-length load now gains like equal-length load
  (target row). Padding is not capped: a batch of 8 rows of T 10..50 padded to 50 ran in 0.79 ms against
  0.87 ms for 8 rows of T 50 and 0.54 ms for 8 rows of T 30, because ORT stops each row at its length; running
  the 8 alone costs ~1.2 ms, so padding still wins at a 5:1 length ratio.
- **`--workers N`** is in (SO_REUSEPORT; a connection and its streams and sequences stay on one process;
  worker i serves metrics on metrics-port + i). On 2 cores shared with the client it is a wash (1.12x in this
  run, 0.76x in a 3-round A/B): a second process halves each batcher's batches and adds threads; it pays where
  cores are free.
- **ORT vs PyTorch (hidden 64 batch 32 missed at 0.92x; hidden 256 batch 1 missed at 1.24x, limit 2x).** Both
  sides run 1 thread (torch.get_num_threads() = 1 is recorded; ORT intra-op 1, inter-op 1). Session options for
  the exported model: graph optimisation `all` is the best level (hidden 64 batch 32: 2.87 ms against 2.94 basic
  and 3.14 disabled; torch 2.74 ms), and 2 intra-op threads are slower on this shared machine. The *recurrent
  GEMMs alone* column says why 2x at hidden 256 batch 1 cannot be met: the 150 dependent `[1,256] @ [256,1024]`
  products take 1.42 ms in ORT by themselves, and PyTorch's whole run is 2.79 ms, so 2x (1.40 ms) would need
  the gates, the input projection and everything else for free. At hidden 64 batch 32 both spend ~1.6-1.8 ms
  beyond the same 1.17 ms of GEMMs, in the gate arithmetic: ORT's LSTM kernel (MLAS GEMMs, its own
  activations) is 8% behind PyTorch's (oneDNN/MKL) there; closing that takes a different kernel, not a session
  option or a change to the export (the ORT profile gives the LSTM nodes the run's time). The optimisation-level
  figures above come from a probe in this round, not from this page's run. Hidden 256 batch 32 sits on the 1x
  line (0.99x here, 1.03x last round): both sides take about twice the 16 ms of recurrent GEMMs.
"""


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
    echo1, on1 = _by_level(f["echo"], 1), _by_level(f["batching_on"], 1)
    floor = echo1["p50_ms"] + f["inprocess_ms"]
    rows.append({"target": "server p50 at concurrency 1 vs (echo p50 + in-process p50)",
                 "measured": f"{on1['p50_ms']:.3f} ms = {on1['p50_ms'] / floor:.2f}x of {floor:.3f} ms",
                 "limit": "<= 1.25x", "ok": on1["p50_ms"] <= 1.25 * floor})
    on_top = _by_level(f["batching_on"], top)
    rows.append({"target": f"throughput at concurrency {top} vs MLServer 1.7.1 (reference {MLSERVER_RPS_C64:g} req/s)",
                 "measured": f"{on_top['rps']:.0f} req/s = {on_top['rps'] / MLSERVER_RPS_C64:.2f}x",
                 "limit": ">= 2.5x", "ok": on_top["rps"] >= 2.5 * MLSERVER_RPS_C64 if top == 64 else None})
    off_top, off1 = _by_level(f["batching_off"], top), _by_level(f["batching_off"], 1)
    rows.append({"target": f"batching on vs off, throughput at concurrency {top}",
                 "measured": f"{on_top['rps'] / off_top['rps']:.2f}x ({on_top['rps']:.0f} vs {off_top['rps']:.0f} req/s)",
                 "limit": ">= 1.5x", "ok": on_top["rps"] >= 1.5 * off_top["rps"]})
    rows.append({"target": "batching on vs off, p50 at concurrency 1",
                 "measured": f"{on1['p50_ms'] / off1['p50_ms']:.2f}x ({on1['p50_ms']:.3f} vs {off1['p50_ms']:.3f} ms)",
                 "limit": "<= 1.1x", "ok": on1["p50_ms"] <= 1.1 * off1["p50_ms"]})
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
    stamp = f"_{m['date']}, {m['cpu']} ({m['cores']} cores, shared), {versions}, commit {m['commit']}_"
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
    lines += ["", f"MLServer was **not** run here: the throughput comparison uses the issue's reference figures for "
              f"MLServer 1.7.1 with an onnxruntime runtime on this machine ({MLSERVER_RPS_C64:g} req/s at concurrency 64 "
              f"with adaptive batching, p50 {MLSERVER_P50_C1_MS:g} ms at concurrency 1).", ""]
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
    md_path.write_text("\n".join(lines))
    write_plot(f, png_path)
