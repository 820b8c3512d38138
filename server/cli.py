"""Subcommands `serve`, `infer` and `stream`: parsers here, heavy imports inside the handlers."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add serve, infer and stream to the `lstm-onnx` dispatcher."""
    from . import settings

    serve = sub.add_parser("serve", help=cmd_serve.__doc__.splitlines()[0], description=cmd_serve.__doc__)
    settings.add_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    infer = sub.add_parser("infer", help=cmd_infer.__doc__.splitlines()[0], description=cmd_infer.__doc__)
    _add_client_flags(infer)
    source = infer.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="the 'input' tensor as a .npy file, batch-major [B, T, F]")
    source.add_argument("--random", metavar="B,T", help="random inputs of batch B and time T from the model's metadata")
    infer.add_argument("--json", action="store_true", help="print outputs as one JSON object instead of text")
    infer.set_defaults(func=cmd_infer)

    stream = sub.add_parser("stream", help=cmd_stream.__doc__.splitlines()[0], description=cmd_stream.__doc__)
    _add_client_flags(stream)
    stream.add_argument("--input", required=True, help="the whole sequence as a .npy file [B, T, F]")
    stream.add_argument("--chunk", type=int, required=True, help="time steps per request")
    stream.add_argument("--sequence-id", default="1", help="sequence id (an integer, or any string)")
    stream.add_argument("--json", action="store_true", help="print one JSON object per chunk")
    stream.set_defaults(func=cmd_stream)

    from . import bench_cli

    bench_cli.add_parser(sub)


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="127.0.0.1:8001", help="server address HOST:PORT (default 127.0.0.1:8001)")
    parser.add_argument("--model", required=True, help="model name in the repository")
    parser.add_argument("--version", default="", help="model version (default: the latest ready one)")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve every model of a Triton-layout repository over KServe v2 gRPC, with metrics, until SIGTERM."""
    from lstm_onnx import CheckFailed, UsageError

    from .app import run_event_loop, serve
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
    except (FileNotFoundError, OSError) as exc:
        raise UsageError(str(exc)) from None
    return 0


def _print_outputs(outputs: dict, as_json: bool, extra: dict | None = None) -> None:
    import json

    import numpy as np

    if as_json:
        print(json.dumps({**(extra or {}), "outputs": {k: {"shape": list(v.shape), "datatype": str(v.dtype),
                                                            "data": v.tolist()} for k, v in outputs.items()}}))
        return
    if extra:
        print(" ".join(f"{k}={v}" for k, v in extra.items()))
    with np.printoptions(precision=5, suppress=True, threshold=64):
        for name, value in outputs.items():
            print(f"{name} {list(value.shape)} {value.dtype}:\n{value}")


def _load_npy(path: str):
    import numpy as np

    from lstm_onnx import UsageError

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--input {path}: {exc}") from None


def cmd_infer(args: argparse.Namespace) -> int:
    """Send one inference request (omitted h0/c0 are zeros on the server) and print the outputs."""
    from lstm_onnx import CheckFailed, UsageError

    from .client import ClientError, InferenceClient, random_inputs

    with InferenceClient(args.url) as client:
        try:
            if args.random:
                try:
                    batch, time = (int(v) for v in args.random.split(","))
                except ValueError:
                    raise UsageError(f"--random: got {args.random!r}, expected B,T such as 2,50") from None
                metadata = client.metadata(args.model, args.version)
                # Optional inputs (recurrent state) are left to the server, which supplies zeros.
                inputs = random_inputs(metadata, batch, time, skip=client.optional_inputs(args.model))
            else:
                inputs = {"input": _load_npy(args.input)}
            outputs = client.infer(args.model, inputs, args.version)
        except ClientError as exc:
            raise CheckFailed(f"server refused the request: {exc}") from None
    _print_outputs(outputs, args.json)
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    """Stream one sequence in chunks over ModelStreamInfer (the server carries hn/cn) and print each chunk's outputs."""
    from lstm_onnx import CheckFailed, UsageError

    from .client import ClientError, InferenceClient, split_time

    if args.chunk < 1:
        raise UsageError(f"--chunk: got {args.chunk}, expected at least 1")
    array = _load_npy(args.input)
    if array.ndim != 3:
        raise UsageError(f"--input {args.input}: got shape {list(array.shape)}, expected [batch, time, features]")
    sequence_id: int | str = int(args.sequence_id) if args.sequence_id.isdigit() else args.sequence_id
    chunks = [{"input": piece} for piece in split_time(array, args.chunk)]
    done = 0
    with InferenceClient(args.url) as client:
        try:
            for outputs in client.stream_sequence(args.model, chunks, sequence_id, args.version):
                _print_outputs(outputs, args.json, {"chunk": done, "steps": chunks[done]["input"].shape[1]})
                done += 1
        except ClientError as exc:
            raise CheckFailed(f"server refused chunk {done}: {exc}") from None
    return 0
