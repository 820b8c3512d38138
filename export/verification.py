"""`verify`: is the ONNX file the checkpoint's network, explicit, and numerically the same on every provider."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from lstm_onnx.contract import WEIGHTS_FILE, file_digest, read_contract

from .onnx_export import ExportError, check_explicit
from .parity import DEFAULT_ATOL, DEFAULT_FLOOR_FACTOR, DEFAULT_RTOL, resolve_providers, run_parity


def verify_model(model_path: str | Path, run_dir: str | Path, provider: str = "all", atol: float = DEFAULT_ATOL,
                 rtol: float = DEFAULT_RTOL, floor_factor: float = DEFAULT_FLOOR_FACTOR) -> dict[str, Any]:
    """Compare PyTorch eager (from the run directory) with onnxruntime on the chosen providers.

    Also checks that the ONNX graph has one explicit recurrent node per layer and that the
    checkpoint digest recorded at export is the digest of this run's weights. An int8 model (its
    contract has `quantization`) is compared within the budget recorded there instead of atol/rtol.
    """
    from lstm_onnx.model.checkpoint import load_run

    model_path = Path(model_path)
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except FileNotFoundError:
        raise ExportError(f"{model_path}: not found, expected an ONNX model file") from None
    except Exception as exc:  # onnx raises DecodeError and friends for a corrupt file
        raise ExportError(f"{model_path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    net, config = load_run(run_dir)
    checks: list[dict[str, Any]] = []

    try:
        check_explicit(model, config.model.cell, config.model.num_layers)
        checks.append({"check": "explicit_recurrent_nodes", "passed": True})
    except ExportError as exc:
        checks.append({"check": "explicit_recurrent_nodes", "passed": False, "message": str(exc)})

    contract, _ = read_contract(model)  # an unreadable entry counts as none: the digest check says so
    digest = file_digest(Path(run_dir) / WEIGHTS_FILE)
    if contract is None:
        checks.append({"check": "checkpoint_digest", "passed": None,
                       "message": "no lstm-onnx contract in metadata_props: cannot tell which checkpoint it came from"})
    else:
        same = contract.get("checkpoint_digest") == digest
        checks.append({"check": "checkpoint_digest", "passed": same,
                       "message": None if same else f"model records {contract.get('checkpoint_digest')}, run has {digest}"})

    quantization = (contract or {}).get("quantization")
    if isinstance(quantization, dict) and isinstance(quantization.get("budget"), dict):
        # An int8 model is held to the parity budget recorded at export (export/quantization.py), not FP32's.
        try:
            atol = float(quantization["budget"].get("atol", atol))
            rtol = float(quantization["budget"].get("rtol", rtol))
            by_kind = {str(k): float(v) for k, v in (quantization["budget"].get("atol_by_kind") or {}).items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise ExportError(f"{model_path}: contract quantization.budget: got {quantization['budget']!r}, expected "
                              f"numbers atol, rtol and atol_by_kind ({exc})") from None
        floor_factor = 0.0
        checks.append({"check": "int8_budget", "passed": None,
                       "message": f"int8 model: parity against PyTorch FP32 within the recorded budget atol {atol:g}, "
                       f"rtol {rtol:g}" + "".join(f", {k} inputs atol {v:g}" for k, v in by_kind.items())})
    else:
        by_kind = None
    providers = resolve_providers(provider)
    parity = run_parity(net, model_path, providers, atol=atol, rtol=rtol, floor_factor=floor_factor,
                        atol_by_kind=by_kind)
    checks.append({"check": "parity", "passed": parity["passed"]})
    passed = all(c["passed"] is not False for c in checks)
    return {
        "format": "lstm-onnx-verify-report/1",
        "model": str(model_path),
        "run_dir": str(run_dir),
        "passed": passed,
        "checks": checks,
        "parity": parity,
    }


def format_verify(report: dict[str, Any]) -> str:
    """Human-readable summary: per provider and output, worst errors and the tolerance that would pass."""
    parity = report["parity"]
    lines = [f"verify {report['model']} against {report['run_dir']}"]
    for c in report["checks"]:
        mark = {True: "ok", False: "FAIL", None: "n/a"}[c["passed"]]
        lines.append(f"  {c['check']:<26} {mark}" + (f"  ({c['message']})" if c.get("message") else ""))
    lines.append(f"  {'provider':<22} {'output':<8} {'cases':>5} {'max abs':>11} {'max rel':>11} {'atol needed':>12}")
    for provider in parity["providers"]:
        cases = [c for c in parity["cases"] if c["provider"] == provider]
        for out in cases[0]["outputs"] if cases else []:
            mabs = max(c["outputs"][out]["max_abs"] for c in cases)
            mrel = max(c["outputs"][out]["max_rel"] for c in cases)
            need = max(c["outputs"][out]["atol_needed"] for c in cases)
            lines.append(f"  {provider:<22} {out:<8} {len(cases):>5} {mabs:>11.3e} {mrel:>11.3e} {need:>12.3e}")
    floor = parity.get("fp32_floor", {})
    if floor:
        lines.append("  PyTorch FP32 vs FP64 on the same cases (FP32's own accuracy): "
                     + ", ".join(f"{k} {v:.2e}" for k, v in floor.items()))
        if parity.get("cases_passed_by_floor"):
            lines.append(f"  {parity['cases_passed_by_floor']} case(s) passed only because the error stayed within "
                         f"{parity['floor_factor']:g}x FP32's own error on them (--floor-factor 0 turns this off)")
    lines.append(
        f"  {parity['cases_run']} cases, {parity['cases_failed']} failed at atol {parity['atol']:g}, rtol {parity['rtol']:g}; "
        f"tolerance that would have passed: {parity['tolerance_that_would_pass']:.3e}"
    )
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)
