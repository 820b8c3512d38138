"""Measure the resident memory one run adds, in a process of its own: `python memory_probe.py MODEL B T [B T ...]`.

Sets malloc's mmap threshold and loads MODEL as the server does (ModelRuntime), runs a small warm-up, then for each (B, T) resets the peak
(/proc/self/clear_refs 5), runs [B, T, F] once, and prints one JSON line: RSS before, peak, after (bytes),
and the server's estimate for that run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(argv: list[str]) -> None:
    from lstm_onnx.server.memory import fix_mmap_threshold
    from lstm_onnx.server.runtime import ModelRuntime, RuntimeOptions

    fix_mmap_threshold()  # as the server sets it at start (server/app.py): run buffers are mmapped, not heap
    runtime = ModelRuntime("probe", 1, Path(argv[0]))
    runtime.load(RuntimeOptions(provider="cpu"))
    features = runtime.input_spec("input").shape[2]
    runtime.predict(_feed(runtime, 1, 10, features))  # warm-up: first-run allocations are not the run's
    memory = getattr(runtime, "run_memory", None)  # None before the server estimated runs
    shapes = [(int(b), int(t)) for b, t in zip(argv[1::2], argv[2::2])]
    for rows, steps in shapes:
        feed = _feed(runtime, rows, steps, features)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before = _status_bytes("VmRSS")
        runtime.predict(feed)
        peak = _status_bytes("VmHWM")
        del feed
        after = _status_bytes("VmRSS")
        print(json.dumps({"rows": rows, "steps": steps, "before": before, "peak": peak, "after": after,
                          "estimate": memory.estimate(rows, steps) if memory else None}), flush=True)


def _feed(runtime, rows: int, steps: int, features: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((rows, steps, features)).astype(np.float32)  # (B, T, F)
    return {"input": x, **{p.input: runtime.zero_state(p.input, rows) for p in runtime.state}}


if __name__ == "__main__":
    main(sys.argv[1:])
