"""The `lstm-onnx` command: a thin dispatcher to the subcommands that model/, export/ and server/ define."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each package's cli module defines register(subparsers); they import nothing heavy at module level,
# so `lstm-onnx audit` runs without torch and `lstm-onnx serve` never loads it.
_CLI_MODULES = ("model.cli", "export.cli", "server.cli")


class UsageError(Exception):
    """A mistake in how the command was called: one line on stderr, exit 2."""


class CheckFailed(Exception):
    """A check the user asked for failed (parity, audit, bad data): one line on stderr, exit 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-onnx",
        description="Train a stacked LSTM/GRU, export it to ONNX with explicit LSTM ops, verify parity, "
        "audit every gate's weights, and serve it over KServe v2 gRPC.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _CLI_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a package not built yet, or an install without it
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UsageError as exc:
        print(f"lstm-onnx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CheckFailed as exc:
        print(f"lstm-onnx {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lstm-onnx {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: handlers raise lstm_onnx.UsageError,
    # which is a different class from __main__.UsageError.
    from lstm_onnx import main as _main

    sys.exit(_main())
