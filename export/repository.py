"""Turn a run directory into a Triton-layout model repository: model.onnx, config.pbtxt, export report."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lstm_onnx.contract import (
    MAX_BATCH_SIZE,
    MAX_QUEUE_DELAY_US,
    MAX_SEQUENCE_IDLE_US,
    RECURRENT_OPS,
    WEIGHTS_FILE,
    encode_tensor,
    file_digest,
)

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


CONFIG_STYLES = ("implicit-state", "stateless")
DEFAULT_SEQUENCE_IDLE_US = 60_000_000  # the server's own default idle timeout; Triton's is 1 s when unset


@dataclass(frozen=True)
class BatchingOptions:
    """What config.pbtxt tells a scheduler, Triton's or ours, about batching and sequences."""

    max_batch_size: int = DEFAULT_MAX_BATCH
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US  # longest wait for a batch to fill while the model is busy
    preferred_batch_size: tuple[int, ...] = ()  # empty: [max_batch_size], what Triton would fill in
    max_candidate_sequences: int = 0  # Triton's sequence slots (oldest strategy); 0: max_batch_size
    max_sequence_idle_us: int = DEFAULT_SEQUENCE_IDLE_US  # a sequence with no request this long is freed

    def check(self) -> None:
        """Raise ExportError naming the first value Triton would refuse at load."""
        if not 1 <= self.max_batch_size <= MAX_BATCH_SIZE:
            raise ExportError(f"max_batch_size: got {self.max_batch_size}, expected 1..{MAX_BATCH_SIZE}")
        for value in self.preferred_batch_size:
            # core model_config_utils.cc ValidateModelConfig: preferred sizes must be in 1..max_batch_size
            if not 1 <= value <= self.max_batch_size:
                raise ExportError(f"preferred_batch_size: got {value}, expected 1..{self.max_batch_size} "
                                  "(max_batch_size)")
        if not 0 <= self.max_queue_delay_us <= MAX_QUEUE_DELAY_US:
            raise ExportError(f"max_queue_delay_us: got {self.max_queue_delay_us}, expected 0..{MAX_QUEUE_DELAY_US} "
                              f"({MAX_QUEUE_DELAY_US // 1_000_000} s; the server refuses a longer wait)")
        if not 0 <= self.max_candidate_sequences <= MAX_BATCH_SIZE:
            raise ExportError(f"max_candidate_sequences: got {self.max_candidate_sequences}, expected "
                              f"0..{MAX_BATCH_SIZE}")
        if not 1 <= self.max_sequence_idle_us <= MAX_SEQUENCE_IDLE_US:
            raise ExportError(f"max_sequence_idle_us: got {self.max_sequence_idle_us}, expected "
                              f"1..{MAX_SEQUENCE_IDLE_US} (1 day)")


def choose_config_style(contract: dict[str, Any], requested: str | None) -> str:
    """The config style for this model: implicit-state unless asked otherwise or the model is bidirectional."""
    if requested is not None and requested not in CONFIG_STYLES:
        raise ExportError(f"config style: got {requested!r}, expected one of {', '.join(CONFIG_STYLES)}")
    bidirectional = contract["num_directions"] == 2
    if requested == "implicit-state" and bidirectional:
        # The reverse direction reads a chunk from its end: a state carried into the next chunk is not the
        # state the whole sequence would have there, so Triton would answer wrongly (docs/contract.md).
        raise ExportError("config style implicit-state: the model is bidirectional, so its state cannot be "
                          "carried from one chunk to the next; expected --config-style stateless")
    return requested or ("stateless" if bidirectional else "implicit-state")


