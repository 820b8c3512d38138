"""Torch -> ONNX with one explicit LSTM/GRU node per layer, readable names and the contract in metadata."""
from __future__ import annotations

import io
import json
import warnings
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lstm_onnx.contract import (
    CONTRACT_FORMAT,
    METADATA_KEY,
    MS_DOMAIN,
    QUANTIZED_RECURRENT_OPS,
    RECURRENT_OPS,
    initializer_names,
)

from .audit.gates import gate_digests

DEFAULT_OPSET = 17
# Opset 14 is the first with LSTM's `layout` attribute defined (we keep it 0); 20 is the newest the
# TorchScript exporter in torch 2.13 writes.
MIN_OPSET, MAX_OPSET = 14, 20
LOOP_OPS = ("Loop", "Scan")


class ExportError(Exception):
    """The network cannot be exported as explicit recurrent nodes, or the result breaks the contract."""


def _io_names(cell: str) -> tuple[list[str], list[str]]:
    if cell == "lstm":
        return ["input", "h0", "c0"], ["output", "hn", "cn"]
    return ["input", "h0"], ["output", "hn"]


def trace_to_onnx(net: Any, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export an eval-mode StackedRNN with dynamic batch and time axes.

    Uses the TorchScript exporter: in torch 2.13 the dynamo exporter freezes the time axis of RNNs
    (a model traced at T=5 then refuses T=7), which would make the graph useless for serving.
    """
    import torch

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset: got {opset}, expected {MIN_OPSET}..{MAX_OPSET}")
    cfg = net.config
    net = net.eval()
    inputs, outputs = _io_names(cfg.cell)
    batch, time = 2, 5  # any values: both axes are declared dynamic below
    x = torch.zeros(batch, time, cfg.input_size)
    state = net.initial_state(batch)
    dynamic_axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in inputs + outputs}
    dynamic_axes["input"] = {0: "batch", 1: "time"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about tracing RNNs with a
        # batch size other than 1; neither applies to a graph whose axes are declared dynamic and
        # then checked at other sizes by verify.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (x, *state),
            buffer,
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def recurrent_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """LSTM/GRU nodes in the graph's (topological) order."""
    return [n for n in graph.node if n.op_type in RECURRENT_OPS]


def check_explicit(model: onnx.ModelProto, cell: str, num_layers: int) -> None:
    """Fail unless the graph holds exactly one explicit recurrent node per layer and no loops."""
    graph = model.graph
    loops = [n.op_type for n in graph.node if n.op_type in LOOP_OPS]
    if loops:
        raise ExportError(f"graph computes its recurrence with {sorted(set(loops))} nodes, expected explicit {cell.upper()} nodes")
    # onnxruntime's int8 DynamicQuantizeLSTM is as explicit as LSTM: one node per layer, gates readable.
    nodes = recurrent_nodes(graph)
    nodes += [n for n in graph.node if n.domain == MS_DOMAIN and n.op_type in QUANTIZED_RECURRENT_OPS]
    op = cell.upper()
    wrong = [n.op_type for n in nodes if QUANTIZED_RECURRENT_OPS.get(n.op_type, n.op_type) != op]
    if not nodes:
        raise ExportError(f"graph has no {op} node, expected {num_layers} (one per layer); the recurrence was unrolled")
    if wrong:
        raise ExportError(f"graph has {wrong[0]} nodes in a {op} model")
    if len(nodes) != num_layers:
        raise ExportError(f"graph has {len(nodes)} {op} nodes, expected {num_layers} (one per layer)")
    for node in nodes:
        for attr in node.attribute:
            if attr.name == "layout" and attr.i != 0:
                raise ExportError(f"node {node.name!r}: layout={attr.i}, expected 0 (onnxruntime refuses layout 1)")


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for init in graph.initializer:
        if init.name == old:
            init.name = new
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for vi in list(graph.input) + list(graph.value_info):
        if vi.name == old:
            vi.name = new


def name_recurrent_tensors(model: onnx.ModelProto, cell: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Give each layer's node and W/R/B initializers readable names; return the arrays per layer."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    layers = []
    for k, node in enumerate(recurrent_nodes(graph)):
        node.name = f"layer{k}.{cell}"
        names = initializer_names(k)
        arrays = []
        for slot, part in enumerate(("W", "R", "B")):
            # Inputs of LSTM/GRU: X, W, R, B, sequence_lens, initial_h[, initial_c, P].
            src = node.input[slot + 1] if slot + 1 < len(node.input) else ""
            if not src:
                arrays.append(None)
                continue
            if src not in inits:
                raise ExportError(f"node {node.name!r}: {part} input {src!r} is not an initializer")
            arrays.append(numpy_helper.to_array(inits[src]))
            if src != names[part]:
                _rename(graph, src, names[part])
        layers.append((arrays[0], arrays[1], arrays[2]))
    # Other anonymous nodes get names too, so error messages and profiles point somewhere.
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type.lower()}_{i}"
    return layers


def build_contract(config: Any, layers: list, checkpoint_digest: str) -> dict[str, Any]:
    c = config
    inputs, outputs = _io_names(c.cell)
    return {
        "format": CONTRACT_FORMAT,
        "cell": c.cell,
        "input_size": c.input_size,
        "hidden_size": c.hidden_size,
        "num_layers": c.num_layers,
        "num_directions": c.num_directions,
        "task": c.task,
        "num_outputs": c.num_outputs,
        "inputs": inputs,
        "outputs": outputs,
        "state": [{"input": i, "output": o} for i, o in zip(inputs[1:], outputs[1:])],
        "gate_digests": gate_digests(c.cell, layers),
        "checkpoint_digest": checkpoint_digest,
        "versions": tool_versions(),
    }


def tool_versions() -> dict[str, str]:
    """The versions that made this file: ours is the producer; torch and onnx are recorded beside it."""
    import torch

    from lstm_onnx import __version__

    return {"lstm_onnx": __version__, "torch": torch.__version__, "onnx": onnx.__version__}


def set_contract(model: onnx.ModelProto, contract: dict[str, Any]) -> None:
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(contract, separators=(",", ":")))


def export_onnx(net: Any, checkpoint_digest: str, opset: int = DEFAULT_OPSET) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Export, check explicitness, name the tensors and attach the contract. Returns (model, contract)."""
    cfg = net.config
    model = trace_to_onnx(net, opset)
    check_explicit(model, cfg.cell, cfg.num_layers)
    layers = name_recurrent_tensors(model, cfg.cell)
    contract = build_contract(cfg, layers, checkpoint_digest)
    model.producer_name = "lstm-onnx"
    model.producer_version = contract["versions"]["lstm_onnx"]  # torch.onnx wrote its own version here
    model.doc_string = (
        f"Stacked {cfg.cell.upper()}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{'bidirectional' if cfg.bidirectional else 'unidirectional'}, {cfg.task} head with {cfg.num_outputs} outputs"
    )
    set_contract(model, contract)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {str(exc).splitlines()[0]}") from None
    return model, contract

