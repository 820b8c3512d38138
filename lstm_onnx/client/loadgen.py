"""Load generator for any KServe v2 gRPC server: bounded closed-loop load per concurrency level, latency
percentiles, errors, and a check of sampled answers against in-process onnxruntime.

The client is kept cheap so that it does not starve a server sharing the machine: requests are encoded
once and sent as raw bytes (no protobuf work per call), all workers share one event loop and one channel,
and only sampled answers are decoded.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from lstm_onnx.protocol import codec
from lstm_onnx.protocol.codec import SequenceControl
from lstm_onnx.protos import grpc_service_pb2 as pb

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
MESSAGE_BYTES = 64 * 1024 * 1024
CHECK_ATOL = 1e-4


@dataclass
class Payload:
    """One pre-encoded request: its inputs (for the check) and its wire bytes."""

    inputs: dict[str, np.ndarray]
    wire: bytes


@dataclass
class StreamPayload:
    """One sequence fed one time step per request: the wire bytes of every step and the whole input."""

    inputs: dict[str, np.ndarray]  # the whole sequence, [B, T, F]
    steps: list[bytes]


@dataclass
class LevelResult:
    """What one concurrency level measured."""

    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    checked: int = 0
    mismatches: int = 0
    first_error: str = ""
    worst_abs: float = 0.0
    protocol: str = "grpc"  # grpc, or http (with binary or json tensors: "http-binary", "http-json")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Run:
    """Shared by the workers of one level (one event loop, so no locks)."""

    max_requests: int
    deadline: float
    warmup: int
    check_every: int
    issued: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    samples: list[tuple[int, bytes]] = field(default_factory=list)

    def take(self) -> int | None:
        """The index of the next request, or None once the request or time budget is spent."""
        if self.issued >= self.max_requests + self.warmup or time.perf_counter() >= self.deadline:
            return None
        self.issued += 1
        return self.issued - 1

    def record(self, index: int, latency_ns: int) -> None:
        if index >= self.warmup:
            self.latencies_ns.append(latency_ns)

    def fail(self, message: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or message.splitlines()[0][:300]


def open_channel(url: str, own_connection: bool = False) -> grpc.aio.Channel:
    """An insecure aio channel with a large message limit (the server's default is 64 MiB too).

    `own_connection` gives the channel a connection of its own (gRPC otherwise shares one between channels with
    equal arguments), so that several channels reach several `--workers` processes.
    """
    options = [("grpc.max_send_message_length", MESSAGE_BYTES), ("grpc.max_receive_message_length", MESSAGE_BYTES)]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.aio.insecure_channel(url, options=options)


async def fetch_inputs_spec(channel: grpc.aio.Channel, model: str) -> tuple[pb.ModelMetadataResponse, set[str]]:
    """The model's metadata and the inputs the server fills itself (recurrent state)."""
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    from .client import server_filled_inputs

    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=30)
    try:
        config = (await stub.ModelConfig(pb.ModelConfigRequest(name=model), timeout=30)).config
        optional = server_filled_inputs(config)
    except grpc.aio.AioRpcError:  # a server without the model_configuration extension: send every input
        optional = set()
    return metadata, optional


def make_payloads(model: str, metadata: pb.ModelMetadataResponse, optional: set[str], batch: int,
                  times: list[int], seed: int = 0) -> list[Payload]:
    """One encoded request per entry of `times` (its time length), random inputs, state left to the server."""
    from .client import random_inputs

    payloads = []
    for i, steps in enumerate(times):
        inputs = random_inputs(metadata, batch, steps, seed=seed + i, skip=optional)
        payloads.append(Payload(inputs, codec.encode_request(model, inputs).SerializeToString()))
    return payloads


def make_stream_payloads(model: str, metadata: pb.ModelMetadataResponse, optional: set[str], batch: int,
                         steps: int, workers: int, seed: int = 0) -> list[StreamPayload]:
    """Per worker, one sequence of `steps` requests of one time step each (start on the first, end on the last)."""
    from .client import random_inputs

    payloads = []
    for worker in range(workers):
        inputs = random_inputs(metadata, batch, steps, seed=seed + worker, skip=optional)
        wire = []
        for t in range(steps):
            control = SequenceControl(worker + 1, start=t == 0, end=t == steps - 1)
            step = {k: (v[:, t:t + 1] if k == "input" else v) for k, v in inputs.items()}
            wire.append(codec.encode_request(model, step, sequence=control).SerializeToString())
        payloads.append(StreamPayload(inputs, wire))
    return payloads


async def _unary_worker(call, run: _Run, payloads: list[Payload], offset: int) -> None:
    while (index := run.take()) is not None:
        payload_index = (offset + index) % len(payloads)
        start = time.perf_counter_ns()
        try:
            answer = await call(payloads[payload_index].wire, timeout=60)
        except grpc.aio.AioRpcError as exc:
            run.fail(f"{exc.code().name}: {exc.details()}")
            continue
        run.record(index, time.perf_counter_ns() - start)
        if index % run.check_every == 0:
            run.samples.append((payload_index, answer))


