"""Fault injection: misbehaving clients, SIGTERM under load, a model whose run raises; and the server's footprint."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from lstm_onnx.protos import grpc_service_pb2 as pb
from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

from .fuzz import ModelShape, encode
from .soak import Case, check_outputs

ROOT = Path(__file__).resolve().parents[2]
CLIENT_FAULTS = ("cancelled_call", "expired_deadline", "dropped_stream", "never_ended_sequence")


@dataclass
class FaultResult:
    """Faults injected and survived (the server answered the next good request correctly), per kind."""

    injected: dict[str, int] = field(default_factory=dict)
    survived: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)

    def add(self, kind: str, ok: bool, note: str = "") -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1
        self.survived[kind] = self.survived.get(kind, 0) + int(ok)
        if not ok and len(self.samples) < 10:
            self.samples.append(f"{kind}: {note}")


def resident_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc status")


def _sequence_request(shape: ModelShape, chunk: dict, seq_id: str, start: bool, end: bool) -> pb.ModelInferRequest:
    request = encode(shape.name, chunk)
    request.parameters["sequence_id"].string_param = seq_id
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    return request


async def inject_client_faults(url: str, shape: ModelShape, unary: list[Case], sequences: list[Case], count: int,
                               seed: int = 0) -> FaultResult:
    """`count` client faults of every kind in turn, each followed by a good request whose answer is checked."""
    rng = random.Random(seed)
    result = FaultResult()
    ids = itertools.count()
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for i in range(count):
            kind = CLIENT_FAULTS[i % len(CLIENT_FAULTS)]
            case, seq = rng.choice(unary), rng.choice(sequences)
            seq_id = f"fault-{seed}-{next(ids)}"
            if kind == "cancelled_call":
                call = stub.ModelInfer(encode(shape.name, case.chunks[0]), timeout=30)
                await asyncio.sleep(rng.random() * 0.002)
                call.cancel()
            elif kind == "expired_deadline":
                try:
                    await stub.ModelInfer(encode(shape.name, case.chunks[0]), timeout=rng.uniform(1e-4, 2e-3))
                except grpc.RpcError:
                    pass
            elif kind == "dropped_stream":
                call = stub.ModelStreamInfer(timeout=30)
                await call.write(_sequence_request(shape, seq.chunks[0], seq_id, True, False))
                if rng.random() < 0.5:
                    await call.read()
                call.cancel()  # mid-sequence: no sequence_end ever comes
            else:
                await stub.ModelInfer(_sequence_request(shape, seq.chunks[0], seq_id, True, False), timeout=30)
            try:
                response = await stub.ModelInfer(encode(shape.name, case.chunks[0]), timeout=30)
                problem = check_outputs(response, case.expected[0])
            except grpc.RpcError as exc:
                problem = f"{exc.code().name}: {exc.details()}"
            result.add(kind, problem is None, problem or "")
    return result


# --- a model whose onnxruntime run raises for some requests ------------------------------------------------

FRAGILE = "fragile"


def write_fragile_model(repository: Path, max_batch_size: int = 8) -> None:
    """y = GatherElements(x [B, 4], index [B, 1]); an index of 4 or more makes onnxruntime's run raise.

    It batches (config.pbtxt asks for dynamic batching), so a failing request can land in a merged run.
    """
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GatherElements", ["x", "index"], ["y"], axis=1)], FRAGILE,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("index", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    version = repository / FRAGILE / "1"
    version.mkdir(parents=True, exist_ok=True)
    onnx.save(model, version / "model.onnx")
    (repository / FRAGILE / "config.pbtxt").write_text(
        f'name: "{FRAGILE}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "index" data_type: TYPE_INT64 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\n")


def set_sequence_idle(repository: Path, seconds: float) -> None:
    """Give every model whose config.pbtxt has sequence_batching this idle timeout (it wins over the server's)."""
    from google.protobuf import text_format

    from lstm_onnx.protos import model_config_pb2 as mc

    for path in repository.glob("*/config.pbtxt"):
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
        if config.HasField("sequence_batching"):
            config.sequence_batching.max_sequence_idle_microseconds = round(seconds * 1e6)
            path.write_text(text_format.MessageToString(config))


def fragile_request(x: np.ndarray, index: np.ndarray) -> pb.ModelInferRequest:
    return encode(FRAGILE, {"x": x.astype(np.float32), "index": index.astype(np.int64)})


async def run_fragile_model(url: str, rounds: int, good_per_round: int = 6, seed: int = 0) -> FaultResult:
    """Per round, one failing request among good ones sent at once: it must get INTERNAL, they their answers."""
    rng = np.random.default_rng(seed)
    result = FaultResult()
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(rounds):
            xs = [rng.standard_normal((1, 4)).astype(np.float32) for _ in range(good_per_round + 1)]
            idx = [rng.integers(0, 4, (1, 1)) for _ in xs]
            bad = int(rng.integers(0, len(xs)))
            idx[bad] = np.array([[int(rng.integers(4, 1 << 20))]])
            calls = [stub.ModelInfer(fragile_request(x, i), timeout=30) for x, i in zip(xs, idx)]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            ok = True
            for k, outcome in enumerate(outcomes):
                if k == bad:
                    ok &= isinstance(outcome, grpc.RpcError) and outcome.code() == grpc.StatusCode.INTERNAL
                    if not ok:
                        result.samples.append(f"failing request got {outcome!r}")
                elif isinstance(outcome, BaseException):
                    ok = False
                    result.samples.append(f"good request next to a failing one: {outcome.code().name}: "
                                          f"{outcome.details()}")
                else:
                    y = np.frombuffer(outcome.raw_output_contents[0], np.float32)
                    ok &= bool(np.array_equal(y, xs[k][0, idx[k][0]]))
            result.add("failing_model_run", ok)
    return result


# --- the server as a process, and SIGTERM under load ---------------------------------------------------------

class ServerProcess:
    """`lstm-onnx serve` as a child process on a free port; stderr is kept (JSON log lines)."""

    def __init__(self, repository: Path, *flags: str, timeout_s: float = 120):
        command = [sys.executable, "-m", "lstm_onnx", "serve", "--model-repository", str(repository),
                   "--grpc-port", "0", "--metrics-port", "-1", "--http-port", "-1", "--log-format", "json", *flags]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._serving = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self._serving.wait(timeout_s):
            self.process.kill()
            raise RuntimeError("server did not start: " + " | ".join(self.lines[-5:]))

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip())
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("msg") == "serving":
                self.url = event["grpc"]
                self._serving.set()

    def events(self, msg: str) -> list[dict]:
        found = []
        for line in self.lines:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("msg") == msg:
                found.append(event)
        return found

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@dataclass
class DrainResult:
    """Outcomes of requests sent around a SIGTERM: answered right, refused cleanly, or cut (lost)."""

    answered: int = 0
    wrong: int = 0
    refused: int = 0
    cut: int = 0
    status_lost: int = 0  # stream writes that raced the server's UNAVAILABLE: grpc.aio reports INTERNAL instead
    exit_code: int | None = None
    samples: list[str] = field(default_factory=list)


