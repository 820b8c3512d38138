"""Subcommands `infer`, `stream` and `bench`: parsers here, grpc and numpy imported inside the handlers."""
from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    """Add infer, stream and bench to the `lstm-onnx` dispatcher."""
    infer = sub.add_parser("infer", help=cmd_infer.__doc__.splitlines()[0], description=cmd_infer.__doc__)
    _add_client_flags(infer)
    source = infer.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="the 'input' tensor as a .npy file, batch-major [B, T, F]")
    source.add_argument("--random", metavar="B,T", help="random inputs of batch B and time T from the model's metadata")
    infer.add_argument("--json", action="store_true", help="print outputs as one JSON object instead of text")
    infer.add_argument("--show-state", action="store_true", help="also print the recurrent state outputs (hn, cn)")
    infer.set_defaults(func=cmd_infer)

    stream = sub.add_parser("stream", help=cmd_stream.__doc__.splitlines()[0], description=cmd_stream.__doc__)
    _add_client_flags(stream)
    stream.add_argument("--input", required=True, help="the whole sequence as a .npy file [B, T, F]")
    stream.add_argument("--chunk", type=int, required=True, help="time steps per request")
    stream.add_argument("--sequence-id", default="1", help="sequence id (an integer, or any string)")
    stream.add_argument("--json", action="store_true", help="print one JSON object per chunk")
    stream.add_argument("--show-state", action="store_true", help="also print each chunk's recurrent state (hn, cn)")
    stream.set_defaults(func=cmd_stream)

    _add_bench(sub)


DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                        help="KServe v2 over gRPC (default) or over HTTP/REST with binary tensors")
    parser.add_argument("--url", default=None, help="server address HOST:PORT (default 127.0.0.1:8001 for gRPC, "
                        "127.0.0.1:8000 for HTTP)")
    parser.add_argument("--model", required=True, help="model name in the repository")
    parser.add_argument("--version", default="", help="model version (default: the latest ready one)")


def _print_outputs(outputs: dict, as_json: bool, extra: dict | None = None, task: str | None = None,
                   show_state: bool = False) -> None:
    import json

    import numpy as np

    if as_json:
        print(json.dumps({**(extra or {}), "outputs": {k: {"shape": list(v.shape), "datatype": str(v.dtype),
                                                            "data": v.tolist()} for k, v in outputs.items()}}))
        return
    prefix = " ".join(f"{k} {v}" for k, v in (extra or {}).items())
    hidden: list[str] = []
    for name, value in outputs.items():
        if name == "output" and task in ("classification", "regression") and value.ndim == 2:
            for row, line in enumerate(describe_rows(value, task)):
                print(f"{prefix + ': ' if prefix else ''}row {row}: {line}")
        elif show_state or name in ("output",):
            with np.printoptions(precision=5, suppress=True, threshold=64):
                print(f"{prefix + ' ' if prefix else ''}{name} {list(value.shape)} {value.dtype}:\n{value}")
        else:
            hidden.append(f"{name} {list(value.shape)}")
    if hidden and not extra:
        print(f"(recurrent state {', '.join(hidden)} not shown: --show-state prints it, --json prints everything)")


def describe_rows(output, task: str) -> list[str]:
    """One line per batch row: the predicted class with its softmax probability, or the regression values."""
    import numpy as np

    if task == "regression":
        return ["value " + ", ".join(f"{v:.5g}" for v in row) for row in output]
    shifted = output - output.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    return [f"class {int(p.argmax())}, probability {float(p.max()):.3f} (softmax over {len(p)} logits)" for p in probs]


def _load_npy(path: str):
    import numpy as np

    from lstm_onnx.errors import UsageError

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--input {path}: {exc}") from None


def _open_client(args: argparse.Namespace):
    """The blocking client of the chosen protocol (both have the same methods)."""
    url = args.url or DEFAULT_URLS[args.protocol]
    if args.protocol == "http":
        from .http_client import HttpInferenceClient

        return HttpInferenceClient(url)
    from .client import InferenceClient

    return InferenceClient(url)


