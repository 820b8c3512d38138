"""Ragged batches: wiring `sequence_lens` into a model's recurrent nodes at load, and padding requests to one length.

A recurrent node given `sequence_lens` stops each row at its own length: its final states (Y_h, Y_c) are those
of the last real step, and Y is zero past it. So a graph whose outputs read only final states answers a padded
row exactly as it answers the row alone, and requests of different lengths can share one run.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from lstm_onnx.contract import ONNX_DOMAINS, RECURRENT_OPS

# Every ONNX recurrent op takes sequence_lens at input 4; plain RNN too, though the export never writes one.
SEQUENCE_LENS_OPS = (*RECURRENT_OPS, "RNN")
SEQUENCE_LENS_SLOT = 4  # X, W, R, B, sequence_lens for LSTM, GRU and RNN alike
LENGTHS_INPUT = "lstm_onnx.sequence_lens"  # a name no exported or foreign model is likely to use


@dataclass(frozen=True)
class RaggedPlan:
    """How a rewritten model takes ragged batches: which input carries time, and the added lengths input."""

    time_input: str
    lengths_input: str = LENGTHS_INPUT


def add_sequence_lens(model: onnx.ModelProto, trusted: bool) -> tuple[onnx.ModelProto, RaggedPlan] | tuple[None, str]:
    """Return (rewritten model, plan), or (None, why not) when padding could change an answer.

    `trusted` is True for models with the lstm-onnx contract, whose export guarantees that only the batch axis of
    the time input is read besides the recurrent path; foreign models must show it in the graph (no other
    reader of the time input at all).
    """
    graph = model.graph
    recurrent = [n for n in graph.node if n.domain in ONNX_DOMAINS and n.op_type in SEQUENCE_LENS_OPS]
    if not recurrent:
        return None, "no recurrent node"
    for node in recurrent:
        if len(node.input) > SEQUENCE_LENS_SLOT and node.input[SEQUENCE_LENS_SLOT]:
            return None, f"node '{node.name}' already takes sequence_lens"
        layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
        if layout != 0:
            return None, f"node '{node.name}' has layout {layout}"
    initializers = {t.name for t in graph.initializer}
    graph_inputs = [i for i in graph.input if i.name not in initializers]
    consumers = _consumers(graph)
    recurrent_x = {id(n): n.input[0] for n in recurrent}
    output_names = {o.name for o in graph.output}

    # Y (all steps) must reach nothing but other recurrent nodes' X: a padded step there would be read.
    for node in recurrent:
        if len(node.output) and node.output[0]:
            leak = _reaches_output(node.output[0], consumers, recurrent_x, output_names)
            if leak:
                return None, f"node '{node.name}': its all-steps output Y reaches {leak}, not only final states"

    feeding = [i.name for i in graph_inputs if _feeds_recurrent(i.name, consumers, recurrent_x)]
    if len(feeding) != 1:
        return None, f"expected one graph input feeding the recurrent nodes, found {feeding}"
    time_input = feeding[0]
    spec = next(i for i in graph_inputs if i.name == time_input)
    dims = spec.type.tensor_type.shape.dim
    if len(dims) != 3 or dims[1].HasField("dim_value"):
        return None, f"input '{time_input}' is not [batch, time, features] with a dynamic time axis"
    if not trusted and not _only_transposed_into_recurrent(time_input, consumers, recurrent_x):
        # A foreign graph may read the time axis elsewhere, or be time-major; only the plain pattern is safe.
        return None, (f"input '{time_input}' is read by more than a Transpose(perm [1, 0, 2]) into recurrent "
                      "nodes, and the model has no lstm-onnx contract")

    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    batch = dims[0].dim_param if dims[0].HasField("dim_param") else "batch"
    rewritten.graph.input.append(helper.make_tensor_value_info(LENGTHS_INPUT, TensorProto.INT32, [batch]))
    for node in rewritten.graph.node:
        if node.domain in ONNX_DOMAINS and node.op_type in SEQUENCE_LENS_OPS:
            while len(node.input) <= SEQUENCE_LENS_SLOT:
                node.input.append("")
            node.input[SEQUENCE_LENS_SLOT] = LENGTHS_INPUT
    return rewritten, RaggedPlan(time_input)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    found: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name:
                found.setdefault(name, []).append((node, slot))
    return found


def _reaches_output(start: str, consumers, recurrent_x: dict[int, str], outputs: set[str]) -> str | None:
    """Name an output reached from `start` by a path that does not enter a recurrent node as its X, else None.

    Entering any other node (including a recurrent node's state or weight slots, or a subgraph) counts as a read.
    """
    seen, todo = {start}, deque([start])
    while todo:
        name = todo.popleft()
        if name in outputs:
            return f"graph output '{name}'"
        for node, slot in consumers.get(name, []):
            if id(node) in recurrent_x and slot == 0:
                continue  # a recurrent node reads X only up to each row's length
            if id(node) in recurrent_x:
                return f"slot {slot} of node '{node.name}'"
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                return f"subgraph node '{node.name}'"
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    todo.append(out)
    return None


def _only_transposed_into_recurrent(start: str, consumers, recurrent_x: dict[int, str]) -> bool:
    """True when `start` [B, T, F] is read only by Transpose(perm [1, 0, 2]) nodes feeding recurrent X slots."""
    for node, _ in consumers.get(start, []):
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if node.op_type != "Transpose" or perm != [1, 0, 2]:
            return False
        readers = consumers.get(node.output[0], [])
        if not readers or any(id(r) not in recurrent_x or slot != 0 for r, slot in readers):
            return False
    return bool(consumers.get(start))


def _feeds_recurrent(start: str, consumers, recurrent_x: dict[int, str]) -> bool:
    seen, todo = {start}, deque([start])
    while todo:
        name = todo.popleft()
        for node, slot in consumers.get(name, []):
            if id(node) in recurrent_x:
                if slot == 0:
                    return True
                continue
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    todo.append(out)
    return False


def pad_time(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate [B_i, T_i, F] arrays along batch, zero-padded to the longest T; and each row's length (int32)."""
    longest = max(a.shape[1] for a in arrays)
    rows = sum(a.shape[0] for a in arrays)
    out = np.zeros((rows, longest, *arrays[0].shape[2:]), dtype=arrays[0].dtype)  # (B, T_max, F)
    lengths = np.empty(rows, dtype=np.int32)
    start = 0
    for a in arrays:
        out[start:start + a.shape[0], :a.shape[1]] = a
        lengths[start:start + a.shape[0]] = a.shape[1]
        start += a.shape[0]
    return out, lengths
