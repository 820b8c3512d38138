"""In-process figures: exported model in onnxruntime against PyTorch eager, LSTM FLOP/s against a same-sized
matrix multiply, session-option variants, and onnxruntime's own per-operator profile."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np


def time_call(fn, repeat: int, warmup: int = 3, budget_s: float = 5.0) -> float:
    """Median milliseconds of `fn()` over up to `repeat` runs (fewer when the budget runs out)."""
    for _ in range(warmup):
        fn()
    samples = []
    stop = time.perf_counter() + budget_s
    while len(samples) < repeat and (len(samples) < 3 or time.perf_counter() < stop):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)) * 1e3


def open_ort(path: Path, threads: int = 1, level: str = "all", spinning: bool = True, profile: str | None = None):
    """An onnxruntime CPU session with explicit threads and graph optimisation level."""
    import onnxruntime as ort

    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = levels[level]
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _feed(batch: int, steps: int, features: int, states: int, hidden: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    zeros = np.zeros((batch, states, hidden), np.float32)
    return {"input": rng.standard_normal((batch, steps, features)).astype(np.float32), "h0": zeros, "c0": zeros}


def compare_torch(run_dir: Path, model_path: Path, batches: list[int], steps: int, threads: int = 1) -> list[dict]:
    """ORT against PyTorch eager on the same input, same process, same thread count; ratio = torch / ort."""
    import torch

    from lstm_onnx.model.checkpoint import load_run

    torch.set_num_threads(threads)
    net, config = load_run(run_dir)
    cfg = config.model
    session = open_ort(model_path, threads)
    rows = []
    for batch in batches:
        feed = _feed(batch, steps, cfg.input_size, cfg.num_layers * cfg.num_directions, cfg.hidden_size)
        tensors = [torch.from_numpy(feed[k]) for k in ("input", "h0", "c0")]
        repeat = 200 if batch == 1 else 30
        ort_ms = time_call(lambda: session.run(None, feed), repeat)
        with torch.inference_mode():
            torch_ms = time_call(lambda: net(*tensors), repeat)
            want = net(*tensors)[0].numpy()
        got = session.run(["output"], feed)[0]
        floor_ms = measure_recurrent_floor(batch, steps, cfg.hidden_size, cfg.num_layers * cfg.num_directions)
        rows.append({"hidden": cfg.hidden_size, "batch": batch, "steps": steps, "threads": threads,
                     "ort_ms": ort_ms, "torch_ms": torch_ms, "speedup": torch_ms / ort_ms, "floor_ms": floor_ms,
                     "torch_threads": torch.get_num_threads(),
                     "max_abs_diff": float(np.max(np.abs(got - want)))})
    return rows


def _recurrent_chain_model(batch: int, hidden: int, chain: int) -> bytes:
    """`chain` dependent MatMuls [B, H] @ [H, 4H], each next one fed the first H columns of the last: the recurrent
    GEMMs of a stacked LSTM run back to back, with no gates, no input projection and no other work."""
    from onnx import TensorProto, helper, numpy_helper

    # N(0, 1/H) entries keep the activations' scale along the chain: no overflow, and no denormals (slow on CPU).
    weights = np.random.default_rng(0).standard_normal((hidden, 4 * hidden)) / np.sqrt(hidden)
    r = numpy_helper.from_array(weights.astype(np.float32), "R")
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("starts", [0]), ("ends", [hidden]), ("axes", [1]))]
    nodes, last = [], "x"
    for i in range(chain):
        nodes.append(helper.make_node("MatMul", [last, "R"], [f"g{i}"]))
        nodes.append(helper.make_node("Slice", [f"g{i}", "starts", "ends", "axes"], [f"h{i}"]))
        last = f"h{i}"
    graph = helper.make_graph(nodes, "recurrent_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                          [batch, hidden])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, [batch, hidden])], [r, *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def measure_recurrent_floor(batch: int, steps: int, hidden: int, layers: int) -> float:
    """Milliseconds onnxruntime (1 thread) takes for the recurrent GEMMs alone of a `layers`-layer LSTM over `steps`
    steps: a lower bound for any LSTM kernel on this core, since those GEMMs are sequential."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(_recurrent_chain_model(batch, hidden, steps * layers), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(1).standard_normal((batch, hidden)).astype(np.float32)}
    return time_call(lambda: session.run(None, feed), 100)


