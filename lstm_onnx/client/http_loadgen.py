"""The load generator over KServe v2 REST: the same closed-loop levels and figures as loadgen's gRPC ones.

Requests are encoded once (binary tensors, or JSON `data`); all workers share one aiohttp session (one
keep-alive connection per concurrent worker) on one event loop, and only sampled answers are decoded.
"""
from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
from google.protobuf import json_format

from lstm_onnx.protocol import rest_codec
from lstm_onnx.protos import grpc_service_pb2 as pb
from lstm_onnx.protos import model_config_pb2 as mc

from .client import server_filled_inputs
from .loadgen import LevelResult, Payload, _Run, level_result


def open_session(concurrency: int) -> aiohttp.ClientSession:
    """A session holding up to `concurrency` keep-alive connections."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(1, concurrency)),
                                 timeout=aiohttp.ClientTimeout(total=60))


async def fetch_inputs_spec(session: aiohttp.ClientSession, url: str, model: str
                            ) -> tuple[pb.ModelMetadataResponse, set[str]]:
    """The model's metadata (as the gRPC message) and its optional inputs, over REST."""
    async with session.get(f"http://{url}/v2/models/{model}") as response:
        body = await response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:200].decode(errors='replace')}")
    metadata = json_format.ParseDict(orjson.loads(body), pb.ModelMetadataResponse(), ignore_unknown_fields=True)
    async with session.get(f"http://{url}/v2/models/{model}/config") as response:
        config = orjson.loads(await response.read()) if response.status == 200 else {}
    return metadata, server_filled_inputs(json_format.ParseDict(config, mc.ModelConfig(), ignore_unknown_fields=True))


def make_payloads(metadata: pb.ModelMetadataResponse, optional: set[str], batch: int, times: list[int],
                  binary: bool = True, seed: int = 0) -> list[Payload]:
    """One encoded REST body per entry of `times`, the same random inputs loadgen.make_payloads draws."""
    from .client import random_inputs

    payloads = []
    for i, steps in enumerate(times):
        inputs = random_inputs(metadata, batch, steps, seed=seed + i, skip=optional)
        body, length = rest_codec.encode_infer_request(inputs, binary=binary)
        payloads.append(Payload(inputs, (body, length)))
    return payloads


async def _worker(session: aiohttp.ClientSession, url: str, run: _Run, payloads: list[Payload], offset: int) -> None:
    while (index := run.take()) is not None:
        payload_index = (offset + index) % len(payloads)
        body, length = payloads[payload_index].wire
        headers = {rest_codec.HEADER_LENGTH: str(length)} if length is not None else \
            {"Content-Type": rest_codec.JSON_TYPE}
        start = time.perf_counter_ns()
        try:
            async with session.post(url, data=body, headers=headers) as response:
                answer = await response.read()
                if response.status != 200:
                    run.fail(f"HTTP {response.status}: {answer[:300].decode(errors='replace')}")
                    continue
                header = response.headers.get(rest_codec.HEADER_LENGTH)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            run.fail(f"{type(exc).__name__}: {exc}")
            continue
        run.record(index, time.perf_counter_ns() - start)
        if index % run.check_every == 0:
            run.samples.append((payload_index, rest_codec.decode_infer_response(answer, int(header) if header else None)))


async def run_level(session: aiohttp.ClientSession, url: str, model: str, payloads: list[Payload], concurrency: int,
                    max_requests: int, max_seconds: float, check_every: int = 64, warmup: int | None = None
                    ) -> tuple[LevelResult, list]:
    """loadgen.run_level over REST: the figures, and sampled decoded answers for loadgen.check_answers."""
    warmup = concurrency * 2 if warmup is None else warmup
    run = _Run(max_requests, time.perf_counter() + max_seconds, warmup, max(1, check_every))
    target = f"http://{url}/v2/models/{model}/infer"
    started = time.perf_counter()
    await asyncio.gather(*(_worker(session, target, run, payloads, w) for w in range(concurrency)))
    seconds = time.perf_counter() - started
    return level_result(run, concurrency, seconds), run.samples