async def _stream_worker(call, run: _Run, payload: StreamPayload, worker: int) -> None:
    stream = call(timeout=3600)
    step = 0
    try:
        while (index := run.take()) is not None or step % len(payload.steps):
            # A started sequence always runs to its end so that the server does not keep its state.
            start = time.perf_counter_ns()
            await stream.write(payload.steps[step % len(payload.steps)])
            answer = await stream.read()
            if answer is grpc.aio.EOF:
                run.fail("stream closed by the server")
                return
            message = pb.ModelStreamInferResponse.FromString(answer)
            if message.error_message:
                run.fail(message.error_message)
            elif index is not None:
                run.record(index, time.perf_counter_ns() - start)
            last = step % len(payload.steps) == len(payload.steps) - 1
            if last and not message.error_message and (step // len(payload.steps)) % run.check_every == 0:
                run.samples.append((worker, message.infer_response.SerializeToString()))
            step += 1
        await stream.done_writing()
    except grpc.aio.AioRpcError as exc:
        run.fail(f"{exc.code().name}: {exc.details()}")


async def run_level(channel: grpc.aio.Channel | list[grpc.aio.Channel], payloads: list[Payload] | list[StreamPayload], concurrency: int,
                    max_requests: int, max_seconds: float, stream: bool = False, check_every: int = 64,
                    warmup: int | None = None) -> tuple[LevelResult, list[tuple[int, bytes]]]:
    """Run `concurrency` closed-loop workers until `max_requests` answers or `max_seconds`; return the figures
    and the sampled raw answers (payload index or worker, response bytes) for `check_answers`. A list of
    channels spreads the workers over them round-robin."""
    warmup = concurrency * 2 if warmup is None else warmup
    run = _Run(max_requests, time.perf_counter() + max_seconds, warmup, max(1, check_every))
    channels = channel if isinstance(channel, list) else [channel]
    if stream:
        calls = [c.stream_stream(STREAM_METHOD) for c in channels]
        workers = [_stream_worker(calls[w % len(calls)], run, payloads[w % len(payloads)], w % len(payloads))
                   for w in range(concurrency)]
    else:
        calls = [c.unary_unary(INFER_METHOD) for c in channels]
        workers = [_unary_worker(calls[w % len(calls)], run, payloads, w) for w in range(concurrency)]
    started = time.perf_counter()
    await asyncio.gather(*workers)
    seconds = time.perf_counter() - started
    return level_result(run, concurrency, seconds), run.samples


def level_result(run: "_Run", concurrency: int, seconds: float) -> LevelResult:
    """A level's figures from its run (both transports): latency percentiles and answered per second."""
    lat = np.asarray(run.latencies_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = (float(np.percentile(lat, q)) if lat.size else float("nan") for q in (50, 90, 99))
    # Throughput counts every answer, warm-up included, over the whole level: the wall clock the user waited.
    answered = run.issued - run.errors
    return LevelResult(concurrency, int(lat.size), run.errors, round(seconds, 3),
                       answered / seconds if seconds > 0 else 0.0, p50, p90, p99, first_error=run.first_error)


def reference_outputs(model_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of the model run in this process by onnxruntime, zeros for omitted state inputs."""
    session = _session(str(model_path))
    feed = dict(inputs)
    batch = inputs["input"].shape[0] if "input" in inputs else 1
    for arg in session.get_inputs():
        if arg.name not in feed:
            feed[arg.name] = np.zeros([batch if i == 0 else d for i, d in enumerate(arg.shape)], np.float32)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


_SESSIONS: dict[str, object] = {}


def _session(path: str):
    import onnxruntime as ort

    if path not in _SESSIONS:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        _SESSIONS[path] = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    return _SESSIONS[path]


def check_answers(result: LevelResult, samples: list[tuple[int, bytes | dict]], inputs: list[dict[str, np.ndarray]],
                  model_path: Path, atol: float = CHECK_ATOL) -> None:
    """Compare sampled answers with in-process onnxruntime on the same inputs; fills checked/mismatches/worst."""
    expected: dict[int, dict[str, np.ndarray]] = {}
    for index, raw in samples:
        if index not in expected:
            expected[index] = reference_outputs(model_path, inputs[index])
        # gRPC samples are raw response bytes; REST ones (http_loadgen) come decoded already
        got = raw if isinstance(raw, dict) else codec.decode_response(pb.ModelInferResponse.FromString(raw))
        result.checked += 1
        worst = 0.0
        for name, want in expected[index].items():
            if name not in got or got[name].shape != want.shape:
                worst = float("inf")
                break
            worst = max(worst, float(np.max(np.abs(got[name] - want))) if want.size else 0.0)
        result.worst_abs = max(result.worst_abs, worst)
        result.mismatches += int(not worst <= atol)


def parse_levels(text: str) -> list[int]:
    """'1,4,16,64' -> [1, 4, 16, 64]; ValueError naming what was wrong."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--concurrency: got {text!r}, expected comma-separated integers such as 1,4,16,64") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency: got {text!r}, expected integers of at least 1")
    return levels


def parse_times(text: str, count: int = 16) -> list[int]:
    """'50' -> [50]; 'LO:HI' -> `count` lengths spread evenly from LO to HI (a ragged, mixed-length load)."""
    try:
        if ":" in text:
            low, high = (int(v) for v in text.split(":"))
            times = sorted({int(round(v)) for v in np.linspace(low, high, count)})
        else:
            times = [int(text)]
    except ValueError:
        raise ValueError(f"--time: got {text!r}, expected steps T such as 50, or a range LO:HI such as 10:50") from None
    if min(times) < 1:
        raise ValueError(f"--time: got {text!r}, expected at least 1 step")
    return times
