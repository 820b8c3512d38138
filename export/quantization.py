"""`export --quantize int8`: onnxruntime's dynamic int8 quantization of an exported model, checked against PyTorch FP32.

The int8 model is published as its own model, `<name>_int8`, beside the float one in the same
repository and with the same version number, never as another version of the float model: a Triton
version policy serves the latest version only, so an int8 "version 2" would silently replace FP32 for
every client. Both are served; clients choose by name.

What lands in the int8 model's contract (docs/contract.md): the gate digests of its dequantized gates,
the quantization error of every gate against the float model, end-to-end parity against PyTorch FP32
on the usual matrix, and the parity budget that `verify` and the server's load self-test apply.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx

from lstm_onnx.contract import METADATA_KEY, encode_tensor

from .audit import audit_model
from .audit.gates import gate_digest
from .onnx_export import ExportError, set_contract
from .parity import make_sample, run_parity

QUANTIZED_SUFFIX = "_int8"
# The parity budget for int8 against PyTorch FP32 (docs/contract.md): an element passes within INT8_ATOL or
# within INT8_RTOL x |expected|. Dynamic int8 rounds every weight to within scale/2 (~0.4% of its row's
# largest value) and quantizes the activations per run. Measured on the tests' tiny trained LSTM over the
# parity matrix (batch 1-16, T 1-64): worst error 3.9e-3 (per channel) and 4.9e-3 (per tensor) on random,
# zero and chunked inputs, so the budget leaves ~4x room while a wrong gate or dropped weight (errors of
# order 0.1-1) fails. The "large" inputs (x100, every gate saturated) are another matter: the input's
# per-run scale is then ~2.4, so its small components round to zero; worst error measured 0.36 (on cn
# after 64 steps). They get INT8_SATURATED_ATOL, which checks only that such inputs stay finite and bounded.
INT8_ATOL = 2e-2
INT8_RTOL = 1e-2
INT8_SATURATED_ATOL = 1.0
QUANT_SCHEMES = ("int8",)


def quantize_int8(float_path: str | Path, out_path: str | Path, per_channel: bool = True) -> None:
    """Run onnxruntime.quantization.quantize_dynamic (int8 weights, DynamicQuantizeLSTM) on an ONNX file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consider pre-processing": shape inference adds nothing to an LSTM graph
        quantize_dynamic(str(float_path), str(out_path), per_channel=per_channel, weight_type=QuantType.QInt8,
                         reduce_range=True)  # 7-bit weights: no u8s8 saturation on CPUs without VNNI (AVX2 only)


