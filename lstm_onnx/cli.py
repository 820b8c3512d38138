"""The `lstm-onnx` command: a thin dispatcher to the subcommands that each package's `cli` module defines."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import CheckFailed, UsageError

# Subcommand -> the module that registers it. The cli modules import nothing heavy at module level,
# so `lstm-onnx audit` runs without torch and `lstm-onnx serve` never loads it.
COMMANDS: dict[str, str] = {
    "train": "lstm_onnx.model.cli",
    "export": "lstm_onnx.export.cli",
    "verify": "lstm_onnx.export.cli",
    "audit": "lstm_onnx.export.audit.cli",
    "serve": "lstm_onnx.server.cli",
    "infer": "lstm_onnx.client.cli",
    "stream": "lstm_onnx.client.cli",
    "bench": "lstm_onnx.client.cli",
}
# Third-party top-level modules -> the extra that installs them, for the one-line hint.
EXTRAS: dict[str, str] = {
    "torch": "train", "safetensors": "train", "matplotlib": "train", "tqdm": "train",
    "grpc": "serve", "grpc_health": "serve", "grpc_reflection": "serve", "google": "serve",
    "onnxruntime": "cpu] or [gpu",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-onnx",
        description="Train a stacked LSTM/GRU, export it to ONNX with explicit LSTM ops, verify parity, "
        "audit every gate's weights, and serve it over KServe v2 gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"lstm-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in dict.fromkeys(COMMANDS.values()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # our own package missing from this install: say so, never drop it
            for command in (c for c, m in COMMANDS.items() if m == module_name):
                _register_missing(sub, command, exc)
            continue
        module.register(sub)
    return parser


def _register_missing(sub: argparse._SubParsersAction, command: str, exc: ModuleNotFoundError) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise UsageError(f"this install lacks the package behind `{command}` ({exc}); reinstall lstm-onnx")

    p = sub.add_parser(command, help=f"(unavailable: {exc})", add_help=False)
    p.set_defaults(func=fail, accepts_any_arguments=True)


def missing_extra_hint(exc: ModuleNotFoundError) -> str:
    """One line for a handler that needs a dependency this install does not have."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return f"needs the Python module '{exc.name}', which is not installed"
    return f"needs '{top}', which is not installed: pip install 'lstm-onnx[{extra}]'"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        result = args.func(args)
        sys.stdout.flush()
    except UsageError as exc:
        print(f"lstm-onnx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CheckFailed as exc:
        print(f"lstm-onnx {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lstm-onnx {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): Python's recommended exit, without a traceback at shutdown.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top in EXTRAS:
            print(f"lstm-onnx {args.command}: {missing_extra_hint(exc)}", file=sys.stderr)
            return 1
        raise
    return int(result or 0)
