"""Provenance for the audit: map each ONNX gate slice to its PyTorch parameter rows and check training moved it."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from lstm_onnx.contract import CELL_OPS, INIT_FILE, WEIGHTS_FILE, RunDirectoryError, file_digest, read_run_config

from .comparison import BOUND_SLACK, float_reference, quant_error
from .gates import pytorch_source
from .result import Audit, AuditInputError

# Relative change below which a gate counts as untouched by training (Adam moves weights by ~1e-3 per step).
UNTRAINED_RTOL = 1e-7


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy (safetensors' own bounds-checked reader, no torch).

    A truncated, hostile or non-safetensors file (a pickle, say) raises AuditInputError naming the file.
    """
    from safetensors import SafetensorError  # lazily: the audit of an ONNX file alone needs no safetensors
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise AuditInputError(f"{path}: missing, expected safetensors weights")
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, TypeError, OSError) as exc:
        hint = " (it looks like a pickle, which is never loaded)" if path.read_bytes()[:1] == b"\x80" else ""
        raise AuditInputError(f"{path}: not a readable safetensors file{hint}: {exc}") from None


def compare_checkpoint(audit: Audit, run_dir: Path) -> None:
    """Check every gate slice is bit-identical to the checkpoint and, with init.safetensors, that it trained."""
    try:
        config = read_run_config(run_dir)
    except RunDirectoryError as exc:
        raise AuditInputError(str(exc)) from None
    weights = read_tensors(run_dir / WEIGHTS_FILE)
    init = read_tensors(run_dir / INIT_FILE) if (run_dir / INIT_FILE).is_file() else None
    audit.checkpoint = {}
    audit.checkpoint_path = str(run_dir)
    audit.checkpoint_params = sum(int(a.size) for a in weights.values())
    # These findings replace the "cannot be determined" note: the checkpoint answers it (or says why not).
    audit.findings = [f for f in audit.findings if f.code != "UNTRAINED_UNKNOWN"]
    model = config.get("model", {})
    op = CELL_OPS.get(str(model.get("cell")))
    layers = model.get("num_layers")
    ops = {layer.op for layer in audit.layers}
    if op is None or ops != {op} or layers != len(audit.layers):
        audit.add("CHECKPOINT_MISMATCH", "error", f"checkpoint {run_dir}: config.json describes {layers} {model.get('cell')} "
                  f"layer(s), the model has {len(audit.layers)} {'/'.join(sorted(ops)) or 'recurrent'} node(s)")
        _compare_counts(audit)
        return
    _check_file_digest(audit, run_dir)
    _compare_gates(audit, op, weights, init)
    _compare_head(audit, weights, init)
    _compare_counts(audit)
    if init is None:
        audit.add("UNTRAINED_UNKNOWN", "info", f"checkpoint {run_dir} has no init.safetensors: whether training "
                  "changed each gate cannot be determined")
        return
    _report_untrained(audit, weights, init)


def _compare_counts(audit: Audit) -> None:
    """Parameter totals: a mismatch means the export dropped or added weights (e.g. an LSTM's projection)."""
    if audit.checkpoint_params != audit.total_params:
        audit.add("CHECKPOINT_MISMATCH", "error", f"parameter count: the model holds {audit.total_params} "
                  f"(recurrent {audit.recurrent_params}, other {audit.head_params}), the checkpoint "
                  f"{audit.checkpoint_params}")


def _bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def _relative_change(now: np.ndarray, before: np.ndarray) -> float:
    diff = float(np.linalg.norm(np.asarray(now, np.float64) - np.asarray(before, np.float64)))
    return diff / max(float(np.linalg.norm(np.asarray(before, np.float64))), 1e-12)


def _check_file_digest(audit: Audit, run_dir: Path) -> None:
    recorded = (audit.contract or {}).get("checkpoint_digest")
    if recorded is None:
        return
    actual = file_digest(run_dir / WEIGHTS_FILE)
    if recorded != actual:
        audit.add("DIGEST_MISMATCH", "error", f"metadata checkpoint_digest {recorded[:19]}... does not match "
                  f"{run_dir / WEIGHTS_FILE} ({actual[:19]}...): the model was exported from another checkpoint")