# Refusals a client can act on: the server said it is draining, or there was no server to connect to.
_CLEAN_REFUSALS = ("shutting down", "failed to connect", "connection refused", "connect failed")


# grpc.aio's client overwrites the status a server sent with this when the client's next stream write races the
# server's end of the call (grpc/grpc#36066; fix open as #43486). Our server never says it: gRPC core's text.
_STATUS_LOST = "Internal error from Core"


def _classify(exc: grpc.RpcError, result: DrainResult, where: str) -> None:
    details = (exc.details() or "").lower()
    if exc.code() == grpc.StatusCode.UNAVAILABLE and any(words in details for words in _CLEAN_REFUSALS):
        result.refused += 1
    elif where.startswith("stream") and exc.code() == grpc.StatusCode.INTERNAL and exc.details() == _STATUS_LOST:
        result.status_lost += 1
    else:
        result.cut += 1
        if len(result.samples) < 10:
            result.samples.append(f"{where}: {exc.code().name}: {exc.details()}")


async def sigterm_under_load(server: ServerProcess, shape: ModelShape, unary: list[Case], sequences: list[Case],
                             clients: int, term_after_s: float, seed: int = 0) -> DrainResult:
    """Load from `clients` coroutines (a third streaming); SIGTERM after `term_after_s`; each keeps sending until
    its request is refused, so the run sees requests in flight, queued and new at the moment of the signal."""
    result = DrainResult()
    stop = asyncio.Event()

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with grpc.aio.insecure_channel(server.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            n = 0
            while True:
                n += 1
                if i % 3 == 0:
                    case = rng.choice(sequences)
                    done = await _drain_sequence(stub, shape, case, f"drain-{i}-{n}", result)
                else:
                    case = rng.choice(unary)
                    try:
                        response = await stub.ModelInfer(encode(shape.name, case.chunks[0]), timeout=30)
                        result.answered += 1
                        result.wrong += check_outputs(response, case.expected[0]) is not None
                        done = False
                    except grpc.RpcError as exc:
                        _classify(exc, result, "unary")
                        done = True
                if done and stop.is_set():
                    return

    async def terminate() -> None:
        await asyncio.sleep(term_after_s)
        server.process.send_signal(signal.SIGTERM)
        stop.set()

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await terminate()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    result.exit_code = await asyncio.get_running_loop().run_in_executor(None, server.process.wait, 60)
    return result


async def _drain_sequence(stub, shape: ModelShape, case: Case, seq_id: str, result: DrainResult) -> bool:
    """One streamed sequence; True once the server refused something (so the client may stop)."""
    last = len(case.chunks) - 1
    requests = [_sequence_request(shape, chunk, seq_id, i == 0, i == last) for i, chunk in enumerate(case.chunks)]
    answered = 0
    refused = False
    try:
        async for response in stub.ModelStreamInfer(iter(requests), timeout=30):
            if response.error_message:
                if "shutting down" in response.error_message:
                    result.refused += 1
                    refused = True
                else:
                    result.cut += 1
                    result.samples.append(f"stream: {response.error_message}")
            else:
                result.answered += 1
                result.wrong += check_outputs(response.infer_response, case.expected[answered]) is not None
            answered += 1
    except grpc.RpcError as exc:
        if answered == 0:
            _classify(exc, result, "stream, before any answer")  # the stream was never accepted
        else:  # requests written to an accepted stream that never got an answer
            for _ in range(len(requests) - answered):
                _classify(exc, result, f"stream, after {answered} of {len(requests)} answers")
        refused = True
    return refused
