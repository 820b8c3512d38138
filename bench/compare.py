"""Before/after of a server change in one run: the server of an older commit against the working tree, interleaved.

`python -m bench.compare --before <commit> [--rounds 2] [--seconds 3] [--levels 1,64] [--times 10:50]
[--flags "--workers 2"] [--before-flags ...] [--connections 8] [--batching on|off] [--before-batching on|off]`:
exports the default bench model, serves it from `git archive
<commit>` and from this tree in turn (same repository, same load), and prints req/s and p50 per level with
the after/before ratio (`--before HEAD --before-batching off` compares batching on and off in one tree). Rounds alternate the two servers so that load from others on a shared machine falls
on both alike.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.models import DEFAULT_MODEL, DEFAULT_TIME, build_repository
from bench.processes import ROOT, ChildServer, serving_pattern, start_model_server
from bench.suite import _levels_async, _without_batching
from lstm_onnx.client import loadgen


def extract_tree(commit: str, dest: Path) -> Path:
    """The committed tree of `commit` unpacked into dest (no change to the working tree or the index)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def start_server_from(tree: Path, repository: Path, flags: list[str]) -> ChildServer:
    """`serve` run from another source tree.

    A tree from before the lstm_onnx namespace has a top-level lstm_onnx.py whose folders come first on
    sys.path when run as a script. A newer tree is installed (no deps) into its own folder, which then
    leads PYTHONPATH, so its packages win over this checkout's editable install.
    """
    if tree.resolve() == ROOT.resolve():  # this checkout: its own install (a cached copy would go stale)
        return start_model_server(repository, *flags)
    tail = ["serve", "--model-repository", str(repository), "--grpc-port", "0",
            "--metrics-port", "-1", "--http-port", "-1", *flags]
    if (tree / "lstm_onnx.py").is_file():
        return ChildServer([sys.executable, str(tree / "lstm_onnx.py"), *tail], serving_pattern(flags))
    site = tree.parent / (tree.name + "-site")
    if not site.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(tree)], check=True)
    env = {"PYTHONPATH": str(site)}
    # -P: no working directory on sys.path, where this checkout's lstm_onnx/ would win.
    return ChildServer([sys.executable, "-P", "-m", "lstm_onnx", *tail], serving_pattern(flags), env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", required=True, help="commit whose server is the baseline")
    parser.add_argument("--rounds", type=int, default=2, help="before/after pairs, alternated (default 2)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per level (default 3)")
    parser.add_argument("--levels", default="1,64", help="concurrency levels (default 1,64)")
    parser.add_argument("--times", default=str(DEFAULT_TIME), help="time steps: N, or A:B for 16 lengths in A..B")
    parser.add_argument("--flags", default="", help="serve flags for the working tree's server")
    parser.add_argument("--before-flags", default="", help="serve flags for the baseline server")
    parser.add_argument("--connections", type=int, default=1, help="client connections (several reach several "
                        "--workers processes; default 1)")
    parser.add_argument("--batching", choices=("on", "off"), default="on",
                        help="off serves the working tree's server a config.pbtxt without dynamic_batching")
    parser.add_argument("--before-batching", choices=("on", "off"), default="on",
                        help="the same for the baseline server")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lstm-onnx-bench" / "compare"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    repo = build_repository(work / "default", {"lstm": DEFAULT_MODEL})
    model_path = repo / "lstm" / "1" / "model.onnx"
    repos = {"on": repo, "off": _without_batching(repo, work, "lstm")}
    before_tree = extract_tree(args.before, work / f"tree-{args.before}")
    levels = loadgen.parse_levels(args.levels)
    times = loadgen.parse_times(args.times)
    runs: dict[str, list[list[dict]]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for label, tree, flags, batching in (("before", before_tree, args.before_flags, args.before_batching),
                                             ("after", ROOT, args.flags, args.batching)):
            with start_server_from(tree, repos[batching], shlex.split(flags)) as server:
                rows = _levels_async(server.url, "lstm", levels, args.seconds, 10**6, times, model_path,
                                     connections=args.connections)
            bad = sum(r["mismatches"] + r["errors"] for r in rows)
            runs[label].append(rows)
            print(f"{label}: " + ", ".join(f"c{r['concurrency']} {r['rps']:.0f} req/s p50 {r['p50_ms']:.3f} ms"
                                           for r in rows) + (f"  ({bad} errors/mismatches)" if bad else ""),
                  flush=True)
    print(f"median of {args.rounds} rounds, times {args.times}, after/before:")
    for i, level in enumerate(levels):
        rps = {k: statistics.median(run[i]["rps"] for run in v) for k, v in runs.items()}
        p50 = {k: statistics.median(run[i]["p50_ms"] for run in v) for k, v in runs.items()}
        print(f"  c{level}: {rps['before']:.0f} -> {rps['after']:.0f} req/s ({rps['after'] / rps['before']:.2f}x), "
              f"p50 {p50['before']:.3f} -> {p50['after']:.3f} ms ({p50['after'] / p50['before']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
