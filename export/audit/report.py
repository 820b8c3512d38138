"""Rendering an Audit: fixed-column text tables, JSON with a SHA-256 per tensor and a gate npz (heatmaps: plot.py)."""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .findings import gate_stats
from .gates import DISPLAY_ORDER, KINDS, LETTERS, PYTORCH_LETTERS, describe_layout, gate_digest
from .result import Audit, GateTensor, Layer, Quantization

REPORT_FORMAT = "lstm-onnx-audit/1"
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def _num(x: float) -> str:
    return f"{x:+.4f}" if math.isfinite(x) else str(x)


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = indent + "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*headers).rstrip()] + [fmt.format(*r).rstrip() for r in rows]


def _ordered_gates(layer: Layer) -> list[GateTensor]:
    """Kind first (W_i, W_f, W_c, W_o, then R, bW, bR, P), gates in the order a person asks about them."""
    order = DISPLAY_ORDER[layer.op]
    return sorted(layer.gates, key=lambda g: (layer.directions.index(g.direction), KINDS.index(g.kind), order.index(g.gate)))


def _scale_text(values: np.ndarray) -> str:
    lo, hi = float(np.min(values)), float(np.max(values))
    return f"{lo:.4g}" if lo == hi else f"{lo:.4g}..{hi:.4g}"


def _zero_text(values: np.ndarray) -> str:
    lo, hi = int(np.min(values)), int(np.max(values))
    return str(lo) if lo == hi else f"{lo}..{hi}"


def quant_columns(q: Quantization | None) -> list[str]:
    """Integer range, scale and zero point of one quantized tensor ("-" for a float one)."""
    if q is None:
        return ["-", "-", "-"]
    lo, hi = q.q_range
    return [f"{q.dtype} {lo}..{hi}", _scale_text(q.scale), _zero_text(q.zero_point)]


def _quant_error(audit: Audit, key: str) -> list[str]:
    err = (audit.quant_errors or {}).get(key)
    if err is None:
        return ["-", "-", "-"]
    return [f"{err['max_abs']:.2e}", f"{err['relative']:.2e}", f"{err['bound_share']:.2f}"]


def _same_text(info: dict[str, Any]) -> str:
    if info["identical"]:
        return " =="
    return " ~= (within scale/2)" if info.get("within_scale_half") else " DIFFERS"


def _trained(audit: Audit, key: str) -> str:
    info = (audit.checkpoint or {}).get(key)
    if info is None or info["change"] is None:
        return "-"
    return "UNCHANGED" if info["change"] <= 1e-7 else f"moved {info['change']:.2e}"


def format_text(audit: Audit) -> str:
    """The human report: how the gates are laid out, one table per layer, the head, totals, findings."""
    versions = (audit.contract or {}).get("versions") or {}
    made_with = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "lstm_onnx")
    lines = [f"ONNX weight audit: {audit.path} (producer: {audit.producer}{f'; made with {made_with}' if made_with else ''})"]
    c = audit.contract
    if c:
        lines.append(f"contract: {c.get('format')}, {c.get('cell')}, {c.get('num_layers')} layer(s), hidden "
                     f"{c.get('hidden_size')}, {c.get('num_directions')} direction(s)")
    else:
        lines.append("contract: none (no lstm_onnx.contract metadata; layers are numbered in topological order)")
    seen_ops: set[str] = set()
    for layer in audit.layers:
        if layer.op in seen_ops or not layer.gates:
            continue
        seen_ops.add(layer.op)
        lines += ["", f"Where the {layer.op} gates live in the fused tensors (layer{layer.index} shapes):"]
        has_p = any(x.sources.get("P") for x in audit.layers)
        lines += ["  " + s for s in describe_layout(layer.op, layer.hidden_size, len(layer.directions),
                                                     layer.input_size or 0, has_p)]
    if audit.layers:
        lines += ["", "Between layers (what feeds each layer's input X, nearest op first):"]
        for layer in audit.layers:
            lines.append(f"  {layer.label} <- " + " <- ".join(layer.reads))
        lines += ["  " + s for s in _describe_stacking(audit)]
    for layer in audit.layers:
        lines += [""] + _layer_lines(audit, layer)
    lines += ["", "Other parameters (the head and anything outside the recurrent nodes):"]
    lines += _table(*head_table(audit)) if audit.head else ["  none"]
    if audit.not_counted:
        lines.append("  not parameters (the counting rule of docs/contract.md):")
        lines += [f"    {name}: {why}" for name, why in audit.not_counted]
    if audit.against is not None:
        lines += [""] + against_lines(audit)
    lines += ["", parameter_totals(audit)]
    counts = {s: sum(f.severity == s for f in audit.findings) for s in SEVERITY_ORDER}
    lines += ["", f"findings: {counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info"]
    for f in sorted_findings(audit):
        lines.append(f"  {f.severity.upper():<8} {f.code:<20} {f.message}")
    return "\n".join(lines) + "\n"


