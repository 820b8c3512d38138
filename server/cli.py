"""Subcommand `serve`: parser here, heavy imports (grpc, onnxruntime) inside the handler."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the `lstm-onnx` dispatcher."""
    from . import settings

    serve = sub.add_parser("serve", help=cmd_serve.__doc__.splitlines()[0], description=cmd_serve.__doc__)
    settings.add_arguments(serve)
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve every model of a Triton-layout repository over KServe v2 gRPC, with metrics, until SIGTERM."""
    from lstm_onnx.errors import CheckFailed, UsageError

    from .app import StartupError, run_event_loop, serve
    from .logs import configure_logging
    from .settings import load_settings

    try:
        config = load_settings(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    configure_logging(config.log_format, config.log_level)
    if config.workers > 1:
        from .workers import WorkerFailed, run_workers

        try:
            return run_workers(config)
        except OSError as exc:  # the shared port could not be bound
            raise UsageError(f"grpc_port {config.grpc_port}: {exc}") from None
        except WorkerFailed as exc:
            raise CheckFailed(str(exc)) from None
    try:
        run_event_loop(serve(config), config.event_loop)
    except StartupError as exc:
        raise CheckFailed(str(exc)) from None
    except (FileNotFoundError, OSError) as exc:
        raise UsageError(str(exc)) from None
    return 0