def build_int8_model(net: Any, float_path: str | Path, contract: dict[str, Any], float_ref: dict[str, Any],
                     per_channel: bool = True, atol: float = INT8_ATOL,
                     rtol: float = INT8_RTOL) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The int8 model of an exported float model, with its contract; raises ExportError when it cannot be made.

    `float_ref` names the float model it came from ({"name", "version"}); `contract` is the float one.
    """
    if contract.get("cell") != "lstm":
        raise ExportError(f"--quantize int8: got a {str(contract.get('cell')).upper()} model, expected an LSTM "
                          "(onnxruntime has a quantized LSTM kernel, DynamicQuantizeLSTM, and none for GRU)")
    with tempfile.TemporaryDirectory(prefix="lstm-onnx-int8-") as tmp:
        out = Path(tmp) / "model_int8.onnx"
        quantize_int8(float_path, out, per_channel)
        audit = audit_model(out, against=float_path)
        model = onnx.load(str(out))
    quantized = [x.label for x in audit.layers if x.op_type]
    if len(quantized) != len(audit.layers) or not audit.layers:
        raise ExportError(f"--quantize int8: onnxruntime quantized {len(quantized)} of {len(audit.layers)} recurrent "
                          "layers, expected all of them")
    beyond = {k: e for k, e in (audit.quant_errors or {}).items() if e["bound_share"] > 1.001}
    if beyond:
        raise ExportError(f"--quantize int8: {len(beyond)} gate(s) are further than scale/2 from the float model: "
                          + ", ".join(sorted(beyond)[:4]))
    parity = run_parity(net, model.SerializeToString(), ["CPUExecutionProvider"], atol=atol, rtol=rtol,
                        floor_factor=0.0, atol_by_kind={"large": INT8_SATURATED_ATOL})
    sample_in, sample_out = make_sample(net)
    import onnxruntime

    c = {k: v for k, v in contract.items() if k not in ("parity", "parity_sample")}
    c["gate_digests"] = {g.key: gate_digest(g.array) for layer in audit.layers for g in layer.gates}
    c["quantization"] = {
        "scheme": "int8",
        "tool": f"onnxruntime.quantization.quantize_dynamic (onnxruntime {onnxruntime.__version__})",
        "per_channel": per_channel,
        "float_model": float_ref,
        "gate_errors": audit.quant_errors,
        "budget": {"atol": atol, "rtol": rtol, "atol_by_kind": {"large": INT8_SATURATED_ATOL}},
    }
    c["parity"] = {k: parity[k] for k in ("passed", "atol", "rtol", "providers", "cases_run", "cases_failed",
                                          "worst_abs_error", "tolerance_that_would_pass")}
    c["parity"]["against"] = "PyTorch FP32"
    c["parity_sample"] = {
        "inputs": {k: encode_tensor(v) for k, v in sample_in.items()},
        "outputs": {k: encode_tensor(v) for k, v in sample_out.items()},  # PyTorch FP32, not the int8 model
        "atol": atol,
        "rtol": rtol,
    }
    set_contract(model, c)
    model.producer_name = "lstm-onnx"
    model.doc_string = (model.doc_string or "") + " Int8 (onnxruntime dynamic quantization) of " + json.dumps(float_ref)
    return model, {"parity": parity, "quant_errors": audit.quant_errors}


def quantized_contract(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The `quantization` section of a model's contract (None for a float model)."""
    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    try:
        return (json.loads(raw) or {}).get("quantization") if raw else None
    except (json.JSONDecodeError, AttributeError):
        return None


def export_int8(run_dir: str | Path, repository: str | Path, float_name: str, version: int = 1,
                max_batch_size: int = 64, per_channel: bool = True, atol: float = INT8_ATOL,
                rtol: float = INT8_RTOL) -> dict[str, Any]:
    """Quantize `<repository>/<float_name>/<version>/model.onnx` and publish it as `<float_name>_int8`, same version.

    Raises ExportError when the model cannot be quantized, ParityFailed (nothing written) when the int8
    model is beyond the budget against PyTorch FP32.
    """
    from lstm_onnx.contract import read_contract
    from lstm_onnx.model.checkpoint import load_run

    from .repository import MODEL_FILE, BatchingOptions, ParityFailed, publish_model_version, render_config

    float_path = Path(repository) / float_name / str(version) / MODEL_FILE
    contract, problem = read_contract(onnx.load(str(float_path), load_external_data=False))
    if contract is None:
        raise ExportError(f"{float_path}: {problem or 'no lstm-onnx contract'}, expected a model written by export")
    net, _ = load_run(run_dir)
    name = float_name + QUANTIZED_SUFFIX
    model, details = build_int8_model(net, float_path, contract, {"name": float_name, "version": version},
                                      per_channel, atol, rtol)
    parity = details["parity"]
    report = {
        "format": "lstm-onnx-export-report/1",
        "run_dir": str(Path(run_dir).resolve()),
        "model": name,
        "version": version,
        "quantization": json.loads(json.dumps(read_contract(model)[0]["quantization"])),
        "parity": {k: v for k, v in parity.items() if k != "cases"},
    }
    if not parity["passed"]:
        raise ParityFailed(f"int8 parity against PyTorch FP32 failed in {parity['cases_failed']} of "
                           f"{parity['cases_run']} cases: atol needed {parity['tolerance_that_would_pass']:.3g} "
                           f"> budget atol {atol:g} (rtol {rtol:g}); the int8 model was not written", report)
    path = publish_model_version(repository, name, version, model.SerializeToString(), report,
                                 render_config(contract, name, options=BatchingOptions(max_batch_size=max_batch_size)))
    report["path"] = str(path)
    return report