def against_lines(audit: Audit) -> list[str]:
    """The --against section: structure, then one row per gate tensor with its status and change."""
    lines = [f"Against {audit.against_path}:"]
    lines += [f"  structure: {d}" for d in audit.structure] or ["  structure: same (layers, cell, hidden size, "
                                                                "directions, input size, head)"]
    counts: dict[str, int] = {}
    for e in audit.against.values():
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    lines.append("  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return lines + _table(*against_table(audit))


def _describe_stacking(audit: Audit) -> list[str]:
    """Say whether each layer reads exactly the previous layer's output, with no weights in between."""
    odd = []
    for layer in audit.layers[1:]:
        feeds_from_previous = bool(layer.reads) and layer.reads[-1] == f"layer{layer.index - 1} output Y"
        weighted = [s for s in layer.reads if "with weights" in s]
        if not feeds_from_previous or weighted:
            odd.append(f"{layer.label} does not read only layer{layer.index - 1}'s output: "
                       + (f"weights in between ({'; '.join(weighted)})" if weighted else "its input comes from elsewhere"))
    if len(audit.layers) < 2:
        return ["A single recurrent layer: its input weights W read the model input."]
    if odd:
        return odd
    return ["Nothing with weights sits between two recurrent layers: each layer's input weights W read the "
            "previous layer's output Y directly (only reshaping ops in between)."]


def layer_heading(layer: Layer) -> str:
    op = f"{layer.op} ({layer.op_type}, integer weights)" if layer.op_type else layer.op
    return (f"{layer.label}  {op} '{layer.node}'  direction {layer.direction}  hidden {layer.hidden_size}  "
            f"input {layer.input_size if layer.input_size is not None else '?'}  params {layer.params}")


def layer_notes(layer: Layer) -> list[str]:
    """Inputs, attributes and folded paths of one layer, one line each."""
    srcs = "  ".join(f"{r} '{s}'" for r, s in layer.sources.items() if s)
    attrs = ", ".join(f"{k}={v}" for k, v in sorted(layer.attributes.items()) if k not in ("hidden_size", "direction"))
    lines = [f"inputs: {srcs or 'none resolved'}"]
    if attrs:
        lines.append(f"attributes: {attrs}")
    lines += [f"folded {role}: {path}" for role, path in layer.paths.items()]
    return lines


def layer_table(audit: Audit, layer: Layer) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of one layer's gate table (the text and HTML reports show the same)."""
    with_ckpt = audit.checkpoint is not None
    quantized = any(g.quant is not None for g in layer.gates)
    with_error = audit.quant_errors is not None and quantized
    rows = []
    for g in _ordered_gates(layer):
        s = gate_stats(g.array)
        row = [g.direction, g.gate, f"{g.kind}_{LETTERS[layer.op][g.gate]}", _shape(g.array.shape), str(g.params),
               _num(s["mean"]), _num(s["std"]), _num(s["min"]), _num(s["max"]), f"{g.source}{g.index}"]
        if with_ckpt:
            info = audit.checkpoint.get(g.key)
            row.append("-" if info is None else info["pytorch"] + _same_text(info))
            row.append(_trained(audit, g.key))
        if quantized:
            row += quant_columns(g.quant)
        if with_error:
            row += _quant_error(audit, g.key)
        rows.append(row)
    headers = ["dir", "gate", "tensor", "shape", "params", "mean", "std", "min", "max", "onnx slice"]
    if with_ckpt:
        headers += [f"pytorch ({', '.join(PYTORCH_LETTERS[layer.op][x] for x in PYTORCH_LETTERS[layer.op])} rows)",
                    "trained"]
    if quantized:
        headers += ["integers", "scale", "zero point"]
    if with_error:
        headers += ["quant err", "relative", "of scale/2"]
    return headers, rows


def head_table(audit: Audit) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the other-parameters table."""
    rows = []
    for t in audit.head:
        s = gate_stats(t.array)
        rows.append([t.name, _shape(t.array.shape), str(t.params), _num(s["mean"]), _num(s["std"]),
                     _num(s["min"]), _num(s["max"]), ", ".join(t.consumers) or "-"])
        if audit.checkpoint is not None:
            rows[-1].append(_trained(audit, t.name))
    extra = ["trained"] if audit.checkpoint is not None else []
    if any(t.quant is not None for t in audit.head):
        extra += ["integers", "scale", "zero point"]
        for row, t in zip(rows, audit.head):
            row += quant_columns(t.quant)
    return ["tensor", "shape", "params", "mean", "std", "min", "max", "used by"] + extra, rows


def against_table(audit: Audit) -> tuple[list[str], list[list[str]]]:
    rows = []
    for key, e in (audit.against or {}).items():
        shown = [key, e["status"]]
        if "max_abs" in e:
            shown += [f"{e['max_abs']:.3e}", f"{e['relative']:.3e}"]
            shown.append(f"{e['bound_share']:.2f}" if "bound_share" in e else "-")
        else:
            shown += ["-", "-", "-"]
        rows.append(shown)
    return ["tensor", "status", "max abs", "relative", "of scale/2"], rows


def parameter_totals(audit: Audit) -> str:
    per_layer = ", ".join(f"{x.label} {x.params}" for x in audit.layers)
    total = (f"parameters: recurrent {audit.recurrent_params} ({per_layer or 'none'}) + other {audit.head_params} "
             f"= {audit.total_params}")
    if audit.checkpoint_params is not None:
        same = "matches" if audit.checkpoint_params == audit.total_params else "DIFFERS"
        total += f"; checkpoint state dict {audit.checkpoint_params} ({same})"
    return total


def sorted_findings(audit: Audit) -> list:
    return sorted(audit.findings, key=lambda f: SEVERITY_ORDER[f.severity])


def _layer_lines(audit: Audit, layer: Layer) -> list[str]:
    lines = [layer_heading(layer)] + ["  " + n for n in layer_notes(layer)]
    if not layer.gates:
        return lines + ["  (weights could not be resolved; see findings)"]
    return lines + _table(*layer_table(audit, layer))


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN/Inf
    return x


def to_json(audit: Audit) -> dict[str, Any]:
    """The same facts as the text report, with statistics and a SHA-256 per tensor (stable keys)."""
    def gate_entry(g: GateTensor) -> dict[str, Any]:
        entry = {"key": g.key, "layer": g.layer, "direction": g.direction, "gate": g.gate, "kind": g.kind,
                 "shape": list(g.array.shape), "params": g.params, "source": g.source, "slice": g.index,
                 "sha256": gate_digest(g.array), "stats": {k: _clean(v) for k, v in gate_stats(g.array).items()}}
        if g.quant is not None:
            entry["quantization"] = quant_json(g.quant)
        if audit.checkpoint is not None:
            entry["checkpoint"] = audit.checkpoint.get(g.key)
        return entry

    layers = [{
        "index": x.index, "node": x.node, "op": x.op, "op_type": x.op_type or x.op, "paths": x.paths,
        "hidden_size": x.hidden_size, "input_size": x.input_size,
        "direction": x.direction, "attributes": x.attributes, "inputs": x.sources, "reads": x.reads,
        "params": x.params, "gates": [gate_entry(g) for g in _ordered_gates(x)],
    } for x in audit.layers]
    head = [{"name": t.name, "shape": list(t.array.shape), "params": t.params, "used_by": t.consumers,
             "sha256": gate_digest(t.array), "stats": {k: _clean(v) for k, v in gate_stats(t.array).items()},
             **({"checkpoint": audit.checkpoint.get(t.name)} if audit.checkpoint is not None else {})}
            for t in audit.head]
    return {
        "format": REPORT_FORMAT, "model": audit.path, "producer": audit.producer,
        "contract": {k: v for k, v in (audit.contract or {}).items() if k not in ("parity_sample", "gate_digests")} or None,
        "layers": layers, "head": head,
        "against": None if audit.against is None else {"model": audit.against_path, "structure": audit.structure,
                                                       "tensors": audit.against},
        "quantization_errors": audit.quant_errors,
        "not_counted": [{"name": n, "why": w} for n, w in audit.not_counted],
        "totals": {"recurrent": audit.recurrent_params, "head": audit.head_params, "total": audit.total_params,
                   "checkpoint": audit.checkpoint_params},
        "findings": [{"code": f.code, "severity": f.severity, "message": f.message, "tensors": f.tensors}
                     for f in audit.findings],
        "ok": not audit.errors,
    }


def quant_json(q: Quantization) -> dict[str, Any]:
    lo, hi = q.q_range
    return {"dtype": q.dtype, "per_channel": q.per_channel, "integer_range": [lo, hi],
            "scale": [float(np.min(q.scale)), float(np.max(q.scale))],
            "zero_point": [int(np.min(q.zero_point)), int(np.max(q.zero_point))], "tensors": list(q.tensors)}


def write_npz(audit: Audit, path: str | os.PathLike) -> int:
    """Every gate tensor under `layer{k}.{direction}.{gate}.{W|R|bW|bR|P}`; returns how many were written."""
    arrays = {g.key: np.asarray(g.array) for layer in audit.layers for g in layer.gates}
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return len(arrays)