def _compare_gates(audit: Audit, op: str, weights: dict, init: dict | None) -> None:
    differ: list[str] = []
    for layer in audit.layers:
        for g in layer.gates:
            src = pytorch_source(op, g.layer, g.direction, g.gate, g.kind, layer.hidden_size)
            if src is None:  # peepholes have no PyTorch counterpart
                continue
            name, rows = src
            label = f"{name}[{rows.start}:{rows.stop}]"
            param = weights.get(name)
            expected = param[rows] if param is not None and param.shape[0] >= rows.stop else None
            identical = expected is not None and expected.shape == g.array.shape and _bits(expected) == _bits(g.array)
            within = identical
            if g.quant is not None and expected is not None and expected.shape == g.array.shape:
                # An integer gate cannot be bit-identical: it must lie within scale/2 of the parameter instead.
                err = quant_error(g, expected)
                within = err["bound_share"] <= 1 + BOUND_SLACK
                audit.quant_errors = audit.quant_errors or {}
                audit.quant_errors.setdefault(g.key, err)
            change = None
            if init is not None and name in init and init[name].shape[0] >= rows.stop:
                change = _relative_change(g.array, init[name][rows])
                audit.init_arrays[g.key] = init[name][rows]
            audit.checkpoint[g.key] = {"pytorch": label, "identical": identical, "change": change}
            if g.quant is not None:
                audit.checkpoint[g.key]["within_scale_half"] = within
            if not within:
                differ.append(f"{g.key} != {label}")
    if differ:
        audit.add("CHECKPOINT_MISMATCH", "error", f"{len(differ)} gate slice(s) are not bit-identical to the checkpoint "
                  "(integer ones: not within scale/2): "
                  + "; ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else ""),
                  [d.split(" ")[0] for d in differ])


def _compare_head(audit: Audit, weights: dict, init: dict | None) -> None:
    """Non-recurrent parameters: matched by name first, else by content (a tool may rename them)."""
    by_bits = {(t.array.shape, _bits(t.array)): t.name for t in audit.head}
    names = {t.name for t in audit.head}
    for name, param in sorted(weights.items()):
        if name.startswith("rnn."):
            continue
        head = next((t for t in audit.head if t.name == name), None)
        quantized = next((t for t in audit.head if t.quant is not None and t.origin == name), None)
        if quantized is not None:
            # An integer head weight: within scale/2 of the parameter, in the layout the quantizer stored it.
            ref = float_reference(quantized, param)
            identical = (ref.shape == quantized.array.shape
                         and quant_error(quantized, ref)["bound_share"] <= 1 + BOUND_SLACK)
            if identical:
                audit.quant_errors = audit.quant_errors or {}
                audit.quant_errors.setdefault(quantized.name, quant_error(quantized, ref))
            onnx_name = quantized.name
        elif head is not None:
            identical = head.array.shape == param.shape and _bits(head.array) == _bits(param)
            onnx_name = name
        else:
            onnx_name = by_bits.get((param.shape, _bits(param)))
            identical = onnx_name is not None
        change = _relative_change(param, init[name]) if init is not None and name in init else None
        audit.checkpoint[onnx_name or name] = {"pytorch": name, "identical": identical, "change": change}
        if not identical:
            where = f"initializer '{name}' differs" if name in names else "no initializer holds it"
            audit.add("CHECKPOINT_MISMATCH", "error", f"checkpoint parameter {name} {list(param.shape)}: {where}", [name])


def _report_untrained(audit: Audit, weights: dict, init: dict) -> None:
    ran = any(k not in init or _bits(v) != _bits(init[k]) for k, v in weights.items())
    still: dict[str, list[str]] = defaultdict(list)
    for key, info in audit.checkpoint.items():
        if info["change"] is not None and info["change"] <= UNTRAINED_RTOL:
            if key.startswith("layer"):  # layer{k}.{direction}.{gate}.{kind}
                parts = key.split(".")
                still[".".join(parts[:2])].append(".".join(parts[2:]))
            else:
                still["head"].append(key)
    if not ran:
        audit.add("UNTRAINED_GATE", "warning", "model.safetensors equals init.safetensors: training never ran, "
                  "every gate is at its initial value")
        return
    for where, parts in still.items():
        audit.add("UNTRAINED_GATE", "error", f"{where}: training ran but these did not move from init.safetensors: "
                  f"{', '.join(parts)}", [f"{where}.{p}" if where != "head" else p for p in parts])