def lstm_flops(batch: int, steps: int, features: int, hidden: int, layers: int, directions: int = 1) -> float:
    """Useful FLOPs of a stacked LSTM: the input and recurrent GEMMs (2 per multiply-add), gates elementwise ignored."""
    total = 0.0
    inputs = features
    for _ in range(layers):
        total += 2.0 * batch * steps * directions * 4 * hidden * (inputs + hidden)
        inputs = hidden * directions
    return total


def _matmul_model(m: int, k: int, n: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def measure_flops(model_path: Path, batch: int, steps: int, features: int, hidden: int, layers: int,
                  threads: int = 1) -> dict:
    """The LSTM's useful FLOP/s at this size against an FP32 MatMul [B, F+H] x [F+H, 4H] in onnxruntime (MLAS)."""
    session = open_ort(model_path, threads)
    feed = _feed(batch, steps, features, layers, hidden)
    lstm_ms = time_call(lambda: session.run(None, feed), 5, warmup=1, budget_s=10)
    flops = lstm_flops(batch, steps, features, hidden, layers)
    k = hidden + hidden  # the layers past the first read H features and H state
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matmul.onnx"
        path.write_bytes(_matmul_model(batch, k, 4 * hidden))
        mm = open_ort(path, threads)
        x = np.random.default_rng(1).standard_normal((batch, k)).astype(np.float32)
        mm_ms = time_call(lambda: mm.run(None, {"x": x}), 200)
    mm_flops = 2.0 * batch * k * 4 * hidden
    lstm_rate, mm_rate = flops / (lstm_ms / 1e3), mm_flops / (mm_ms / 1e3)
    return {"batch": batch, "steps": steps, "hidden": hidden, "layers": layers, "threads": threads,
            "lstm_ms": lstm_ms, "lstm_gflops": lstm_rate / 1e9, "matmul_shape": [batch, k, 4 * hidden],
            "matmul_ms": mm_ms, "matmul_gflops": mm_rate / 1e9, "fraction": lstm_rate / mm_rate}


def compare_session_options(model_path: Path, batch: int, steps: int, features: int, hidden: int,
                            layers: int) -> list[dict]:
    """Batch-1 latency under each graph optimisation level, thread count and spinning choice."""
    feed = _feed(batch, steps, features, layers, hidden)
    rows = []
    for label, kwargs in (("opt disabled, 1 thread", dict(level="disabled")),
                          ("opt basic, 1 thread", dict(level="basic")),
                          ("opt all, 1 thread", dict(level="all")),
                          ("opt all, 1 thread, no spinning", dict(level="all", spinning=False)),
                          ("opt all, 2 threads", dict(level="all", threads=2)),
                          ("opt all, 2 threads, no spinning", dict(level="all", threads=2, spinning=False))):
        session = open_ort(model_path, **kwargs)
        rows.append({"options": label, "ms": time_call(lambda: session.run(None, feed), 200)})
    return rows


def profile_operators(model_path: Path, batch: int, steps: int, features: int, hidden: int, layers: int,
                      runs: int = 50) -> list[dict]:
    """onnxruntime's profiler: share of kernel time per operator type over `runs` runs."""
    with tempfile.TemporaryDirectory() as tmp:
        session = open_ort(model_path, profile=str(Path(tmp) / "ort"))
        feed = _feed(batch, steps, features, layers, hidden)
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    total_run = 0.0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + event["dur"]
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            total_run += event["dur"]
    kernels = sum(per_op.values())
    rows = [{"op": op, "us_per_run": us / runs, "share_of_run": us / total_run if total_run else 0.0}
            for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])]
    rows.append({"op": "(outside kernels: session overhead)", "us_per_run": (total_run - kernels) / runs,
                 "share_of_run": (total_run - kernels) / total_run if total_run else 0.0})
    return rows
