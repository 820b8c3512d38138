"""The parameters outside the recurrent nodes (the head), counted the way a framework counts its parameters.

The counting rule (docs/contract.md, "What the audit counts"): a parameter is a tensor the model learns.
Counted: every float initializer outside the recurrent nodes that some node reads as an operand, and every
integer weight of a quantized MatMul (at its element count, dequantized for the statistics). Not counted:
  - rank-0 initializers: exporters' fill values (a scalar 0 for Expand/ConstantOfShape, a 1.0 for Mul);
  - initializers read only as a recurrent node's initial state (initial_h/initial_c), directly or through
    shape ops: torch's dynamo exporter writes the zero initial state of nn.LSTM as one;
  - the scales and zero points of quantized weights: they belong to the integer tensor, counted once.
Each tensor left out is listed in the report with its reason, so the totals can be checked by hand.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from lstm_onnx.contract import MS_DOMAIN, ONNX_DOMAINS

from .external import ExternalDataError
from .gates import GateShapeError, cell_of
from .quantized import dequantize_matrix
from .result import Audit, HeadTensor

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
# Ops that only move or reshape a state value on its way to initial_h/initial_c.
STATE_SHAPING_OPS = ("Identity", "Cast", "Expand", "Tile", "Reshape", "Unsqueeze", "Squeeze", "Concat", "Transpose")
# Integer-weight matmuls: op (domain) -> positions of B, its scale (None: a Mul after it holds it) and zero point.
QUANTIZED_MATMULS: dict[tuple[str, str], tuple[int, int | None, int]] = {
    ("", "MatMulInteger"): (1, None, 3),
    (MS_DOMAIN, "DynamicQuantizeMatMul"): (1, 2, 3),
    (MS_DOMAIN, "MatMulIntegerToFloat"): (1, 3, 5),
}
INITIAL_STATE_SLOTS = (5, 6)  # initial_h, initial_c of LSTM/GRU (and DynamicQuantizeLSTM)


def collect_head(audit: Audit, index: Any, claimed: set[str]) -> list[HeadTensor]:
    """HeadTensors for every parameter outside the recurrent nodes; what is left out goes to audit.not_counted."""
    head: list[HeadTensor] = []
    claimed = set(claimed)
    for node in index.graph.node:
        slots = QUANTIZED_MATMULS.get(("" if node.domain in ONNX_DOMAINS else node.domain, node.op_type))
        if slots is not None:
            tensor = _quantized_weight(audit, index, node, slots, claimed)
            if tensor is not None:
                head.append(tensor)
    for tensor in index.graph.initializer:
        if tensor.name in claimed or tensor.data_type not in FLOAT_TYPES:
            continue
        if len(tensor.dims) == 0:
            audit.not_counted.append((tensor.name, "a scalar constant (rank 0), not a learned tensor"))
            continue
        if _only_initial_state(index, tensor.name):
            audit.not_counted.append((tensor.name,
                                      f"{list(tensor.dims)}, read only as a recurrent node's initial state"))
            continue
        try:
            array = index.initializer_array(tensor.name)
        except ExternalDataError as exc:
            audit.add("EXTERNAL_DATA", "error", str(exc), [tensor.name])
            continue
        head.append(HeadTensor(tensor.name, array, _consumers(index, tensor.name)))
    return head


def _consumers(index: Any, name: str) -> list[str]:
    return [f"{n.op_type} '{n.name}'" if n.name else n.op_type for n in index.consumers.get(name, [])]


def _only_initial_state(index: Any, name: str) -> bool:
    """True when every path from `name` ends in a recurrent node's initial_h/initial_c (through shape ops only)."""
    seen: set[str] = set()
    stack, reached = [name], False
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        users = index.consumers.get(value, [])
        if not users:
            return False  # a graph output or dead value: not a state fill
        for node in users:
            if cell_of(node):
                slots = [i for i, v in enumerate(node.input) if v == value]
                if any(i not in INITIAL_STATE_SLOTS for i in slots):
                    return False
                reached = True
            elif node.op_type in STATE_SHAPING_OPS and node.input and node.input[0] == value:
                stack.extend(o for o in node.output if o)
            elif node.op_type in ("Expand", "Reshape", "Tile") and value in node.input[1:]:
                continue  # a shape operand
            else:
                return False
    return reached


def _quantized_weight(audit: Audit, index: Any, node: onnx.NodeProto, slots: tuple[int, int | None, int],
                      claimed: set[str]) -> HeadTensor | None:
    b_pos, scale_pos, zp_pos = slots
    b = node.input[b_pos] if len(node.input) > b_pos else ""
    if b not in index.initializers:
        return None  # both operands computed: an activation product, no weight
    zp = node.input[zp_pos] if len(node.input) > zp_pos and node.input[zp_pos] else None
    if scale_pos is not None and len(node.input) > scale_pos:
        scale = node.input[scale_pos]
    else:
        scale = _matmul_integer_scale(index, node, b)
    where = f"{node.op_type} '{node.name or node.output[0]}'"
    if scale is None or scale not in index.initializers:
        audit.add("UNRESOLVED_WEIGHT", "warning", f"{where}: integer weight '{b}' has no scale the audit can find "
                  "(expected a Mul by an initializer after it): its values are shown as the stored integers", [b])
        claimed.add(b)
        array = index.initializer_array(b)
        return HeadTensor(b, array.astype(np.float32), _consumers(index, b))
    try:
        q = index.initializer_array(b)
        value, quant = dequantize_matrix(b, q, index.initializer_array(scale),
                                         index.initializer_array(zp) if zp in index.initializers else None,
                                         (b, scale, zp or ""))
    except (GateShapeError, ExternalDataError) as exc:
        audit.add("MALFORMED_NODE", "error", f"{where}: {exc}", [b])
        return None
    claimed.update(x for x in (b, scale, zp) if x)
    origin = b[: -len("_quantized")] if b.endswith("_quantized") else b
    transposed = origin.endswith("_Transposed")  # quantize_dynamic's name for a Gemm(transB=1) weight
    origin = origin[: -len("_Transposed")] if transposed else origin
    return HeadTensor(b, value, _consumers(index, b), quant, origin, transposed)


def _matmul_integer_scale(index: Any, node: onnx.NodeProto, b: str) -> str | None:
    """MatMulInteger's weight scale: quantize_dynamic multiplies it into A's scale (Mul(a_scale, b_scale))."""
    a_producer = index.producers.get(node.input[0]) if node.input else None
    if a_producer is not None and a_producer.op_type == "DynamicQuantizeLinear" and len(a_producer.output) > 1:
        for mul in index.consumers.get(a_producer.output[1], []):
            if mul.op_type == "Mul":
                other = [v for v in mul.input if v != a_producer.output[1]]
                if other and other[0] in index.initializers:
                    return other[0]
    guess = b[: -len("_quantized")] + "_scale" if b.endswith("_quantized") else None
    return guess if guess in index.initializers else None
