"""The soak: many concurrent clients, unary and streamed sequences mixed, every answer checked against onnxruntime."""
from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from lstm_onnx.protos import grpc_service_pb2 as pb
from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

from .fuzz import ModelShape, encode, reference_outputs

ATOL = 1e-5


@dataclass
class Case:
    """A unary request or the chunks of one sequence, with the outputs each chunk must get."""

    chunks: list[dict[str, np.ndarray]]
    expected: list[dict[str, np.ndarray]]


@dataclass
class LoadResult:
    """What a load run saw from the client side."""

    sent: int = 0
    answered: int = 0
    errors: int = 0
    wrong: int = 0
    seconds: float = 0.0
    samples: list[str] = field(default_factory=list)  # the first few errors and wrong answers, for the report

    def note(self, line: str) -> None:
        if len(self.samples) < 10:
            self.samples.append(line)


def build_cases(model_path: Path, shape: ModelShape, count: int, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """`count` unary cases and `count` sequences (2..4 chunks), with expected outputs from in-process onnxruntime.

    A chunk's expected output is the whole-prefix run: the server carries hn/cn, so chunk k must answer
    exactly what the sequence up to chunk k gives in one piece.
    """
    rng = np.random.default_rng(seed)
    unary, sequences = [], []
    for _ in range(count):
        x = rng.standard_normal((int(rng.integers(1, 4)), int(rng.integers(1, 9)), shape.features)).astype(np.float32)
        unary.append(Case([{"input": x}], [reference_outputs(model_path, {"input": x}, shape)]))
        x = rng.standard_normal((1, int(rng.integers(4, 13)), shape.features)).astype(np.float32)
        cuts = sorted(set(rng.choice(np.arange(1, x.shape[1]), size=int(rng.integers(1, 4)), replace=False)))
        bounds = [0, *cuts, x.shape[1]]
        chunks = [{"input": x[:, a:b]} for a, b in itertools.pairwise(bounds)]
        expected = [reference_outputs(model_path, {"input": x[:, :b]}, shape) for b in bounds[1:]]
        sequences.append(Case(chunks, expected))
    return unary, sequences


def check_outputs(response: pb.ModelInferResponse, want: dict[str, np.ndarray]) -> str | None:
    """None when the response holds exactly the expected outputs (to ATOL), else what differs."""
    got = {}
    for i, tensor in enumerate(response.outputs):
        got[tensor.name] = np.frombuffer(response.raw_output_contents[i], np.float32).reshape(list(tensor.shape))
    if sorted(got) != sorted(want):
        return f"outputs {sorted(got)}, expected {sorted(want)}"
    for name, array in want.items():
        if got[name].shape != array.shape or not np.allclose(got[name], array, atol=ATOL, equal_nan=True):
            return f"output {name!r} differs from in-process onnxruntime"
    return None


class SoakClients:
    """`clients` coroutines over a few channels, sending until `requests` are sent or `time_limit_s` passes."""

    def __init__(self, url: str, shape: ModelShape, unary: list[Case], sequences: list[Case],
                 stream_share: float = 0.3, channels: int = 4, credentials: grpc.ChannelCredentials | None = None):
        self.url, self.shape = url, shape
        self.unary, self.sequences = unary, sequences
        self.stream_share = stream_share
        self.channels = channels
        self.credentials = credentials
        self._ids = itertools.count(1)

    async def run(self, clients: int, requests: int, time_limit_s: float, seed: int = 0) -> LoadResult:
        result = LoadResult()
        options = [("grpc.max_receive_message_length", self.shape.max_message_bytes),
                   ("grpc.max_send_message_length", self.shape.max_message_bytes)]
        if self.credentials is None:
            channels = [grpc.aio.insecure_channel(self.url, options=options) for _ in range(self.channels)]
        else:
            channels = [grpc.aio.secure_channel(self.url, self.credentials, options=options)
                        for _ in range(self.channels)]
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
        deadline = time.monotonic() + time_limit_s
        started = time.perf_counter()
        try:
            await asyncio.gather(*(self._client(stubs[i % len(stubs)], random.Random(seed * 1000 + i), result,
                                                requests, deadline) for i in range(clients)))
        finally:
            for channel in channels:
                await channel.close()
        result.seconds = time.perf_counter() - started
        return result

    async def _client(self, stub, rng: random.Random, result: LoadResult, requests: int, deadline: float) -> None:
        while result.sent < requests and time.monotonic() < deadline:
            if rng.random() < self.stream_share:
                await self._sequence(stub, rng.choice(self.sequences), result, requests)
            else:
                await self._unary(stub, rng.choice(self.unary), result)

    async def _unary(self, stub, case: Case, result: LoadResult) -> None:
        result.sent += 1
        try:
            response = await stub.ModelInfer(encode(self.shape.name, case.chunks[0]), timeout=60)
        except grpc.RpcError as exc:
            result.errors += 1
            result.note(f"unary: {exc.code().name}: {exc.details()}")
            return
        result.answered += 1
        problem = check_outputs(response, case.expected[0])
        if problem:
            result.wrong += 1
            result.note(f"unary: {problem}")

    async def _sequence(self, stub, case: Case, result: LoadResult, requests: int) -> None:
        seq_id = f"soak-{next(self._ids)}"
        last = len(case.chunks) - 1

        def requests_of():
            for i, chunk in enumerate(case.chunks):
                request = encode(self.shape.name, chunk)
                request.parameters["sequence_id"].string_param = seq_id
                request.parameters["sequence_start"].bool_param = i == 0
                request.parameters["sequence_end"].bool_param = i == last
                result.sent += 1
                yield request

        answered = 0
        try:
            async for response in stub.ModelStreamInfer(requests_of(), timeout=60):
                want = case.expected[answered]
                answered += 1
                if response.error_message:
                    result.errors += 1
                    result.note(f"stream {seq_id} chunk {answered - 1}: {response.error_message}")
                    continue
                result.answered += 1
                problem = check_outputs(response.infer_response, want)
                if problem:
                    result.wrong += 1
                    result.note(f"stream {seq_id} chunk {answered - 1}: {problem}")
        except grpc.RpcError as exc:
            result.errors += len(case.chunks) - answered
            result.note(f"stream {seq_id}: {exc.code().name}: {exc.details()}")
