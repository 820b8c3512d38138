"""Subcommands `export` and `verify`; parsers only here, the work happens in the handlers' modules."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _write_report(report: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def run_export(args: argparse.Namespace) -> int:
    """Handler of `lstm-onnx export`."""
    from lstm_onnx.errors import CheckFailed, UsageError
    from lstm_onnx.model.checkpoint import CheckpointError

    from .onnx_export import ExportError
    from .repository import BatchingOptions, ParityFailed, export_to_repository
    from .verification import parity_sentence

    try:
        batching = BatchingOptions(max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                                   preferred_batch_size=tuple(args.preferred_batch_size or ()),
                                   max_candidate_sequences=args.max_candidate_sequences,
                                   max_sequence_idle_us=args.max_sequence_idle_us)
        report = export_to_repository(args.run_dir, args.repository, name=args.name, version=args.version,
                                      opset=args.opset, atol=args.atol, rtol=args.rtol, floor_factor=args.floor_factor,
                                      config_style=args.config_style, batching=batching)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    except ParityFailed as exc:
        report = dict(exc.report, passed=False, error=str(exc))
        _write_report(report, args.report)
        if args.json:
            print(json.dumps(report, indent=2))
        raise CheckFailed(str(exc)) from None
    except ExportError as exc:
        report = {"format": "lstm-onnx-export-report/1", "passed": False, "error": str(exc)}
        _write_report(report, args.report)
        if args.json:
            print(json.dumps(report, indent=2))
        raise CheckFailed(f"export failed: {exc}") from None
    report["passed"] = True
    if getattr(args, "quantize", None):
        report["quantized"] = _export_quantized(args, report)
    _write_report(report, args.report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        p = report["parity"]
        print(f"exported {report['path']} (config.pbtxt: {report['config_style']})")
        print(f"  recurrent nodes: {', '.join(report['recurrent_nodes'])}")
        print("  " + parity_sentence(p))
        if args.report:
            print(f"  the full parity table: {args.report}")
        if "quantized" in report:
            q = report["quantized"]
            worst = max(e["max_abs"] for e in q["quantization"]["gate_errors"].values())
            print(f"exported {q['path']} (int8)")
            print(f"  gates within scale/2 of FP32 (worst {worst:.2e}); parity against PyTorch FP32: "
                  f"{q['parity']['cases_run']} cases within atol {q['parity']['atol']:g}, rtol {q['parity']['rtol']:g}; "
                  f"atol needed {q['parity']['tolerance_that_would_pass']:.3e}")
    return 0


def _export_quantized(args: argparse.Namespace, report: dict) -> dict:
    """`--quantize int8`: the int8 model beside the float one just written (export.quantization)."""
    from lstm_onnx.errors import CheckFailed

    from .onnx_export import ExportError
    from .quantization import export_int8
    from .repository import ParityFailed

    try:
        return export_int8(args.run_dir, args.repository, report["model"], report["version"],
                           max_batch_size=args.max_batch_size, per_channel=not args.quantize_per_tensor)
    except (ParityFailed, ExportError) as exc:
        failed = dict(report, passed=False, error=str(exc), quantized=getattr(exc, "report", None))
        _write_report(failed, args.report)
        if args.json:
            print(json.dumps(failed, indent=2))
        raise CheckFailed(f"export --quantize {args.quantize}: {exc}") from None


def run_verify(args: argparse.Namespace) -> int:
    """Handler of `lstm-onnx verify`."""
    from lstm_onnx.errors import CheckFailed, UsageError
    from lstm_onnx.model.checkpoint import CheckpointError

    from .onnx_export import ExportError
    from .parity import ParityError
    from .verification import format_verify, verify_model

    try:
        report = verify_model(args.model, args.checkpoint, provider=args.provider, atol=args.atol, rtol=args.rtol,
                              floor_factor=args.floor_factor)
    except (CheckpointError, ParityError, ExportError) as exc:
        raise UsageError(str(exc)) from None
    _write_report(report, args.report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_verify(report, table=args.table, report_path=args.report))
    if not report["passed"]:
        failed = [c["check"] + (f" ({c['message']})" if c.get("message") else "")
                  for c in report["checks"] if c["passed"] is False]
        raise CheckFailed(f"verification failed: {'; '.join(failed)}")
    return 0


def _add_tolerance_flags(parser: argparse.ArgumentParser) -> None:
    """The parity tolerances, shared by export and verify (export runs the same checks)."""
    from .parity import DEFAULT_ATOL, DEFAULT_FLOOR_FACTOR, DEFAULT_RTOL

    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                        help=f"absolute tolerance for parity (default {DEFAULT_ATOL:g}, FP32)")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                        help="relative tolerance: an element passes within atol OR within rtol*|expected| "
                        f"(default {DEFAULT_RTOL:g}; 0: absolute only)")
    parser.add_argument("--floor-factor", type=float, default=DEFAULT_FLOOR_FACTOR,
                        help="a case also passes when its error is within this many times PyTorch's own "
                        "FP32-vs-FP64 error on it (ill-conditioned trained models amplify rounding); "
                        f"0: off (default {DEFAULT_FLOOR_FACTOR:g})")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """What config.pbtxt says to Triton and to our server (docs/contract.md, Model repository)."""
    from .repository import CONFIG_STYLES, DEFAULT_MAX_BATCH, DEFAULT_QUEUE_DELAY_US, DEFAULT_SEQUENCE_IDLE_US

    parser.add_argument("--config-style", choices=CONFIG_STYLES, default=None,
                        help="implicit-state: Triton's sequence batcher carries h0/c0 between a sequence's requests "
                        "(clients send only `input`); stateless: dynamic batching, h0/c0 required inputs. Default: "
                        "implicit-state, or stateless for a bidirectional model (its state cannot be carried)")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH,
                        help=f"max_batch_size in config.pbtxt (default {DEFAULT_MAX_BATCH})")
    parser.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                        help="longest wait for a batch to fill while the model is busy, in microseconds "
                        f"(default {DEFAULT_QUEUE_DELAY_US})")
    parser.add_argument("--preferred-batch-size", type=int, nargs="+", metavar="N",
                        help="batch sizes Triton's batcher aims for, each 1..max-batch-size (default: max-batch-size)")
    parser.add_argument("--max-candidate-sequences", type=int, default=0,
                        help="implicit-state: sequences Triton batches at once (its slots; more wait in a backlog "
                        "until one ends); 0: max-batch-size (default 0)")
    parser.add_argument("--max-sequence-idle-us", type=int, default=DEFAULT_SEQUENCE_IDLE_US,
                        help="implicit-state: a sequence with no request for this long is freed, in microseconds "
                        f"(default {DEFAULT_SEQUENCE_IDLE_US})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="turn a run directory into a served-ready model repository",
        description="Export a trained run to ONNX (one explicit LSTM/GRU node per layer, dynamic batch and time), "
        "check it with onnx.checker and against PyTorch on CPU, and write DIR/NAME/VERSION/model.onnx, "
        "DIR/NAME/config.pbtxt (Triton ModelConfig) and an export report. Nothing is written when a check fails "
        "(exit 1).",
    )
    p.add_argument("run_dir", help="run directory written by `lstm-onnx train`")
    p.add_argument("--repository", required=True, metavar="DIR", help="model repository (Triton layout) to write into")
    p.add_argument("--name", help="model name in the repository (default: <cell>_model)")
    p.add_argument("--version", type=int, default=1, help="model version folder (default 1)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 14..20 (default 17)")
    _add_tolerance_flags(p)
    _add_config_flags(p)
    p.add_argument("--report", metavar="FILE", help="also write the JSON report here (kept on failure too)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of a summary")
    p.add_argument("--quantize", choices=("int8",),
                   help="also write an int8 model (onnxruntime dynamic quantization, LSTM only) as the model "
                   "NAME_int8, same version, beside the float one; its contract records per-gate quantization "
                   "errors and parity against PyTorch FP32 within the int8 budget (export/quantization.py)")
    p.add_argument("--quantize-per-tensor", action="store_true",
                   help="with --quantize: one scale per direction instead of one per gate row (per channel)")
    p.set_defaults(func=run_export)

    v = sub.add_parser(
        "verify",
        help="compare an ONNX model with its PyTorch checkpoint on every provider",
        description="Compare PyTorch eager with onnxruntime: batch 1, 3, 16; time 1, 7, 64; random, zero and "
        "large inputs; given and omitted state; a sequence fed in chunks against the whole. Reports per output "
        "the max absolute and relative error and the tolerance that would have passed. Exit 1 on any failure.",
    )
    v.add_argument("model", help="the ONNX file")
    v.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="run directory it was exported from")
    v.add_argument("--provider", default="all", choices=("cpu", "cuda", "all"),
                   help="onnxruntime provider(s) to compare (all: every available one; default all)")
    _add_tolerance_flags(v)
    v.add_argument("--report", metavar="FILE", help="also write the JSON report here")
    v.add_argument("--json", action="store_true", help="print the JSON report instead of a summary")
    v.add_argument("--table", action="store_true", help="print the worst errors per provider and output too "
                   "(always printed when parity fails)")
    v.set_defaults(func=run_verify)

