"""Dynamic batching: concurrent requests merge into fewer runs and each gets exactly its single-request answer."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from server_models import sample_input


def test_concurrent_requests_are_merged_and_answers_match_single_runs(tiny_repository):
    from server.app import BackgroundServer
    from server.codec import decode_response, encode_request
    from server.settings import ServerSettings

    settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, metrics_port=-1,
                              executor_threads=1)
    inputs = [sample_input(1, 9, seed=s) for s in range(24)]
    with BackgroundServer(settings) as srv:
        runtime = srv.running.repository.resolve("tiny_lstm").runtime
        zeros = np.zeros((1, 2, 8), np.float32)
        alone = [runtime.predict({"input": x, "h0": zeros, "c0": zeros}) for x in inputs]

        async def fire():
            import grpc

            from protos import grpc_service_pb2_grpc as pb_grpc

            async with grpc.aio.insecure_channel(srv.url) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                calls = [stub.ModelInfer(encode_request("tiny_lstm", {"input": x})) for x in inputs]
                return [decode_response(r) for r in await asyncio.gather(*calls)]

        together = asyncio.run(fire())
        counters = srv.running.scheduler.metrics.counters("tiny_lstm", "1")
    for got, want in zip(together, alone):
        for name in ("output", "hn", "cn"):
            np.testing.assert_array_equal(got[name], want[name])
    assert counters.success == len(inputs)
    assert counters.exec_count < len(inputs), "no merged run happened"
    assert max(counters.batch_sizes) > 1


def test_idle_model_runs_at_once_without_waiting_for_the_delay():
    from concurrent.futures import ThreadPoolExecutor

    from server.batcher import DynamicBatcher
    from server.metrics import Metrics

    class Echo:
        name, version = "echo", 1

        def predict(self, inputs, outputs=None):
            return {"y": inputs["x"] * 2}

    async def main():
        # A one-hour queue delay: a single request must not wait for it.
        batcher = DynamicBatcher(Echo(), ThreadPoolExecutor(1), Metrics(), max_batch_size=8,
                                 max_queue_delay_us=3_600_000_000, merge=True)
        out, _ = await asyncio.wait_for(batcher.infer({"x": np.ones((1, 2), np.float32)}, 1), timeout=10)
        return out

    np.testing.assert_array_equal(asyncio.run(main())["y"], np.full((1, 2), 2, np.float32))


def test_requests_of_different_shapes_are_not_merged():
    from server.batcher import batch_key, split_outputs

    a = {"input": np.zeros((1, 5, 1), np.float32)}
    b = {"input": np.zeros((2, 7, 1), np.float32)}
    assert batch_key(a) != batch_key(b)
    assert batch_key(a) == batch_key({"input": np.ones((3, 5, 1), np.float32)})
    parts = split_outputs({"y": np.arange(6).reshape(3, 2)}, [1, 2])
    np.testing.assert_array_equal(parts[1]["y"], [[2, 3], [4, 5]])
    with pytest.raises(Exception, match="no batch axis"):
        split_outputs({"y": np.arange(4)}, [1, 2])
