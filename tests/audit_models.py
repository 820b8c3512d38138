"""Hand-built ONNX models for the audit tests: our contract's layout, tf2onnx-like graphs, and spec single-node models."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
GATES = {"LSTM": ("input", "output", "forget", "cell"), "GRU": ("update", "reset", "hidden")}


def digest(array: np.ndarray) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(array, "<f4").tobytes()).hexdigest()


def random_layers(op: str, num_layers: int, hidden: int, input_size: int, directions: int = 1, seed: int = 0):
    """[(W, R, B)] per layer, uniform like PyTorch's init, deterministic."""
    rng = np.random.default_rng(seed)
    g = len(GATES[op])
    out = []
    for k in range(num_layers):
        size_in = input_size if k == 0 else hidden * directions
        w = rng.uniform(-0.5, 0.5, (directions, g * hidden, size_in)).astype(np.float32)
        r = rng.uniform(-0.5, 0.5, (directions, g * hidden, hidden)).astype(np.float32)
        b = rng.uniform(-0.5, 0.5, (directions, 2 * g * hidden)).astype(np.float32)
        out.append((w, r, b))
    return out


def contract_model(op: str = "LSTM", layers=None, hidden: int = 4, input_size: int = 3, directions: int = 1,
                   outputs: int = 2, digests: dict | None = None, seed: int = 0) -> onnx.ModelProto:
    """A model shaped like our exporter's: Transpose, one node per layer with layer{k}.W/R/B, a Gemm head."""
    if layers is None:
        layers = random_layers(op, 2, hidden, input_size, directions, seed)
    hidden, input_size, directions = layers[0][1].shape[-1], layers[0][0].shape[-1], layers[0][0].shape[0]
    rng = np.random.default_rng(seed + 100)
    direction = "bidirectional" if directions == 2 else "forward"
    inits = [numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shape3"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "shape2")]
    nodes = [helper.make_node("Transpose", ["input"], ["x_tbf"], perm=[1, 0, 2], name="to_time_major")]
    x, h_last = "x_tbf", None
    for k, (w, r, b) in enumerate(layers):
        names = [f"layer{k}.W", f"layer{k}.R", f"layer{k}.B"]
        inits += [numpy_helper.from_array(a, n) for a, n in zip((w, r, b), names)]
        y, yh = f"layer{k}.Y", f"layer{k}.Y_h"
        nodes.append(helper.make_node(op, [x] + names, [y, yh], hidden_size=hidden, direction=direction,
                                      name=f"layer{k}.{op.lower()}", **({"linear_before_reset": 1} if op == "GRU" else {})))
        nodes.append(helper.make_node("Transpose", [y], [f"layer{k}.Yt"], perm=[0, 2, 1, 3]))  # (T, B, D, H)
        nodes.append(helper.make_node("Reshape", [f"layer{k}.Yt", "shape3"], [f"layer{k}.X"]))  # (T, B, D*H)
        x, h_last = f"layer{k}.X", yh
    head_w = rng.uniform(-0.5, 0.5, (outputs, hidden * directions)).astype(np.float32)
    head_b = rng.uniform(-0.5, 0.5, (outputs,)).astype(np.float32)
    inits += [numpy_helper.from_array(head_w, "head.weight"), numpy_helper.from_array(head_b, "head.bias")]
    nodes.append(helper.make_node("Transpose", [h_last], ["h_bdh"], perm=[1, 0, 2]))
    nodes.append(helper.make_node("Reshape", ["h_bdh", "shape2"], ["features"]))
    nodes.append(helper.make_node("Gemm", ["features", "head.weight", "head.bias"], ["output"], transB=1, name="head"))
    graph = helper.make_graph(
        nodes, "contract", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "time", input_size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", outputs])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="audit-tests")
    if digests is None:
        digests = expected_digests(op, layers)
    contract = {"format": "lstm-onnx/1", "cell": op.lower(), "input_size": input_size, "hidden_size": hidden,
                "num_layers": len(layers), "num_directions": directions, "gate_digests": digests}
    helper.set_model_props(model, {"lstm_onnx.contract": json.dumps(contract)})
    onnx.checker.check_model(model)
    return model


def expected_digests(op: str, layers) -> dict[str, str]:
    """Digests computed independently of export.gates: ONNX row blocks in spec order."""
    gates = GATES[op]
    out = {}
    for k, (w, r, b) in enumerate(layers):
        h = r.shape[-1]
        for d in range(w.shape[0]):
            dname = ("forward", "reverse")[d]
            for i, gate in enumerate(gates):
                out[f"layer{k}.{dname}.{gate}.W"] = digest(w[d, i * h:(i + 1) * h])
                out[f"layer{k}.{dname}.{gate}.R"] = digest(r[d, i * h:(i + 1) * h])
                out[f"layer{k}.{dname}.{gate}.bW"] = digest(b[d, i * h:(i + 1) * h])
                off = len(gates) * h
                out[f"layer{k}.{dname}.{gate}.bR"] = digest(b[d, off + i * h:off + (i + 1) * h])
    return out


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`lstm-onnx ...` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "lstm_onnx", *args], capture_output=True, text=True,
                          cwd=str(ROOT), env=env, timeout=120)


def codes(audit, severity: str | None = None) -> set[str]:
    return {f.code for f in audit.findings if severity is None or f.severity == severity}
