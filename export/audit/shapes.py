"""Shape checks around every recurrent node: initial state, declared outputs, and the next layer's input width.

A node can be well-formed by itself (W, R, B match hidden_size) and still contradict its neighbours:
torch's dynamo exporter writes nn.LSTM(proj_size=P) as an LSTM with hidden_size=P whose initial_c keeps
the real hidden size, so onnxruntime refuses to run it. These checks read declared and inferred shapes
(onnx's shape inference, no data) and report MALFORMED_NODE naming the tensor, its shape and the
expected one.
"""
from __future__ import annotations

from typing import Any

import onnx

from .gates import cell_of
from .result import Audit

# Positions in LSTM/GRU (and DynamicQuantizeLSTM) of the state inputs and of the outputs Y, Y_h, Y_c.
STATE_INPUTS = {5: "initial_h", 6: "initial_c"}
OUTPUTS = ("Y", "Y_h", "Y_c")


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Every shape known without data: initializers, declared inputs/outputs/value_info, then inferred ones."""
    def dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]

    known: dict[str, list[int | None]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph.value_info
    except Exception:  # inference itself can fail on odd or hostile graphs; declared shapes still count
        inferred = []
    for vi in [*inferred, *model.graph.value_info, *model.graph.input, *model.graph.output]:
        shape = dims(vi)
        if shape is not None:
            known[vi.name] = shape  # declared shapes (later in the list) win over inferred ones
    for t in model.graph.initializer:
        known[t.name] = [int(d) for d in t.dims]
    return known


def _fmt(shape: list[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def check_node_shapes(audit: Audit, model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    """MALFORMED_NODE for every state input, declared output or next-layer input that contradicts a node's sizes."""
    if not nodes:
        return
    known = _shapes(model)
    for layer, node in zip(audit.layers, nodes):
        if not layer.hidden_size or layer.direction not in ("forward", "reverse", "bidirectional"):
            continue
        h, d = layer.hidden_size, len(layer.directions)
        where = f"{layer.label} '{layer.node}' (hidden_size {h}, {d} direction(s))"
        problems: list[str] = []
        for pos, role in STATE_INPUTS.items():
            if cell_of(node) == "GRU" and role == "initial_c":
                continue
            value = node.input[pos] if len(node.input) > pos else ""
            shape = known.get(value)
            if value and shape is not None and not _fits(shape, [d, None, h]):
                problems.append(f"{role} '{value}': got shape {_fmt(shape)}, expected [{d}, batch, {h}]")
        for pos, role in enumerate(OUTPUTS):
            value = node.output[pos] if len(node.output) > pos else ""
            shape = known.get(value)
            expected = [None, d, None, h] if role == "Y" else [d, None, h]
            if value and shape is not None and not _fits(shape, expected):
                want = f"[time, {d}, batch, {h}]" if role == "Y" else f"[{d}, batch, {h}]"
                problems.append(f"output {role} '{value}': declared shape {_fmt(shape)}, expected {want}")
        if problems:
            audit.add("MALFORMED_NODE", "error", f"{where}: " + "; ".join(problems) + ". The node cannot run as written"
                      " (an exporter that drops LSTM's projection, PyTorch's proj_size, writes this)",
                      [layer.label])
    for prev, layer in zip(audit.layers, audit.layers[1:]):
        reads_prev = bool(layer.reads) and layer.reads[-1] == f"{prev.label} output Y"
        weighted = any("with weights" in s for s in layer.reads)
        width = prev.hidden_size * len(prev.directions)
        if reads_prev and not weighted and layer.input_size and prev.hidden_size and layer.input_size != width:
            audit.add("MALFORMED_NODE", "error", f"{layer.label} '{layer.node}' W: reads {prev.label}'s output "
                      f"({len(prev.directions)} x {prev.hidden_size} = {width} wide) but its input size is "
                      f"{layer.input_size}", [layer.label])


def _fits(shape: list[int | None], expected: list[int | None]) -> bool:
    """Same rank, and every dimension known on both sides equal."""
    if len(shape) != len(expected):
        return False
    return all(a is None or b is None or a == b for a, b in zip(shape, expected))
