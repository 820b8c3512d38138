"""`verify`: is the ONNX file the checkpoint's network, explicit, and numerically the same on every provider."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from lstm_onnx.contract import QUANTIZED_RECURRENT_OPS, RECURRENT_OPS, WEIGHTS_FILE, file_digest, read_contract

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

    mismatch = architecture_mismatch(model, config.model)
    checks.append({"check": "architecture", "passed": mismatch is None, "message": mismatch})
    if mismatch is not None:  # another network: parity would only fail on missing or misshapen inputs
        return {"format": "lstm-onnx-verify-report/1", "model": str(model_path), "run_dir": str(run_dir),
                "passed": False, "checks": checks, "parity": None}
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


def architecture_mismatch(model: onnx.ModelProto, config: Any) -> str | None:
    """None when the ONNX graph's recurrent nodes have the checkpoint's shape, else one line saying how they differ."""
    quantized = QUANTIZED_RECURRENT_OPS  # DynamicQuantizeLSTM is an LSTM with int8 weights
    nodes = [n for n in model.graph.node if n.op_type in RECURRENT_OPS or n.op_type in quantized]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    hidden = sorted({int(a.get("hidden_size", 0)) for a in attrs})
    bidirectional = sorted({a.get("direction", b"forward") == b"bidirectional" for a in attrs})
    ops = sorted({quantized.get(n.op_type, n.op_type) for n in nodes})
    graph_inputs = {i.name: i for i in model.graph.input}
    dims = [d.dim_value for d in graph_inputs["input"].type.tensor_type.shape.dim] if "input" in graph_inputs else []
    found = (f"{len(nodes)}-layer {'/'.join(ops) or 'non-recurrent'} hidden {'/'.join(map(str, hidden)) or '?'}"
             f"{' bidirectional' if True in bidirectional else ''}, input size {dims[2] if len(dims) == 3 else '?'}")
    wanted = (f"{config.num_layers}-layer {config.cell.upper()} hidden {config.hidden_size}"
              f"{' bidirectional' if config.bidirectional else ''}, input size {config.input_size}")
    return None if found == wanted else f"the model is a {found}; the checkpoint is a {wanted}"


def parity_sentence(parity: dict[str, Any]) -> str:
    """What was compared and why it passed or failed, in plain words (the numbers are in the report)."""
    providers = ", ".join(p.removesuffix("ExecutionProvider") for p in parity["providers"])
    worst = parity["tolerance_that_would_pass"]  # the atol that would pass every element on its own
    compared = (f"onnxruntime ({providers}) against PyTorch on {parity['cases_run']} cases (batch 1/3/16, time "
                f"1/7/64, random/zero/large inputs, with and without initial state, chunked and whole)")
    if not parity["passed"]:
        return (f"parity FAILED: {compared}; {parity['cases_failed']} case(s) differ by more than atol "
                f"{parity['atol']:g} (and rtol {parity['rtol']:g}); only an atol of {worst:.2e} would pass them")
    floor = parity.get("cases_passed_by_floor") or 0
    why = (f"; {floor} case(s) passed because their error stayed within {parity['floor_factor']:g}x of "
           "PyTorch's own float32-vs-float64 error on the same input, as close as float32 arithmetic gets"
           if floor else "")
    return (f"parity passed: {compared} agree within atol {parity['atol']:g} or rtol {parity['rtol']:g} per "
            f"element (an atol of {worst:.2e} alone would pass every element){why}")


def format_verify(report: dict[str, Any], table: bool = False, report_path: str | None = None) -> str:
    """Human-readable summary: the checks, one sentence on parity, and (with `table`, or on failure) the worst
    errors per provider and output."""
    parity = report["parity"]
    lines = [f"verify {report['model']} against {report['run_dir']}"]
    for c in report["checks"]:
        mark = {True: "ok", False: "FAIL", None: "n/a"}[c["passed"]]
        lines.append(f"  {c['check']:<26} {mark}" + (f"  ({c['message']})" if c.get("message") else ""))
    if parity is None:
        lines.append("FAILED (parity not run: the model and the checkpoint are different networks)")
        return "\n".join(lines)
    lines.append("  " + parity_sentence(parity))
    if not table and parity["passed"]:
        lines.append("PASSED" + (f" (the full table: {report_path})" if report_path else " (--table prints the worst "
                                                                                            "errors per output)"))
        return "\n".join(lines)
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
