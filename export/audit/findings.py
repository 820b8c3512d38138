"""The audit's checks on resolved gate tensors: non-finite, zero/constant, tied copies, digests, folded biases.

Codes and severities (error = exit 1):
  NONFINITE          error    NaN or Inf in a gate or head tensor
  TIED_WEIGHTS       error    bit-identical gate tensors across layers, directions or gates
  DIGEST_MISMATCH    error    gate_digests / checkpoint_digest in the metadata disagree with the tensors
  CHECKPOINT_MISMATCH error   an ONNX slice differs from the PyTorch parameter it should come from
  NO_RECURRENT_OP    error    no LSTM/GRU node (e.g. the recurrence is a Loop/Scan)
  UNRESOLVED_WEIGHT  error    W/R/B/P is computed at run time, the audit cannot see it
  EXTERNAL_DATA      error    external data outside the model folder, a link, or out of bounds
  MALFORMED_NODE     error    W/R/B/P shapes or attributes contradict the operator spec, or the initial
                              state, declared outputs or next layer around a node contradict its sizes (shapes.py)
  CHANGED_GATES      error    with --against --fail-on-change: a tensor or the structure differs (info without)
  UNTRAINED_GATE     error    with --checkpoint: training ran but this gate equals init.safetensors
                     warning  ... and the whole checkpoint equals its init (training never ran)
  ZERO_GATE          warning  an all-zero W or R gate block (the gate ignores its input)
  CONSTANT_GATE      warning  a W or R gate block with one repeated non-zero value
  OVERRIDABLE_WEIGHT warning  a weight initializer that is also a graph input
  UNSUPPORTED_OP     warning  plain RNN nodes (not audited)
  BIAS_FOLDED, NO_BIAS, NO_CONTRACT, UNTRAINED_UNKNOWN, LOOP_PRESENT, UNCHANGED   info
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .gates import gate_digest
from .result import Audit, GateTensor

# Slices smaller than this are too small for bit-identity to mean copying (a 1-element bias can repeat by chance).
MIN_TIED_SIZE = 2


def check_all(audit: Audit) -> None:
    """Run every check that needs no checkpoint, appending findings to `audit`."""
    check_nonfinite(audit)
    check_constant(audit)
    check_tied(audit)
    check_biases(audit)
    check_digests(audit)
    if audit.layers:
        audit.add("UNTRAINED_UNKNOWN", "info", "whether training changed the weights cannot be determined from the ONNX "
                  "file alone; pass --checkpoint RUN_DIR (with init.safetensors) to check per gate")


def gate_stats(array: np.ndarray) -> dict[str, float | int]:
    """Statistics over the finite values, plus counts of zeros and non-finite values."""
    a = np.asarray(array, dtype=np.float64).ravel()
    finite = a[np.isfinite(a)]
    stats: dict[str, float | int] = {"nan": int(np.isnan(a).sum()), "inf": int(np.isinf(a).sum()), "zeros": int((a == 0).sum())}
    if finite.size:
        stats.update(mean=float(finite.mean()), std=float(finite.std()), min=float(finite.min()),
                     max=float(finite.max()), abs_max=float(np.abs(finite).max()))
    else:
        stats.update(mean=float("nan"), std=float("nan"), min=float("nan"), max=float("nan"), abs_max=float("nan"))
    return stats


def _all_gates(audit: Audit) -> list[GateTensor]:
    return [g for layer in audit.layers for g in layer.gates]


def check_nonfinite(audit: Audit) -> None:
    bad: dict[str, list[str]] = defaultdict(list)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for g in _all_gates(audit):
        nan, inf = int(np.isnan(g.array).sum()), int(np.isinf(g.array).sum())
        if nan or inf:
            bad[g.source].append(g.key)
            counts[g.source][0] += nan
            counts[g.source][1] += inf
    for t in audit.head:
        if np.issubdtype(t.array.dtype, np.floating) and not np.isfinite(t.array).all():
            bad[t.name].append(t.name)
            counts[t.name] = [int(np.isnan(t.array).sum()), int(np.isinf(t.array).sum())]
    for source, keys in bad.items():
        nan, inf = counts[source]
        audit.add("NONFINITE", "error", f"tensor '{source}' holds {nan} NaN and {inf} Inf, in {_list(keys)}", keys)


def check_constant(audit: Audit) -> None:
    """All-zero or single-valued W/R gate blocks (biases may legitimately be zero or constant)."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for g in _all_gates(audit):
        if g.kind not in ("W", "R") or g.array.size == 0 or not np.isfinite(g.array).all():
            continue
        first = g.array.flat[0]
        if not (g.array == first).all():
            continue
        code = "ZERO_GATE" if first == 0 else "CONSTANT_GATE"
        if code == "CONSTANT_GATE" and g.array.size < 2:
            continue
        groups[(code, f"layer{g.layer}.{g.direction}")].append(f"{g.gate}.{g.kind}")
    for (code, where), names in groups.items():
        what = "all-zero" if code == "ZERO_GATE" else "constant (one repeated value)"
        audit.add(code, "warning", f"{where}: {what} gate tensors {', '.join(names)}", [f"{where}.{n}" for n in names])


