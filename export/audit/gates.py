"""Splitting an ONNX LSTM/GRU node's fused W, R, B, P into per-layer, per-direction, per-gate tensors."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from lstm_onnx.contract import MS_DOMAIN, ONNX_DOMAINS, QUANTIZED_RECURRENT_OPS, RECURRENT_OPS, initializer_names
from lstm_onnx.contract import ONNX_GATE_ORDER as ONNX_ORDER
from lstm_onnx.contract import PYTORCH_GATE_ORDER as PYTORCH_ORDER

from .result import DIRECTIONS, GateTensor

# The order a person asks about the gates in, used for tables and plots.
DISPLAY_ORDER: dict[str, tuple[str, ...]] = {
    "LSTM": ("input", "forget", "cell", "output"),
    "GRU": ("update", "reset", "hidden"),
}
LETTERS = {
    "LSTM": {"input": "i", "output": "o", "forget": "f", "cell": "c"},
    "GRU": {"update": "z", "reset": "r", "hidden": "h"},
}
PYTORCH_LETTERS = {
    "LSTM": {"input": "i", "forget": "f", "cell": "g", "output": "o"},
    "GRU": {"reset": "r", "update": "z", "hidden": "n"},
}
# ONNX's P holds peepholes for i, o, f (the cell candidate has none).
PEEPHOLE_ORDER = ("input", "output", "forget")
KINDS = ("W", "R", "bW", "bR", "P")


class GateShapeError(ValueError):
    """A recurrent node's W/R/B/P does not have the shape the operator spec requires."""


def cell_of(node: Any) -> str | None:
    """The cell a node computes ("LSTM"/"GRU"), for ONNX's ops and onnxruntime's quantized ones; None otherwise."""
    if node.domain in ONNX_DOMAINS and node.op_type in RECURRENT_OPS:
        return node.op_type
    if node.domain == MS_DOMAIN:
        return QUANTIZED_RECURRENT_OPS.get(node.op_type)
    return None