def _dims(values: list[int]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _tensors(entries: list[tuple[str, list[int]]]) -> list[str]:
    return [f'  {{ name: "{n}" data_type: TYPE_FP32 dims: {_dims(d)} }}' + ("," if i < len(entries) - 1 else "")
            for i, (n, d) in enumerate(entries)]


def check_state_pairing(pairs: list[tuple[str, str]]) -> None:
    """Raise ExportError unless Triton's pairing of state inputs and outputs by sorted name gives these pairs.

    Triton's core (sequence_state.cc, SequenceStates::OutputState) finds an output state's index among the
    sorted output names and feeds it to the input state at the same index among the sorted input names
    (triton-inference-server/server issue 8586), so the two sort orders must agree.
    """
    inputs, outputs = sorted(i for i, _ in pairs), sorted(o for _, o in pairs)
    for state_in, state_out in pairs:
        if inputs.index(state_in) != outputs.index(state_out):
            paired = inputs[outputs.index(state_out)]
            raise ExportError(f"state '{state_in}'->'{state_out}': Triton pairs output '{state_out}' with input "
                              f"'{paired}' by sorted name, expected '{state_in}'")


def render_config(contract: dict[str, Any], name: str, style: str | None = None,
                  options: BatchingOptions = BatchingOptions()) -> str:
    """config.pbtxt in Triton's ModelConfig text format, for Triton's onnxruntime backend and our server.

    implicit-state: sequence_batching (oldest strategy) with one `state` entry per recurrent pair, so a
    sequence's hn/cn are fed back as its next h0/c0 and the client sends only `input`; hn/cn stay outputs.
    stateless: dynamic_batching, with h0/c0 required inputs (Triton's onnxruntime backend refuses optional
    inputs when max_batch_size > 0). Dims exclude the batch axis, as max_batch_size > 0 asks.
    """
    style = choose_config_style(contract, style)
    options.check()
    pairs = [(s["input"], s["output"]) for s in contract["state"]]
    check_state_pairing(pairs)
    state_dims = [contract["num_layers"] * contract["num_directions"], contract["hidden_size"]]  # (L*D, H)
    inputs = [("input", [-1, contract["input_size"]])]  # (T, F)
    if style == "stateless":
        inputs += [(i, state_dims) for i, _ in pairs]
    outputs = [("output", [contract["num_outputs"]])] + [(o, state_dims) for _, o in pairs]
    preferred = _dims(list(options.preferred_batch_size or (options.max_batch_size,)))
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {options.max_batch_size}",
             "input [", *_tensors(inputs), "]", "output [", *_tensors(outputs), "]"]
    if style == "stateless":
        lines.append(f"dynamic_batching {{ preferred_batch_size: {preferred} "
                     f"max_queue_delay_microseconds: {options.max_queue_delay_us} }}")
    else:
        candidates = options.max_candidate_sequences or options.max_batch_size
        lines += ["sequence_batching {",
                  f"  max_sequence_idle_microseconds: {options.max_sequence_idle_us}",
                  f"  oldest {{ max_candidate_sequences: {candidates} preferred_batch_size: {preferred} "
                  f"max_queue_delay_microseconds: {options.max_queue_delay_us} }}",
                  "  state ["]
        for i, (state_in, state_out) in enumerate(pairs):
            # Batch-major state ([B, L*D, H] in the graph) is what lets Triton concatenate slots along axis 0.
            lines.append(f'    {{ input_name: "{state_in}" output_name: "{state_out}" data_type: TYPE_FP32 '
                         f"dims: {_dims(state_dims)}")
            lines.append(f"      initial_state {{ data_type: TYPE_FP32 dims: {_dims(state_dims)} zero_data: true "
                         f'name: "{state_in}_zero" }} }}' + ("," if i < len(pairs) - 1 else ""))
        lines += ["  ]", "}"]
    lines.append('parameters { key: "lstm_onnx.cell" value { string_value: "%s" } }' % contract["cell"])
    # What `output` holds, so that clients can say "class 2, probability 0.97" instead of printing logits.
    lines.append('parameters { key: "lstm_onnx.task" value { string_value: "%s" } }' % contract["task"])
    lines.append('parameters { key: "lstm_onnx.config_style" value { string_value: "%s" } }' % style)
    return "\n".join(lines) + "\n"


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ExportError(f"model name: got {name!r}, expected letters, digits, '_', '.', '-' (max 128, no '/')")


def export_to_repository(run_dir: str | os.PathLike, repository: str | os.PathLike, name: str | None = None,
                         version: int = 1, opset: int = DEFAULT_OPSET, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                         floor_factor: float = DEFAULT_FLOOR_FACTOR, max_batch_size: int | None = None,
                         config_style: str | None = None,
                         batching: BatchingOptions | None = None) -> dict[str, Any]:
    """Export a run to `<repository>/<name>/<version>/model.onnx` with config.pbtxt and a JSON report.

    Everything is written under a staging folder inside the repository and moved into place only when
    the export passed its explicitness, checker and parity checks: a failed export leaves the
    repository as it was. `config_style` None picks implicit-state, or stateless for a bidirectional
    model; `max_batch_size`, when given, overrides `batching`'s. Raises ExportError or ParityFailed
    (with the report) on failure.
    """
    from lstm_onnx.model.checkpoint import load_run

    started = time.perf_counter()
    run_dir = Path(run_dir)
    net, run_config = load_run(run_dir)
    name = name or f"{run_config.model.cell}_model"
    _check_name(name)
    if not isinstance(version, int) or version < 1:
        raise ExportError(f"version: got {version!r}, expected a positive integer")
    batching = batching or BatchingOptions()
    if max_batch_size is not None:
        batching = dataclasses.replace(batching, max_batch_size=max_batch_size)
    batching.check()
    checkpoint_digest = file_digest(run_dir / WEIGHTS_FILE)
    model, contract = export_onnx(net, checkpoint_digest, opset)
    config_text = render_config(contract, name, config_style, batching)  # before parity: a bad flag fails fast
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
        "config_style": choose_config_style(contract, config_style),
        "parity": {k: v for k, v in parity.items() if k != "cases"},
        "seconds": None,
    }
    if not parity["passed"]:
        report["seconds"] = round(time.perf_counter() - started, 3)
        raise ParityFailed(
            f"parity failed in {parity['cases_failed']} of {parity['cases_run']} cases: atol needed "
            f"{parity['tolerance_that_would_pass']:.3g} > atol {atol:g} (rtol {rtol:g}, {floor_factor:g}x the FP32 floor); nothing was written", report)

    report["seconds"] = round(time.perf_counter() - started, 3)
    report["path"] = str(publish_model_version(repository, name, version, model.SerializeToString(), report,
                                               config_text))
    return report


def publish_model_version(repository: str | os.PathLike, name: str, version: int, model_bytes: bytes,
                          report: dict[str, Any], config_text: str) -> Path:
    """Write `<repository>/<name>/<version>/model.onnx`, its report and `<name>/config.pbtxt`, staged then moved.

    export_to_repository and the int8 model of `export --quantize` both publish through here: a failure leaves
    the repository as it was. Returns the model file's path.
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