def check_tied(audit: Audit) -> None:
    """Bit-identical, non-constant gate tensors in two places: a cell object stacked twice, or a copy."""
    by_digest: dict[tuple, list[GateTensor]] = defaultdict(list)
    for g in _all_gates(audit):
        a = g.array
        if a.size < MIN_TIED_SIZE or not np.isfinite(a).all() or (a == a.flat[0]).all():
            continue
        by_digest[(a.shape, gate_digest(a))].append(g)
    grouped: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for members in by_digest.values():
        if len(members) < 2:
            continue
        same_part = len({(m.gate, m.kind) for m in members}) == 1
        if same_part:
            places = tuple(sorted({f"layer{m.layer}.{m.direction}" for m in members}))
            grouped[places].append(f"{members[0].gate}.{members[0].kind}")
        else:
            grouped[tuple(sorted(m.key for m in members))].append("")
    for places, parts in grouped.items():
        if parts[0]:
            keys = [f"{p}.{part}" for p in places for part in parts]
            msg = (f"{' and '.join(places)} hold bit-identical gate tensors ({', '.join(parts)}): the weights are tied "
                   "or copied across layers/directions, the classic mistake of stacking one cell object")
        else:
            keys = list(places)
            msg = f"gate tensors {', '.join(places)} are bit-identical: copied across gates"
        audit.add("TIED_WEIGHTS", "error", msg, keys)


def check_biases(audit: Audit) -> None:
    for layer in audit.layers:
        if not layer.gates:
            continue
        if layer.sources.get("B") is None:
            audit.add("NO_BIAS", "info", f"{layer.label}: no B input, so every bias is zero (the spec's default)")
            continue
        bw = [g for g in layer.gates if g.kind == "bW"]
        br = [g for g in layer.gates if g.kind == "bR"]
        if all((g.array == 0).all() for g in br) and any((g.array != 0).any() for g in bw):
            audit.add("BIAS_FOLDED", "info", f"{layer.label}: the recurrent biases bR are all zero and bW carries the whole "
                      "bias (as tf2onnx writes Keras layers); each gate's effective bias is bW + bR")


def check_digests(audit: Audit) -> None:
    """Compare the contract's gate_digests with digests computed here (our models only)."""
    if audit.contract is None:
        if not any(f.code == "DIGEST_MISMATCH" for f in audit.findings):
            audit.add("NO_CONTRACT", "info", "no lstm_onnx.contract metadata (a model from another tool): "
                      "no recorded digests to check")
        return
    recorded = audit.contract.get("gate_digests")
    if not isinstance(recorded, dict):
        audit.add("DIGEST_MISMATCH", "error", f"metadata gate_digests: got {type(recorded).__name__}, expected an object")
        return
    computed = {g.key: gate_digest(g.array) for g in _all_gates(audit)}
    differ = sorted(k for k in computed.keys() & recorded.keys() if computed[k] != recorded[k])
    missing = sorted(computed.keys() - recorded.keys())
    extra = sorted(recorded.keys() - computed.keys())
    if differ:
        quantized_later = any(x.op_type for x in audit.layers) and "quantization" not in audit.contract
        hint = (" (the model was quantized after export: its contract still records the float gates; compare it "
                "with --against FLOAT.onnx)" if quantized_later else "")
        audit.add("DIGEST_MISMATCH", "error", f"{len(differ)} gate tensor(s) differ from the digest recorded at export"
                  f"{hint}: {_list(differ)}", differ)
    if missing:
        audit.add("DIGEST_MISMATCH", "error", f"{len(missing)} gate tensor(s) have no recorded digest: {_list(missing)}", missing)
    if extra:
        audit.add("DIGEST_MISMATCH", "error", f"{len(extra)} recorded digest(s) name no gate tensor in the model: "
                  f"{_list(extra)}", extra)


def _list(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