def cmd_infer(args: argparse.Namespace) -> int:
    """Send one inference request (omitted h0/c0 are zeros on the server) and print the outputs."""
    from lstm_onnx.errors import CheckFailed, UsageError

    from .client import ClientError, random_inputs

    with _open_client(args) as client:
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
            task = None if args.json else client.task(args.model)
        except ClientError as exc:
            raise CheckFailed(f"server refused the request: {exc}") from None
    _print_outputs(outputs, args.json, task=task, show_state=args.show_state)
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    """Stream one sequence in chunks over ModelStreamInfer, or successive REST requests with --protocol http (the
    server carries hn/cn), and print each chunk's outputs."""
    from lstm_onnx.errors import CheckFailed, UsageError

    from .client import ClientError, split_time

    if args.chunk < 1:
        raise UsageError(f"--chunk: got {args.chunk}, expected at least 1")
    array = _load_npy(args.input)
    if array.ndim != 3:
        raise UsageError(f"--input {args.input}: got shape {list(array.shape)}, expected [batch, time, features]")
    sequence_id: int | str = int(args.sequence_id) if args.sequence_id.isdigit() else args.sequence_id
    chunks = [{"input": piece} for piece in split_time(array, args.chunk)]
    done = 0
    last: dict = {}
    with _open_client(args) as client:
        try:
            task = None if args.json else client.task(args.model)
            for outputs in client.stream_sequence(args.model, chunks, sequence_id, args.version):
                _print_outputs(outputs, args.json, {"chunk": done, "steps": chunks[done]["input"].shape[1]}, task,
                               args.show_state)
                done += 1
                last = outputs
            # The point of carrying state: the last chunk's answer is the whole sequence's answer. Show it.
            whole = client.infer(args.model, {"input": array}, args.version) if not args.json else None
        except ClientError as exc:
            raise CheckFailed(f"server refused chunk {done}: {exc}") from None
    if whole is not None:
        import numpy as np

        diffs = ", ".join(f"{name} {float(np.max(np.abs(last[name] - whole[name]))):.2g}" for name in last if name in whole)
        print(f"streamed in {len(chunks)} chunks vs the whole sequence in one request: max |difference| {diffs}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help=cmd_bench.__doc__.splitlines()[0], description=cmd_bench.__doc__)
    bench.add_argument("--protocol", default="grpc", help="grpc, http, or both as grpc,http (each level is run "
                       "over each, and every row says which)")
    bench.add_argument("--url", default=DEFAULT_URLS["grpc"], help="gRPC address HOST:PORT (default 127.0.0.1:8001, "
                       "loopback)")
    bench.add_argument("--http-url", default=DEFAULT_URLS["http"], help="REST address HOST:PORT (default "
                       "127.0.0.1:8000)")
    bench.add_argument("--http-tensors", choices=("binary", "json"), default="binary", help="REST tensors as "
                       "Triton's binary extension (default) or JSON data")
    bench.add_argument("--model", required=True, help="model name in the server's repository")
    bench.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    bench.add_argument("--time", default="50", help="time steps per request, or LO:HI for a mixed-length load "
                       "(default 50); with --stream, the length of each streamed sequence")
    bench.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels of concurrent "
                       "closed-loop clients (default 1,4,16,64)")
    bench.add_argument("--requests", type=int, default=2000, help="most measured requests per level (default 2000)")
    bench.add_argument("--seconds", type=float, default=5.0, help="most seconds per level (default 5)")
    bench.add_argument("--stream", action="store_true", help="send one time step per request on ModelStreamInfer "
                       "sequences (one stream per client) instead of unary ModelInfer")
    bench.add_argument("--check-every", type=int, default=64, help="check one answer in this many against "
                       "in-process onnxruntime (default 64)")
    bench.add_argument("--model-repository", default=os.environ.get("LSTM_ONNX_MODEL_REPOSITORY", ""),
                       help="the server's repository, read locally for the answer check (env "
                       "LSTM_ONNX_MODEL_REPOSITORY); without it answers are not checked")
    bench.add_argument("--json", action="store_true", help="print one JSON object per level")
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure requests/s and p50/p90/p99 latency per concurrency level, count errors, and check sampled answers."""
    import asyncio
    import json
    from pathlib import Path

    from lstm_onnx.errors import CheckFailed, UsageError

    from . import loadgen

    try:
        levels = loadgen.parse_levels(args.concurrency)
        times = loadgen.parse_times(args.time)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for flag, value in (("--batch", args.batch), ("--requests", args.requests), ("--check-every", args.check_every)):
        if value < 1:
            raise UsageError(f"{flag}: got {value}, expected at least 1")
    if args.seconds <= 0:
        raise UsageError(f"--seconds: got {args.seconds}, expected more than 0")
    if args.stream and len(times) > 1:
        raise UsageError(f"--time: got {args.time!r} with --stream, expected one sequence length")
    protocols = [p.strip() for p in args.protocol.split(",") if p.strip()]
    if not protocols or set(protocols) - {"grpc", "http"}:
        raise UsageError(f"--protocol: got {args.protocol!r}, expected grpc, http, or grpc,http")
    if args.stream and "http" in protocols:
        raise UsageError("--stream: REST has no stream, expected --protocol grpc")
    model_path = None
    if args.model_repository:
        model_path = _latest_model(Path(args.model_repository), args.model)

    results = []
    for protocol in protocols:
        bench = _bench if protocol == "grpc" else _bench_http
        results += asyncio.run(bench(args, levels, times, model_path))
    if not args.json:
        print(f"{'protocol':<11} {'conc':>5} {'req':>7} {'err':>4} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} checked")
    bad = 0
    for r in results:
        bad += r.errors + r.mismatches
        if args.json:
            print(json.dumps(r.as_dict()))
        else:
            check = f"{r.checked - r.mismatches}/{r.checked} ok" if model_path else "skipped"
            print(f"{r.protocol:<11} {r.concurrency:>5} {r.requests:>7} {r.errors:>4} {r.rps:>9.1f} {r.p50_ms:>8.3f} {r.p90_ms:>8.3f} "
                  f"{r.p99_ms:>8.3f} {check}")
    failed = [r for r in results if r.errors or r.mismatches]
    if failed:
        r = failed[0]
        raise CheckFailed(f"{r.protocol} concurrency {r.concurrency}: {r.errors} errors ({r.first_error or 'none'}), "
                          f"{r.mismatches} of {r.checked} checked answers differ from onnxruntime "
                          f"(worst |diff| {r.worst_abs:.3g})")
    return 0


def _latest_model(repository, model: str):
    from lstm_onnx.errors import UsageError

    versions = sorted((int(p.name) for p in (repository / model).glob("*") if p.name.isdigit()), reverse=True)
    for version in versions:
        path = repository / model / str(version) / "model.onnx"
        if path.exists():
            return path
    raise UsageError(f"--model-repository {repository}: no {model}/<version>/model.onnx, expected the server's "
                     "repository")


async def _bench(args, levels: list[int], times: list[int], model_path):
    from lstm_onnx.errors import CheckFailed

    from . import loadgen

    async with loadgen.open_channel(args.url) as channel:
        try:
            metadata, optional = await loadgen.fetch_inputs_spec(channel, args.model)
        except Exception as exc:  # grpc errors: server down, unknown model
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise CheckFailed(f"{args.url}: cannot read model '{args.model}': {detail}") from None
        if args.stream:
            payloads = loadgen.make_stream_payloads(args.model, metadata, optional, args.batch, times[0], max(levels))
        else:
            payloads = loadgen.make_payloads(args.model, metadata, optional, args.batch, times)
        results = []
        for level in levels:
            result, samples = await loadgen.run_level(channel, payloads, level, args.requests, args.seconds,
                                                      stream=args.stream, check_every=args.check_every)
            if model_path is not None:
                loadgen.check_answers(result, samples, [p.inputs for p in payloads], model_path)
            results.append(result)
        return results


async def _bench_http(args, levels: list[int], times: list[int], model_path):
    from lstm_onnx.errors import CheckFailed

    from . import http_loadgen, loadgen

    binary = args.http_tensors == "binary"
    async with http_loadgen.open_session(max(levels)) as session:
        try:
            metadata, optional = await http_loadgen.fetch_inputs_spec(session, args.http_url, args.model)
        except Exception as exc:  # server down, unknown model
            raise CheckFailed(f"{args.http_url}: cannot read model '{args.model}': {exc}") from None
        payloads = http_loadgen.make_payloads(metadata, optional, args.batch, times, binary)
        results = []
        for level in levels:
            result, samples = await http_loadgen.run_level(session, args.http_url, args.model, payloads, level,
                                                           args.requests, args.seconds, check_every=args.check_every)
            result.protocol = f"http-{args.http_tensors}"
            if model_path is not None:
                loadgen.check_answers(result, samples, [p.inputs for p in payloads], model_path)
            results.append(result)
        return results
