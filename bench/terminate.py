"""How fast RunOptions.terminate stops a run of an exported model, and the longest step it cannot interrupt.

onnxruntime checks the flag between nodes; each LSTM/GRU layer is one node, so a layer in progress finishes
first. `python -m bench.terminate MODEL.onnx [--batch B --time T ...]` prints, per input size, the whole run,
the slowest single layer (from onnxruntime's profile) and the delay from terminate to the run's end.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

import numpy as np


def _session(path: str, profile: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _feed(session, batch: int, steps: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for arg in session.get_inputs():
        shape = [batch if i == 0 else (steps if arg.name == "input" and i == 1 else d)
                 for i, d in enumerate(arg.shape)]
        feed[arg.name] = (rng.standard_normal(shape) if arg.name == "input" else np.zeros(shape)).astype(np.float32)
    return feed


def measure(path: str, batch: int, steps: int, delays: list[float]) -> dict:
    """Whole-run seconds, slowest layer seconds, and for each delay the seconds from terminate to the run's end."""
    import onnxruntime as ort

    session = _session(path)
    feed = _feed(session, batch, steps)
    start = time.perf_counter()
    session.run(None, feed)
    whole = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        profiled = _session(path, os.path.join(tmp, "profile"))
        profiled.run(None, feed)
        with open(profiled.end_profiling()) as f:
            events = json.load(f)
    layers = [e["dur"] / 1e6 for e in events if e.get("cat") == "Node"
              and e.get("args", {}).get("op_name") in ("LSTM", "GRU") and e["name"].endswith("_kernel_time")]
    stops = []
    for delay in delays:
        options = ort.RunOptions()
        timer = threading.Timer(delay, lambda o=options: setattr(o, "terminate", True))
        start = time.perf_counter()
        timer.start()
        try:
            session.run(None, feed, options)
            stopped = False
        except Exception:
            stopped = True
        stops.append({"after_s": delay, "stopped": stopped,
                      "stop_delay_s": round(max(0.0, time.perf_counter() - start - delay), 4)})
        timer.cancel()
    return {"batch": batch, "time": steps, "run_s": round(whole, 4), "slowest_layer_s": round(max(layers), 4),
            "layers": len(layers), "stops": stops}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.terminate", description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--size", action="append", default=None, help="BATCHxTIME, repeatable (default 16x20000, "
                        "64x30000, 16x200000)")
    args = parser.parse_args(argv)
    sizes = args.size or ["16x20000", "64x30000", "16x200000"]
    for size in sizes:
        batch, steps = (int(v) for v in size.split("x"))
        result = measure(args.model, batch, steps, [0.01, 0.1, 0.25])
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
