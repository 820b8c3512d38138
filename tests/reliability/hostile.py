"""The hostile mix: protocol-abiding clients that try to take the memory, the model or the slots of everyone
else, beside the soak, against one `lstm-onnx serve` process whose repository also holds hostile entries.

- long T: a client sending [1, LONG_T, F] back to back, and now and then one whose run cannot fit the budget;
- padding amplification: one long request merged with 31 short ones, in bursts;
- slot hoarding: a client (REST, from another loopback address) starting sequences until it is refused;
- idle streams: streams that open and send nothing;
- hostile repository entries: a FIFO as model.onnx, invalid UTF-8 in config.pbtxt, max_batch_size 2^31-1.

The soak's answers are all checked against in-process onnxruntime; the server's RSS is sampled throughout.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import numpy as np

from lstm_onnx.protos import grpc_service_pb2 as pb
from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

from .faults import ServerProcess, resident_bytes
from .fuzz import ModelShape, encode
from .soak import Case, SoakClients

LONG_T = 100_000
TOO_LONG_T = 2_000_000
HOARDER_ADDRESS = "127.0.0.2"  # another loopback address: another client to the server's per-client shares


@dataclass
class HostileResult:
    soak_sent: int = 0
    soak_errors: int = 0
    soak_wrong: int = 0
    long_answered: int = 0
    long_wrong: int = 0
    too_long_refused: int = 0
    too_long_other: list[str] = field(default_factory=list)
    bursts: int = 0
    burst_wrong: int = 0
    hoarder_started: int = 0
    hoarder_refusal: str = ""
    idle_streams: int = 0
    idle_streams_ended: int = 0
    hostile_entries_refused: list[str] = field(default_factory=list)
    rss_baseline: int = 0
    rss_peak: int = 0
    samples: list[str] = field(default_factory=list)


def add_hostile_entries(repo: Path, model: str) -> list[str]:
    """Beside the good models: entries that once hung or ended the server. Returns their names."""
    fifo = repo / "hostile_fifo" / "1"
    fifo.mkdir(parents=True)
    os.mkfifo(fifo / "model.onnx")
    utf8 = repo / "hostile_config_utf8"
    shutil.copytree(repo / model, utf8)
    (utf8 / "config.pbtxt").write_bytes(b'name: "hostile_config_utf8"\nplatform: "onnxruntime_onnx"\n# \xe9\xff\n')
    huge = repo / "hostile_batch"
    shutil.copytree(repo / model, huge)
    text = (huge / "config.pbtxt").read_text().replace(f'name: "{model}"', 'name: "hostile_batch"')
    import re

    (huge / "config.pbtxt").write_text(re.sub(r"max_batch_size: \d+", "max_batch_size: 2147483647", text))
    return ["hostile_fifo", "hostile_config_utf8", "hostile_batch"]


def _request(model: str, x: np.ndarray) -> pb.ModelInferRequest:
    return encode(model, {"input": x})


def _outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {t.name: np.frombuffer(response.raw_output_contents[i], np.float32).reshape(list(t.shape))
            for i, t in enumerate(response.outputs)}


async def run_hostile_mix(server: ServerProcess, http_url: str, shape: ModelShape, unary: list[Case],
                          sequences: list[Case], reference, clients: int, requests: int, entries: list[str],
                          seconds_limit: float = 900) -> HostileResult:
    """The soak with the hostile clients running beside it until the soak is done; then the checks."""
    # The baseline: the server under the soak alone (its clients' buffers and sequences), before anyone hostile.
    warm = await SoakClients(server.url, shape, unary, sequences, stream_share=0.3).run(
        clients, min(2000, requests), time_limit_s=seconds_limit, seed=20)
    result = HostileResult(rss_baseline=resident_bytes(server.process.pid))
    result.samples += warm.samples[:2]
    done = asyncio.Event()
    peak = [result.rss_baseline]
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            try:
                peak[0] = max(peak[0], resident_bytes(server.process.pid))
            except (OSError, RuntimeError):
                return
            stop_sampling.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    rng = np.random.default_rng(7)
    long_x = rng.standard_normal((1, LONG_T, shape.features)).astype(np.float32)
    long_want = reference(long_x)
    short_x = [rng.standard_normal((1, 10, shape.features)).astype(np.float32) for _ in range(31)]
    short_want = [reference(x) for x in short_x]

    async with grpc.aio.insecure_channel(server.url, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def long_client() -> None:
            n = 0
            while not done.is_set():
                n += 1
                if n % 5 == 0:  # one whose run alone is above the budget: refused before it queues
                    x = np.zeros((1, TOO_LONG_T, shape.features), np.float32)
                    try:
                        await stub.ModelInfer(_request(shape.name, x), timeout=120)
                        result.too_long_other.append("answered")
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-run-memory-bytes" in (
                                exc.details() or ""):
                            result.too_long_refused += 1
                        else:
                            result.too_long_other.append(f"{exc.code().name}: {(exc.details() or '')[:120]}")
                    continue
                response = await stub.ModelInfer(_request(shape.name, long_x), timeout=300)
                result.long_answered += 1
                got = _outputs(response)
                result.long_wrong += any(not np.allclose(got[k], v, atol=1e-4) for k, v in long_want.items())

        async def burst_client() -> None:
            while not done.is_set():
                calls = [stub.ModelInfer(_request(shape.name, long_x), timeout=300)]
                await asyncio.sleep(0.005)  # the long one first, so the short ones arrive while it runs
                calls += [stub.ModelInfer(_request(shape.name, x), timeout=300) for x in short_x]
                answers = await asyncio.gather(*calls)
                result.bursts += 1
                for got, want in zip(answers[1:], short_want):
                    result.burst_wrong += any(not np.allclose(_outputs(got)[k], v, atol=1e-5) for k, v in want.items())

        async def idle_streams(count: int) -> None:
            async def one() -> None:
                call = stub.ModelStreamInfer(timeout=120)
                result.idle_streams += 1
                try:
                    async for _ in call:
                        pass
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "stream_idle_timeout_s" in (
                            exc.details() or ""):
                        result.idle_streams_ended += 1
                    else:
                        result.samples.append(f"idle stream: {exc.code().name}: {exc.details()}")

            await asyncio.gather(*(one() for _ in range(count)))

        async def hoarder() -> None:
            connector = aiohttp.TCPConnector(local_addr=(HOARDER_ADDRESS, 0))
            async with aiohttp.ClientSession(connector=connector) as session:
                for i in range(2000):
                    body = {"inputs": [{"name": "input", "shape": [1, 1, shape.features], "datatype": "FP32",
                                        "data": [0.0] * shape.features}],
                            "parameters": {"sequence_id": f"hoard-{i}", "sequence_start": True}}
                    async with session.post(f"http://{http_url}/v2/models/{shape.name}/infer", json=body) as reply:
                        if reply.status != 200:
                            result.hoarder_refusal = f"{reply.status}: {(await reply.text())[:160]}"
                            return
                        result.hoarder_started += 1

        async def soak() -> None:
            try:
                load = await SoakClients(server.url, shape, unary, sequences, stream_share=0.3).run(
                    clients, requests, time_limit_s=seconds_limit, seed=21)
                result.soak_sent, result.soak_errors, result.soak_wrong = load.sent, load.errors, load.wrong
                result.samples += load.samples[:5]
            finally:
                done.set()

        await hoarder()  # first, so the soak's sequences start while the hoarder holds all it may
        hostile = [asyncio.ensure_future(c) for c in (long_client(), burst_client(), idle_streams(16))]
        await soak()
        outcomes = await asyncio.gather(*hostile, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                result.samples.append(f"hostile client: {type(outcome).__name__}: {outcome}")
        for name in entries:
            ready = await stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10)
            if not ready.ready:
                result.hostile_entries_refused.append(name)
    stop_sampling.set()
    sampler.join(5)
    result.rss_peak = peak[0]
    return result


def wait_serving_http(server: ServerProcess, timeout_s: float = 30) -> str:
    """The REST address from the server's serving log line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in server.events("serving"):
            if event.get("http_port"):
                return f"127.0.0.1:{event['http_port']}"
        time.sleep(0.05)
    raise RuntimeError("no http_port in the serving log line")