def gate_digest(array: np.ndarray) -> str:
    """SHA-256 of the slice as contiguous little-endian float32 bytes (docs/contract.md)."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return "sha256:" + hashlib.sha256(data.tobytes()).hexdigest()


def split_gates(
    op: str,
    layer: int,
    hidden: int,
    direction: str,
    tensors: dict[str, np.ndarray | None],
    sources: dict[str, str],
) -> list[GateTensor]:
    """Slice W, R, B (optional) and P (optional, LSTM only) of one node into GateTensors.

    `tensors` maps the operator's input names ("W", "R", "B", "P") to arrays (None: not resolved, skipped);
    `sources` to the names shown as their origin. Shapes are checked against the spec: W [D, G*H, in],
    R [D, G*H, H], B [D, 2*G*H], P [D, 3*H]. Gates come kind by kind: W, R, then bW/bR, then P.
    """
    order = ONNX_ORDER[op]
    dirs = DIRECTIONS[direction]
    g, h, d = len(order), hidden, len(dirs)
    node = f"layer{layer} {op}"
    w, r = tensors.get("W"), tensors.get("R")
    if w is not None and (w.ndim != 3 or w.shape[:2] != (d, g * h)):
        raise GateShapeError(f"{node} W '{sources['W']}': got shape {list(w.shape)}, expected [{d}, {g * h}, input]")
    if r is not None:
        _expect_shape(node, "R", sources, r, (d, g * h, h))
    out: list[GateTensor] = []
    for kind, fused in (("W", w), ("R", r)):
        if fused is None:  # not resolved: the other tensors are still split (a partial audit, not none)
            continue
        for di, dname in enumerate(dirs):
            for gi, gate in enumerate(order):
                rows = slice(gi * h, (gi + 1) * h)
                span = f"{rows.start}:{rows.stop}"
                out.append(GateTensor(layer, dname, gate, kind, fused[di, rows, :], sources[kind],
                                      f"[{di}, {span}, :]"))
    b = tensors.get("B")
    if b is not None:
        _expect_shape(node, "B", sources, b, (d, 2 * g * h))
        for di, dname in enumerate(dirs):
            for gi, gate in enumerate(order):
                lo, hi = gi * h, (gi + 1) * h
                out.append(GateTensor(layer, dname, gate, "bW", b[di, lo:hi], sources["B"], f"[{di}, {lo}:{hi}]"))
                lo2, hi2 = lo + g * h, hi + g * h
                out.append(GateTensor(layer, dname, gate, "bR", b[di, lo2:hi2], sources["B"], f"[{di}, {lo2}:{hi2}]"))
    p = tensors.get("P")
    if p is not None:
        if op != "LSTM":
            raise GateShapeError(f"{node}: has a peephole input P, but only LSTM has peepholes")
        _expect_shape(node, "P", sources, p, (d, 3 * h))
        for di, dname in enumerate(dirs):
            for pi, gate in enumerate(PEEPHOLE_ORDER):
                lo, hi = pi * h, (pi + 1) * h
                out.append(GateTensor(layer, dname, gate, "P", p[di, lo:hi], sources["P"], f"[{di}, {lo}:{hi}]"))
    return out


def _expect_shape(node: str, name: str, sources: dict[str, str], array: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(array.shape) != shape:
        raise GateShapeError(
            f"{node} {name} '{sources[name]}': got shape {list(array.shape)}, expected {list(shape)}"
        )


def pytorch_source(op: str, layer: int, direction: str, gate: str, kind: str, hidden: int) -> tuple[str, slice] | None:
    """The PyTorch parameter and row range an ONNX gate slice comes from (None for peepholes).

    ONNX's B is concat(bias_ih, bias_hh), so bW maps to bias_ih and bR to bias_hh, each reordered
    like the weights.
    """
    stem = {"W": "weight_ih", "R": "weight_hh", "bW": "bias_ih", "bR": "bias_hh"}.get(kind)
    if stem is None:
        return None
    suffix = "_reverse" if direction == "reverse" else ""
    block = PYTORCH_ORDER[op].index(gate)
    return f"rnn.{stem}_l{layer}{suffix}", slice(block * hidden, (block + 1) * hidden)


def describe_layout(op: str, hidden: int, num_directions: int, input_size: int, peepholes: bool = False) -> list[str]:
    """Lines explaining where each gate sits in the fused ONNX tensors and in PyTorch's."""
    g, h = len(ONNX_ORDER[op]), hidden
    onnx_rows = ", ".join(f"{i * h}:{(i + 1) * h} {gate}" for i, gate in enumerate(ONNX_ORDER[op]))
    torch_rows = ", ".join(
        f"{i * h}:{(i + 1) * h} {gate}({PYTORCH_LETTERS[op][gate]})" for i, gate in enumerate(PYTORCH_ORDER[op])
    )
    letters = ", ".join(LETTERS[op][x] for x in ONNX_ORDER[op])
    torch_letters = ", ".join(PYTORCH_LETTERS[op][x] for x in PYTORCH_ORDER[op])
    lines = [
        f"ONNX stores {op} gates in the order {letters}; PyTorch in {torch_letters}.",
        f"  W [{num_directions}, {g * h}, {input_size}] and R [{num_directions}, {g * h}, {h}]: "
        f"rows {onnx_rows} (first axis = direction: 0 forward, 1 reverse).",
        f"  B [{num_directions}, {2 * g * h}]: bW = columns 0:{g * h} in the same gate order, "
        f"bR = columns {g * h}:{2 * g * h}.",
    ]
    if op == "LSTM" and peepholes:
        lines.append(f"  P [{num_directions}, {3 * h}] (peepholes, optional): {h}-wide blocks for i, o, f.")
    lines.append(f"  PyTorch weight_ih_l{{k}}/weight_hh_l{{k}}/bias_*_l{{k}}: rows {torch_rows}.")
    return lines


def gate_digests(cell: str, layers: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> dict[str, str]:
    """Digest of every gate slice, keyed `layer{k}.{direction}.{gate}.{part}`, exactly as the audit computes it."""
    op = cell.upper()
    digests: dict[str, str] = {}
    for k, (W, R, B) in enumerate(layers):
        direction = "bidirectional" if W.shape[0] == 2 else "forward"
        names = initializer_names(k)
        for gate in split_gates(op, k, R.shape[-1], direction, {"W": W, "R": R, "B": B}, names):
            digests[gate.key] = gate_digest(gate.array)
    return digests
