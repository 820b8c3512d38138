"""Comparing two models gate by gate (`audit NEW --against OLD`): what changed, by how much, and quantization error.

Per layer, direction and gate: identical (bit for bit), quantized (an integer gate within its rounding
bound scale/2 of the float one), or changed, with the max absolute and relative change; plus the
structural differences (layers, cell, hidden size, directions, input size, integer or float, head).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from .result import Audit, GateTensor, HeadTensor

# Slack on the scale/2 bound: float32 rounding of (q - zp) * scale itself, relative to the bound.
BOUND_SLACK = 1e-3


def quant_error(gate: GateTensor | HeadTensor, reference: np.ndarray) -> dict[str, float]:
    """How far a dequantized tensor is from its float original: max abs, relative (norm ratio), share of scale/2."""
    now = np.asarray(gate.array, np.float64)
    ref = np.asarray(reference, np.float64)
    if isinstance(gate, HeadTensor) and gate.quant is not None:
        now, ref = now.T, ref.T  # a head's scales run along its columns: compare in the rows-per-scale layout
    diff = np.abs(now - ref)
    out = {"max_abs": float(diff.max()) if diff.size else 0.0, "relative": _relative(now, ref)}
    if gate.quant is not None:
        bound = gate.quant.bound(diff.shape)
        share = np.divide(diff, bound, out=np.where(diff > 0, np.inf, 0.0), where=bound > 0)
        out["bound_share"] = float(share.max()) if share.size else 0.0
        out["scale_half"] = float(bound.max()) if bound.size else 0.0
    return out


def _relative(now: np.ndarray, before: np.ndarray) -> float:
    return float(np.linalg.norm(now - before)) / max(float(np.linalg.norm(before)), 1e-12)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, "<f4").tobytes()


def float_reference(new: GateTensor | HeadTensor, old: np.ndarray) -> np.ndarray:
    """The float original in the integer tensor's layout (a head quantized from Gemm transB=1 is transposed)."""
    if isinstance(new, HeadTensor) and new.transposed and old.shape == new.array.shape[::-1]:
        return old.T
    return old


def _entry(new: GateTensor | HeadTensor, old: GateTensor | HeadTensor) -> dict[str, Any]:
    ref = float_reference(new, old.array)
    if new.array.shape != ref.shape:
        return {"status": "reshaped", "shape": list(new.array.shape), "old_shape": list(old.array.shape)}
    err = quant_error(new, ref)
    if _bits(new.array) == _bits(ref):
        return {"status": "identical", **err}  # an integer gate can land exactly on the float values
    status = "changed"
    if new.quant is not None and old.quant is None and err["bound_share"] <= 1 + BOUND_SLACK:
        status = "quantized"  # rounded to the integer grid, and no further
    return {"status": status, **err}


def compare_models(new: Audit, old: Audit, fail_on_change: bool = False) -> None:
    """Fill new.against, new.structure and (for integer gates) new.quant_errors; add CHANGED_GATES findings."""
    new.against_path = old.path
    new.against = {}
    new.structure = _structure(new, old)
    old_gates = {g.key: g for layer in old.layers for g in layer.gates}
    quant: dict[str, dict[str, float]] = {}
    for layer in new.layers:
        for g in layer.gates:
            before = old_gates.get(g.key)
            if before is None:
                new.against[g.key] = {"status": "added"}
                continue
            new.against[g.key] = entry = _entry(g, before)
            if before.array.shape == g.array.shape:
                new.old_arrays[g.key] = before.array
            if g.quant is not None and before.quant is None and "max_abs" in entry:
                quant[g.key] = {k: entry[k] for k in ("max_abs", "relative", "bound_share", "scale_half")}
    new_keys = {g.key for layer in new.layers for g in layer.gates}
    for key in sorted(old_gates.keys() - new_keys):
        new.against[key] = {"status": "removed"}
    old_head = {t.name: t for t in old.head}
    for t in new.head:
        before = old_head.get(t.name) or old_head.get(t.origin)
        new.against[t.name] = {"status": "added"} if before is None else _entry(t, before)
        if t.quant is not None and before is not None and before.quant is None and "max_abs" in new.against[t.name]:
            e = new.against[t.name]
            quant[t.name] = {k: e[k] for k in ("max_abs", "relative", "bound_share", "scale_half")}
    if quant:
        new.quant_errors = {**(new.quant_errors or {}), **quant}
    _add_findings(new, fail_on_change)


def _structure(new: Audit, old: Audit) -> list[str]:
    diffs: list[str] = []
    if len(new.layers) != len(old.layers):
        diffs.append(f"recurrent layers: {len(old.layers)} -> {len(new.layers)}")
    for a, b in zip(old.layers, new.layers):
        for what, x, y in (("cell", a.op, b.op), ("hidden size", a.hidden_size, b.hidden_size),
                           ("direction", a.direction, b.direction), ("input size", a.input_size, b.input_size)):
            # Float -> integer storage is not a structural change: each gate says whether it stayed within scale/2.
            if x != y:
                diffs.append(f"{b.label} {what}: {x} -> {y}")
    old_head = {t.name: t for t in old.head}
    new_names = {t.name for t in new.head}
    for t in new.head:
        before = old_head.get(t.name) or old_head.get(t.origin)
        if before is None:
            diffs.append(f"head tensor added: {t.name} {list(t.array.shape)}")
        elif float_reference(t, before.array).shape != t.array.shape:
            diffs.append(f"head tensor {t.name}: shape {list(before.array.shape)} -> {list(t.array.shape)}")
    matched = {t.origin for t in new.head if t.origin} | new_names
    for name, t in old_head.items():
        if name not in matched:
            diffs.append(f"head tensor removed: {name} {list(t.array.shape)}")
    return diffs


def _add_findings(new: Audit, fail_on_change: bool) -> None:
    severity = "error" if fail_on_change else "info"
    changed: dict[str, list[str]] = defaultdict(list)
    worst: dict[str, float] = defaultdict(float)
    for key, e in (new.against or {}).items():
        if e["status"] in ("identical", "quantized"):
            continue
        parts = key.split(".")
        where, part = (".".join(parts[:2]), ".".join(parts[2:])) if key.startswith("layer") else ("head", key)
        changed[where].append(f"{part} ({e['status']})" if e["status"] != "changed" else part)
        worst[where] = max(worst[where], e.get("max_abs", 0.0))
    for where, parts in changed.items():
        shown = ", ".join(parts[:8]) + (f" and {len(parts) - 8} more" if len(parts) > 8 else "")
        new.add("CHANGED_GATES", severity, f"{where}: {len(parts)} tensor(s) differ from {new.against_path}: {shown} "
                f"(max abs change {worst[where]:.3g})", [f"{where}.{p.split(' ')[0]}" for p in parts])
    if new.structure:
        new.add("CHANGED_GATES", severity, f"structure differs from {new.against_path}: " + "; ".join(new.structure))
    if not changed and not new.structure:
        same = sum(e["status"] == "identical" for e in new.against.values())
        quantized = sum(e["status"] == "quantized" for e in new.against.values())
        new.add("UNCHANGED", "info", f"every tensor matches {new.against_path}: {same} identical"
                + (f", {quantized} quantized within scale/2" if quantized else ""))
