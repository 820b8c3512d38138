"""The `audit` subcommand: parser here, work in lstm_onnx.export.audit (onnx and numpy, imported lazily)."""
from __future__ import annotations

import argparse
import inspect
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add `audit` to the `lstm-onnx` dispatcher."""
    parser = sub.add_parser(
        "audit",
        help="show every gate's weights of the LSTM/GRU nodes in an ONNX file, and flag suspicious ones",
        description=inspect.cleandoc(run_audit.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL.onnx", help="ONNX file to audit (ours or another tool's)")
    parser.add_argument("--checkpoint", metavar="RUN_DIR",
                        help="run directory it was exported from: check every slice is bit-identical to its PyTorch "
                        "parameter, and (with init.safetensors) that training moved each gate")
    parser.add_argument("--against", metavar="OLD.onnx",
                        help="compare gate by gate with another model (an older version, or the float model of a "
                        "quantized one): identical, quantized within scale/2, or changed, with max abs and relative "
                        "change, and structural differences")
    parser.add_argument("--fail-on-change", action="store_true",
                        help="with --against: exit 1 (CHANGED_GATES) when any tensor or the structure changed")
    parser.add_argument("--html", metavar="FILE.html",
                        help="also write a self-contained HTML report (tables, findings, per-gate heatmaps; "
                        "no network) to FILE; needs matplotlib")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (stable keys) instead of tables")
    parser.add_argument("--gates-npz", metavar="FILE",
                        help="write every gate tensor to FILE under layer{k}.{direction}.{gate}.{W|R|bW|bR|P}")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw W | R | b per layer, direction and gate as heatmaps on shared colour scales; with "
                        "--checkpoint also trained minus init.safetensors (needs matplotlib)")
    parser.set_defaults(func=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    """Audit the weights of every LSTM and GRU node in an ONNX model, without torch.

    Resolves W, R, B and P through Identity/Constant nodes and (safely) external data, splits them
    per layer, direction and gate (LSTM input, forget, cell, output; GRU update, reset, hidden), and
    prints one table per layer, the head, parameter totals and findings. Weights computed from
    constants (Slice/Concat, Cast, Reshape, Transpose, Unsqueeze, ...) are folded and their path shown;
    onnxruntime's quantized DynamicQuantizeLSTM and integer MatMul heads are dequantized per gate,
    with each gate's integer range, scale and zero point, and its quantization error given --against
    FLOAT.onnx or --checkpoint. Exit status 1 when any finding is an error (NaN/Inf, tied or copied
    weights, digest or checkpoint mismatch, malformed node, no explicit recurrent op, CHANGED_GATES
    with --fail-on-change), 2 on a usage error.
    """
    from lstm_onnx.errors import CheckFailed, UsageError

    from . import AuditInputError, audit_model
    from .plot import write_plot
    from .report import format_text, to_json, write_npz

    if args.fail_on_change and not args.against:
        raise UsageError("--fail-on-change needs --against OLD.onnx (the model to compare with)")
    try:
        audit = audit_model(args.model, checkpoint=args.checkpoint, against=args.against,
                            fail_on_change=args.fail_on_change)
    except AuditInputError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        json.dump(to_json(audit), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_text(audit))
    try:
        if args.gates_npz:
            count = write_npz(audit, args.gates_npz)
            print(f"wrote {count} gate tensors to {args.gates_npz}", file=sys.stderr)
        if args.plot:
            write_plot(audit, args.plot)
            print(f"wrote heatmaps to {args.plot}", file=sys.stderr)
        if args.html:
            from .html import write_html

            write_html(audit, args.html)
            print(f"wrote the HTML report to {args.html}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{exc}") from None
    except ImportError as exc:
        raise UsageError(f"--plot and --html need matplotlib ({exc.name} is not installed)") from None
    errors = audit.errors
    if errors:
        codes = sorted({f.code for f in errors})
        raise CheckFailed(f"{len(errors)} error finding(s): {', '.join(codes)}")
    return 0
