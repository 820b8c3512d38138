"""Weight-change report: every trainable tensor, split per layer, direction and gate, and how far it moved."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from lstm_onnx.contract import CELL_OPS, PYTORCH_GATE_ORDER

from .config import ModelConfig

# PyTorch tensor prefix -> the contract's part name (W input weights, R recurrent, bW/bR their biases).
PARTS = (("weight_ih", "W"), ("weight_hh", "R"), ("bias_ih", "bW"), ("bias_hh", "bR"))
DIRECTIONS = ("forward", "reverse")


def _change(initial: torch.Tensor, final: torch.Tensor) -> tuple[float, float | None]:
    """(||w - w0||, ||w - w0|| / ||w0||); the ratio is None when w0 is all zeros."""
    diff = float(torch.linalg.vector_norm((final.double() - initial.double()).flatten()))
    base = float(torch.linalg.vector_norm(initial.double().flatten()))
    return diff, (diff / base if base > 0 else None)


def weight_change_rows(initial: Mapping[str, torch.Tensor], final: Mapping[str, torch.Tensor],
                       config: ModelConfig) -> list[dict[str, Any]]:
    """One row per gate slice of every recurrent tensor, plus one per head tensor.

    Row keys: tensor (state-dict name), shape (the whole tensor), layer, direction, gate, part
    (W/R/bW/bR, or weight/bias for the head), slice_shape, abs_change, rel_change (||w-w0||/||w0||).
    """
    missing = sorted(set(initial) ^ set(final))
    if missing:
        raise ValueError(f"weight report: tensors {missing} are in only one of the initial and final weights")
    gates = PYTORCH_GATE_ORDER[CELL_OPS[config.cell]]
    hidden = config.hidden_size
    rows: list[dict[str, Any]] = []
    for layer in range(config.num_layers):
        for d in range(config.num_directions):
            suffix = "_reverse" if d else ""
            for prefix, part in PARTS:
                name = f"rnn.{prefix}_l{layer}{suffix}"
                w0, w = initial[name], final[name]
                for g, gate in enumerate(gates):
                    rows_slice = slice(g * hidden, (g + 1) * hidden)  # (H, in) or (H,) for this gate
                    abs_change, rel_change = _change(w0[rows_slice], w[rows_slice])
                    rows.append({
                        "tensor": name, "shape": list(w.shape), "layer": layer, "direction": DIRECTIONS[d],
                        "gate": gate, "part": part, "slice_shape": list(w[rows_slice].shape),
                        "abs_change": abs_change, "rel_change": rel_change,
                    })
    for name in ("head.weight", "head.bias"):
        abs_change, rel_change = _change(initial[name], final[name])
        rows.append({
            "tensor": name, "shape": list(final[name].shape), "layer": None, "direction": None, "gate": None,
            "part": name.split(".")[1], "slice_shape": list(final[name].shape),
            "abs_change": abs_change, "rel_change": rel_change,
        })
    covered = {r["tensor"] for r in rows}
    uncovered = sorted(set(final) - covered)
    if uncovered:  # a tensor the report does not know would silently escape the "did every weight move" answer
        raise ValueError(f"weight report: tensors {uncovered} are not covered, expected only {config.cell} and head tensors")
    return rows


def unchanged_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose weights did not move at all."""
    return [r for r in rows if r["abs_change"] == 0.0]


def format_weight_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: one line per gate slice, grouped by tensor, with its relative change."""
    header = ("tensor", "shape", "layer", "direction", "gate", "part", "slice", "rel change")
    lines = [header]
    for r in rows:
        rel = r["rel_change"]
        rel_text = "n/a (w0=0)" if rel is None else f"{rel:.4f}"
        if r["abs_change"] == 0.0:
            rel_text += "  UNCHANGED"
        lines.append((
            r["tensor"], "x".join(map(str, r["shape"])),
            "-" if r["layer"] is None else str(r["layer"]), r["direction"] or "-", r["gate"] or "-", r["part"],
            "x".join(map(str, r["slice_shape"])), rel_text,
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    stuck = unchanged_rows(rows)
    tensors = len({r["tensor"] for r in rows})
    out.append(f"{tensors} tensors, {len(rows)} gate/tensor slices; "
               + (f"{len(stuck)} did not change" if stuck else "every one changed during training"))
    return "\n".join(out)

