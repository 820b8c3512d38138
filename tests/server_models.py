"""Test helpers for the server tests: small hand-built ONNX models and a running server over a repository."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

# v2 datatype -> ONNX element type, for the datatype models.
ONNX_TYPES = {"FP32": TensorProto.FLOAT, "FP16": TensorProto.FLOAT16, "FP64": TensorProto.DOUBLE,
              "INT32": TensorProto.INT32, "INT64": TensorProto.INT64, "BOOL": TensorProto.BOOL}


def write_identity_model(path: Path, datatype: str) -> None:
    """x [batch, 3] -> y = x (Identity) and, for numeric types, z = x + x; batch is dynamic."""
    elem = ONNX_TYPES[datatype]
    x = helper.make_tensor_value_info("x", elem, ["batch", 3])
    outputs = [helper.make_tensor_value_info("y", elem, ["batch", 3])]
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    if datatype != "BOOL":
        outputs.append(helper.make_tensor_value_info("z", elem, ["batch", 3]))
        nodes.append(helper.make_node("Add", ["x", "x"], ["z"]))
    else:
        outputs.append(helper.make_tensor_value_info("z", elem, ["batch", 3]))
        nodes.append(helper.make_node("Not", ["x"], ["z"]))
    graph = helper.make_graph(nodes, f"identity_{datatype.lower()}", [x], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def build_repository(tiny_repository: Path, dest: Path) -> Path:
    """Our exported models, one identity model per datatype (no config.pbtxt), and a broken model."""
    shutil.copytree(tiny_repository, dest, ignore=shutil.ignore_patterns(".*"))
    for datatype in ONNX_TYPES:
        write_identity_model(dest / f"identity_{datatype.lower()}" / "1" / "model.onnx", datatype)
    broken = dest / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    return dest


def sample_input(batch: int, time: int, features: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, time, features)).astype(np.float32)


MARK = 7.0  # a request whose first input value is this is held in onnxruntime until the gate opens


class Gate:
    """Holds the runs of marked requests before onnxruntime starts them, so a test can order the next arrivals
    behind a running step; `held` is set when one is held, `release` lets it (and later ones) run."""

    def __init__(self, runtime):
        self.runtime, self.original = runtime, runtime.predict
        self.held, self.release = threading.Event(), threading.Event()

        def predict(inputs, *args, **kwargs):
            if inputs["input"].reshape(-1)[0] == MARK:
                self.held.set()
                assert self.release.wait(30), "the test never opened the gate"
            return self.original(inputs, *args, **kwargs)

        runtime.predict = predict

    def close(self) -> None:
        self.release.set()
        self.runtime.predict = self.original
