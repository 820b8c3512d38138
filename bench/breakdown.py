"""Where a request's time goes inside the server, measured piece by piece in this process."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.inprocess import open_ort, time_call


def measure_pieces(model_path: Path, model: str, batch: int, steps: int, features: int) -> list[dict]:
    """Microseconds per request of: protobuf decode, encode, one executor hop, and the ORT run itself."""
    from lstm_onnx.protocol import codec
    from lstm_onnx.protos import grpc_service_pb2 as pb

    rng = np.random.default_rng(0)
    inputs = {"input": rng.standard_normal((batch, steps, features)).astype(np.float32)}
    wire = codec.encode_request(model, inputs).SerializeToString()
    session = open_ort(model_path)
    state = session.get_inputs()[1].shape  # h0: [batch, L*D, H]
    zeros = np.zeros((batch, state[1], state[2]), np.float32)
    feed = {"input": inputs["input"], "h0": zeros, "c0": zeros}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))

    def decode() -> None:
        codec.decode_request(pb.ModelInferRequest.FromString(wire))

    def encode() -> None:
        codec.encode_response(model, 1, "", outputs).SerializeToString()

    executor = ThreadPoolExecutor(1)
    loop = asyncio.new_event_loop()

    async def hop() -> None:
        await loop.run_in_executor(executor, int)

    rows = [("parse request + decode tensors", time_call(decode, 2000)),
            ("encode outputs + serialize", time_call(encode, 2000)),
            ("event loop -> executor thread -> back", time_call(lambda: loop.run_until_complete(hop()), 2000)),
            ("onnxruntime run (zeros for h0/c0)", time_call(lambda: session.run(None, feed), 300))]
    loop.close()
    executor.shutdown()
    return [{"piece": name, "us": ms * 1e3} for name, ms in rows]
