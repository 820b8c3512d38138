"""Static folding of weights computed from constants (Slice/Concat of raw parameters, Cast, Reshape, Transpose, ...).

A weight whose whole upstream subgraph reads only initializers and Constant nodes has one value whatever
the inputs; onnx's reference evaluator computes it node by node. Only side-effect-free ops on the
allow-list are run, and sizes are bounded before each node runs, so a hostile file cannot make the
audit allocate without limit or run anything but arithmetic on its own constants.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

# Data-movement and elementwise ops: what exporters and hand-built graphs put between a parameter and W/R/B.
FOLDABLE_OPS = frozenset({
    "Identity", "Constant", "Cast", "CastLike", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten",
    "Concat", "Slice", "Split", "Gather", "Expand", "Tile", "ConstantOfShape", "Add", "Sub", "Mul", "Div", "Neg",
    "DequantizeLinear",
})
MAX_NODES = 512  # an unfolded TorchScript LSTM layer needs ~40
MAX_ELEMENTS = 1 << 26  # per tensor (256 MiB of float32): larger than any recurrent weight we expect
MAX_TOTAL_BYTES = 1 << 30  # all values of one folded subgraph together


class FoldError(ValueError):
    """A constant subgraph could not be folded (an op off the allow-list, too large, or the evaluator failed)."""


@dataclass
class Folded:
    """A weight computed from constants: its value, the constants it was read from and the ops on the way."""

    array: np.ndarray
    leaves: list[str]  # float initializers / Constant outputs it reads (what the audit claims as recurrent)
    path: str  # e.g. "rnn.weight_ih_l0 -> Slice x4 -> Concat -> Unsqueeze"


def constant_subgraph(index: Any, name: str) -> list[onnx.NodeProto] | None:
    """The nodes computing `name`, in topological order, when every leaf is a constant; None otherwise.

    Raises FoldError when the subgraph uses an op off the allow-list or is larger than MAX_NODES.
    """
    needed: dict[int, onnx.NodeProto] = {}
    stack = [name]
    while stack:
        value = stack.pop()
        if not value or value in index.initializers:
            if value in index.inputs:
                return None  # an initializer a caller can override is not a constant
            continue
        node = index.producers.get(value)
        if node is None:
            return None  # a graph input: computed at run time
        if id(node) in needed:
            continue
        if node.op_type not in FOLDABLE_OPS or node.domain not in ("", "ai.onnx"):
            raise FoldError(f"'{value}' is computed by {node.op_type} '{node.name}', which is not on the audit's list "
                            f"of foldable ops ({', '.join(sorted(FOLDABLE_OPS))})")
        needed[id(node)] = node
        if len(needed) > MAX_NODES:
            raise FoldError(f"'{name}' is computed by more than {MAX_NODES} nodes, more than the audit folds")
        stack.extend(node.input)
    position = {id(n): i for i, n in enumerate(index.graph.node)}
    return _topological([n for n in needed.values()], position)


def fold_constant(index: Any, name: str, opset: int) -> Folded | None:
    """Evaluate `name` when it depends on constants only; None when it depends on a graph input."""
    nodes = constant_subgraph(index, name)
    if nodes is None:
        return None
    from onnx.reference import ReferenceEvaluator  # lazily: only graphs that compute weights need it

    values: dict[str, np.ndarray] = {}
    leaves: list[str] = []
    held = 0
    for node in nodes:
        feeds = {}
        for value in node.input:
            if not value:
                continue
            if value not in values:
                values[value] = index.initializer_array(value)
                if np.issubdtype(values[value].dtype, np.floating) and value not in leaves:
                    leaves.append(value)
            feeds[value] = values[value]
        _check_output_size(node, feeds)
        try:
            outputs = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
        except Exception as exc:  # the evaluator raises anything from ValueError to IndexError on bad input
            why = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise FoldError(f"folding {node.op_type} '{node.name}': {why}") from None
        for out, array in zip(node.output, outputs):
            array = np.asarray(array)
            if array.size > MAX_ELEMENTS:
                raise FoldError(f"folding {node.op_type} '{node.name}': output '{out}' has {array.size} elements, "
                                f"more than the {MAX_ELEMENTS} the audit folds")
            values[out] = array
            held += array.nbytes
            if held > MAX_TOTAL_BYTES:
                raise FoldError(f"folding '{name}': its subgraph holds more than {MAX_TOTAL_BYTES} bytes of values")
            if node.op_type == "Constant" and np.issubdtype(array.dtype, np.floating):
                leaves.append(out)
    return Folded(values[name], leaves, _describe(nodes, leaves))


def _check_output_size(node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> None:
    """Refuse a node whose output would exceed MAX_ELEMENTS, before the evaluator allocates it.

    Sizes come from the constant inputs: the shape operand of Expand/Tile/ConstantOfShape, the sum of
    Concat's inputs, Gather's indices, and the broadcast shape of elementwise ops. Other allow-listed ops
    (Reshape, Transpose, Slice, Cast, ...) never produce more elements than they read.
    """
    inputs = [feeds.get(v) for v in node.input]
    count = 0
    try:
        if node.op_type in ("Expand", "ConstantOfShape", "Tile"):
            shape_at = 0 if node.op_type == "ConstantOfShape" else 1
            data = None if node.op_type == "ConstantOfShape" else inputs[0]
            if len(inputs) <= shape_at or inputs[shape_at] is None:
                return
            dims = [int(d) for d in np.asarray(inputs[shape_at]).reshape(-1)]
            if node.op_type == "Tile" and data is not None:
                dims = [int(a) * b for a, b in zip(data.shape, dims)]
            elif node.op_type == "Expand" and data is not None:
                dims = list(np.broadcast_shapes(tuple(max(d, 1) for d in dims), data.shape))
            count = _product(dims)
        elif node.op_type == "Concat":
            count = sum(int(a.size) for a in inputs if a is not None)
        elif node.op_type == "Gather" and len(inputs) > 1 and inputs[0] is not None and inputs[1] is not None:
            data = inputs[0]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            along = data.shape[axis] if data.ndim and -data.ndim <= axis < data.ndim else 1
            count = int(inputs[1].size) * (int(data.size) // max(int(along), 1))
        elif node.op_type in ("Add", "Sub", "Mul", "Div"):
            count = _product(np.broadcast_shapes(*(a.shape for a in inputs if a is not None)))
    except (ValueError, TypeError, OverflowError) as exc:  # shapes that cannot broadcast: the evaluator would fail too
        raise FoldError(f"folding {node.op_type} '{node.name}': {exc}") from None
    if count > MAX_ELEMENTS:
        raise FoldError(f"folding {node.op_type} '{node.name}': would make {count} elements, "
                        f"more than the {MAX_ELEMENTS} the audit folds")


def _product(dims) -> int:
    count = 1
    for d in dims:
        count *= max(int(d), 0)
    return count


def _describe(nodes: list[onnx.NodeProto], leaves: list[str]) -> str:
    """Leaves, then the ops in order, repeats of one op run together: "p -> Slice x4 -> Concat -> Unsqueeze"."""
    steps: list[list] = []
    for node in nodes:
        if node.op_type == "Constant":
            continue
        if steps and steps[-1][0] == node.op_type:
            steps[-1][1] += 1
        else:
            steps.append([node.op_type, 1])
    ops = [op if n == 1 else f"{op} x{n}" for op, n in steps]
    return " -> ".join([", ".join(leaves) or "constants"] + ops)


def _topological(nodes: list[onnx.NodeProto], position: dict[int, int]) -> list[onnx.NodeProto]:
    produced = {out: n for n in nodes for out in n.output}
    done: set[int] = set()
    order: list[onnx.NodeProto] = []

    def visit(node: onnx.NodeProto, depth: int = 0) -> None:
        if id(node) in done:
            return
        if depth > MAX_NODES:
            raise FoldError("constant subgraph contains a cycle")
        for value in node.input:
            if value in produced:
                visit(produced[value], depth + 1)
        done.add(id(node))
        order.append(node)

    for node in sorted(nodes, key=lambda n: position[id(n)]):
        visit(node)
    return order
