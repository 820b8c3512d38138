"""Turn a run directory into a Triton-layout model repository: model.onnx, config.pbtxt, export report."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from lstm_onnx.contract import RECURRENT_OPS, WEIGHTS_FILE, encode_tensor, file_digest

from .onnx_export import DEFAULT_OPSET, ExportError, export_onnx, set_contract
from .parity import DEFAULT_ATOL, DEFAULT_FLOOR_FACTOR, DEFAULT_RTOL, make_sample, run_parity

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"
REPORT_FILE = "export_report.json"
DEFAULT_MAX_BATCH = 64
DEFAULT_QUEUE_DELAY_US = 500
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class ParityFailed(Exception):
    """Export finished but onnxruntime disagrees with PyTorch beyond the tolerance; nothing was published."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def render_config(contract: dict[str, Any], name: str, max_batch_size: int = DEFAULT_MAX_BATCH,
                  queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> str:
    """config.pbtxt in Triton's ModelConfig text format; dims exclude the batch axis."""
    state_dims = [contract["num_layers"] * contract["num_directions"], contract["hidden_size"]]
    inputs = [("input", [-1, contract["input_size"]], False)] + [(s["input"], state_dims, True) for s in contract["state"]]
    outputs = [("output", [contract["num_outputs"]])] + [(s["output"], state_dims) for s in contract["state"]]

    def dims(d: list[int]) -> str:
        return "[ " + ", ".join(str(v) for v in d) + " ]"

    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [",
    ]
    for i, (n, d, optional) in enumerate(inputs):
        # h0/c0 are optional: a server supplies zeros when a client leaves them out.
        opt = " optional: true" if optional else ""
        lines.append(f'  {{ name: "{n}" data_type: TYPE_FP32 dims: {dims(d)}{opt} }}' + ("," if i < len(inputs) - 1 else ""))
    lines.append("]")
    lines.append("output [")
    for i, (n, d) in enumerate(outputs):
        lines.append(f'  {{ name: "{n}" data_type: TYPE_FP32 dims: {dims(d)} }}' + ("," if i < len(outputs) - 1 else ""))
    lines.append("]")
    lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}")
    lines.append('parameters { key: "lstm_onnx.cell" value { string_value: "%s" } }' % contract["cell"])
    return "\n".join(lines) + "\n"


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ExportError(f"model name: got {name!r}, expected letters, digits, '_', '.', '-' (max 128, no '/')")


def export_to_repository(run_dir: str | os.PathLike, repository: str | os.PathLike, name: str | None = None,
                         version: int = 1, opset: int = DEFAULT_OPSET, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                         floor_factor: float = DEFAULT_FLOOR_FACTOR,
                         max_batch_size: int = DEFAULT_MAX_BATCH) -> dict[str, Any]:
    """Export a run to `<repository>/<name>/<version>/model.onnx` with config.pbtxt and a JSON report.

    Everything is written under a staging folder inside the repository and moved into place only when
    the export passed its explicitness, checker and parity checks: a failed export leaves the
    repository as it was. Raises ExportError or ParityFailed (with the report) on failure.
    """
    from lstm_onnx.model.checkpoint import load_run

    started = time.perf_counter()
    run_dir = Path(run_dir)
    net, run_config = load_run(run_dir)
    name = name or f"{run_config.model.cell}_model"
    _check_name(name)
    if not isinstance(version, int) or version < 1:
        raise ExportError(f"version: got {version!r}, expected a positive integer")
    if max_batch_size < 1:
        raise ExportError(f"max_batch_size: got {max_batch_size}, expected at least 1")
    checkpoint_digest = file_digest(run_dir / WEIGHTS_FILE)
    model, contract = export_onnx(net, checkpoint_digest, opset)
    parity = run_parity(net, model.SerializeToString(), ["CPUExecutionProvider"], atol=atol, rtol=rtol,
                        floor_factor=floor_factor)
    sample_in, sample_out = make_sample(net)
    contract["parity"] = {k: parity[k] for k in ("passed", "atol", "rtol", "providers", "cases_run", "cases_failed",
                                                 "worst_abs_error", "tolerance_that_would_pass", "fp32_floor",
                                                 "floor_factor", "cases_passed_by_floor")}
    contract["parity_sample"] = {
        "inputs": {k: encode_tensor(v) for k, v in sample_in.items()},
        "outputs": {k: encode_tensor(v) for k, v in sample_out.items()},
        "atol": 1e-4,
    }
    set_contract(model, contract)
    report = {
        "format": "lstm-onnx-export-report/1",
        "run_dir": str(run_dir.resolve()),
        "model": name,
        "version": version,
        "opset": opset,
        "checkpoint_digest": checkpoint_digest,
        "recurrent_nodes": [n.name for n in model.graph.node if n.op_type in RECURRENT_OPS],
        "parity": {k: v for k, v in parity.items() if k != "cases"},
        "seconds": None,
    }
    if not parity["passed"]:
        report["seconds"] = round(time.perf_counter() - started, 3)
        raise ParityFailed(
            f"parity failed in {parity['cases_failed']} of {parity['cases_run']} cases: atol needed "
            f"{parity['tolerance_that_would_pass']:.3g} > atol {atol:g} (rtol {rtol:g}, {floor_factor:g}x the FP32 floor); nothing was written", report)

    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=repository, prefix=f".staging-{name}-"))
    try:
        version_dir = staging / str(version)
        version_dir.mkdir()
        (version_dir / MODEL_FILE).write_bytes(model.SerializeToString())
        report["seconds"] = round(time.perf_counter() - started, 3)
        (version_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (staging / CONFIG_FILE).write_text(render_config(contract, name, max_batch_size))
        model_dir = repository / name
        model_dir.mkdir(exist_ok=True)
        final = model_dir / str(version)
        if final.exists():
            old = model_dir / f".old-{version}-{os.getpid()}"
            os.replace(final, old)
            os.replace(version_dir, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(version_dir, final)
        os.replace(staging / CONFIG_FILE, model_dir / CONFIG_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report["path"] = str((repository / name / str(version) / MODEL_FILE).resolve())
    return report


def publish_model_version(repository: str | os.PathLike, name: str, version: int, model_bytes: bytes,
                          report: dict[str, Any], config_text: str) -> Path:
    """Write `<repository>/<name>/<version>/model.onnx`, its report and `<name>/config.pbtxt`, staged then moved.

    For models built beside the exported one (the int8 model of `export --quantize`); the same staging as
    export_to_repository, so a failure leaves the repository as it was. Returns the model file's path.
    """
    _check_name(name)
    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=repository, prefix=f".staging-{name}-"))
    try:
        version_dir = staging / str(version)
        version_dir.mkdir()
        (version_dir / MODEL_FILE).write_bytes(model_bytes)
        (version_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (staging / CONFIG_FILE).write_text(config_text)
        model_dir = repository / name
        model_dir.mkdir(exist_ok=True)
        final = model_dir / str(version)
        if final.exists():
            old = model_dir / f".old-{version}-{os.getpid()}"
            os.replace(final, old)
            os.replace(version_dir, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(version_dir, final)
        os.replace(staging / CONFIG_FILE, model_dir / CONFIG_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return (repository / name / str(version) / MODEL_FILE).resolve()
