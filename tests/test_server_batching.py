"""Dynamic batching: concurrent requests merge into fewer runs and each gets exactly its single-request answer."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import numpy as np
import pytest
from server_models import sample_input


def test_concurrent_requests_are_merged_and_answers_match_single_runs(tiny_repository):
    from lstm_onnx.protocol.codec import decode_response, encode_request
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, metrics_port=-1, http_port=-1,
                              executor_threads=1)
    inputs = [sample_input(1, 9, seed=s) for s in range(24)]
    with BackgroundServer(settings) as srv:
        runtime = srv.running.repository.resolve("tiny_lstm").runtime
        zeros = np.zeros((1, 2, 8), np.float32)
        alone = [runtime.predict({"input": x, "h0": zeros, "c0": zeros}) for x in inputs]

        async def fire():
            import grpc

            from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

            async with grpc.aio.insecure_channel(srv.url) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                calls = [stub.ModelInfer(encode_request("tiny_lstm", {"input": x})) for x in inputs]
                return [decode_response(r) for r in await asyncio.gather(*calls)]

        with _executor_held(srv, len(inputs)):
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

    from lstm_onnx.server.batcher import DynamicBatcher
    from lstm_onnx.server.metrics import Metrics

    class Echo:
        name, version = "echo", 1

        def predict(self, inputs, outputs=None, lengths=None, run_options=None):
            return {"y": inputs["x"] * 2}

    async def main():
        # A one-hour queue delay: a single request must not wait for it.
        batcher = DynamicBatcher(Echo(), ThreadPoolExecutor(1), Metrics(), max_batch_size=8,
                                 max_queue_delay_us=3_600_000_000, merge=True)
        out, _ = await asyncio.wait_for(batcher.infer({"x": np.ones((1, 2), np.float32)}, 1), timeout=10)
        return out

    np.testing.assert_array_equal(asyncio.run(main())["y"], np.full((1, 2), 2, np.float32))


def test_requests_of_different_shapes_are_not_merged():
    from lstm_onnx.server.batcher import batch_key, split_outputs

    a = {"input": np.zeros((1, 5, 1), np.float32)}
    b = {"input": np.zeros((2, 7, 1), np.float32)}
    assert batch_key(a) != batch_key(b)
    assert batch_key(a) == batch_key({"input": np.ones((3, 5, 1), np.float32)})
    # A model that takes sequence_lens merges any lengths; features must still agree.
    assert batch_key(a, "input") == batch_key(b, "input") != batch_key({"input": np.zeros((1, 5, 2), np.float32)}, "input")
    parts = split_outputs({"y": np.arange(6).reshape(3, 2)}, [1, 2])
    np.testing.assert_array_equal(parts[1]["y"], [[2, 3], [4, 5]])
    with pytest.raises(Exception, match="no batch axis"):
        split_outputs({"y": np.arange(4)}, [1, 2])


def _alone_in_original_file(path, x, h0=None, c0=None):
    """The request run alone by onnxruntime on the exported file as written (no sequence_lens rewrite)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input": x}
    for spec in session.get_inputs()[1:]:
        state = {"h0": h0, "c0": c0}[spec.name]
        feed[spec.name] = state if state is not None else np.zeros((x.shape[0], *spec.shape[1:]), np.float32)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


@contextlib.contextmanager
def _executor_held(srv, in_flight: int):
    """Occupy the server's (one-thread) executor until `in_flight` requests are on the server: a tiny model runs
    faster than requests arrive, so without this whether any two requests merge depends on timing."""
    release, arrived = threading.Event(), threading.Event()
    srv.running.executor.submit(release.wait, 30)

    def watch():
        deadline = time.monotonic() + 30
        while not release.is_set() and time.monotonic() < deadline:
            if srv.running.scheduler.in_flight >= in_flight:
                arrived.set()
                break
            time.sleep(0.001)
        release.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        watcher.join(30)
        release.set()
    assert arrived.is_set(), f"never {in_flight} requests in flight behind the held executor"


def _fire(url, requests):
    """Send (model, inputs) pairs concurrently over one channel; answers in order."""
    import grpc

    from lstm_onnx.protocol.codec import decode_response, encode_request
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    async def go():
        async with grpc.aio.insecure_channel(url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [stub.ModelInfer(encode_request(model, inputs)) for model, inputs in requests]
            return [decode_response(r) for r in await asyncio.gather(*calls)]

    return asyncio.run(go())


def test_mixed_length_requests_merge_and_each_equals_its_run_alone(tiny_repository):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, metrics_port=-1, http_port=-1,
                              executor_threads=1)
    times = [3, 11, 7, 1, 12, 5, 9, 2] * 3
    requests = [(model, {"input": sample_input(1 + i % 2, t, seed=i)})
                for i, t in enumerate(times) for model in ("tiny_lstm", "tiny_gru")]
    with BackgroundServer(settings) as srv:
        assert srv.running.repository.resolve("tiny_lstm").runtime.ragged is not None
        with _executor_held(srv, len(requests)):  # the model is busy, so the requests queue and merge
            together = _fire(srv.url, requests)
        counters = srv.running.scheduler.metrics.counters("tiny_lstm", "1")
    for (model, inputs), got in zip(requests, together):
        want = _alone_in_original_file(tiny_repository / model / "1" / "model.onnx", inputs["input"])
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=f"{model} {name}")
    # Fewer runs than requests: with no two requests of one length in a row, only ragged merging can do that.
    assert counters.exec_count < len(times), "no ragged merge happened"


def test_padded_batch_equals_rows_alone_for_bidirectional_models(make_run_dir, tmp_path):
    from lstm_onnx.export.repository import export_to_repository
    from lstm_onnx.server.batcher import merge_inputs, split_outputs
    from lstm_onnx.server.runtime import ModelRuntime, RuntimeOptions

    for cell in ("lstm", "gru"):
        repo = tmp_path / cell
        export_to_repository(make_run_dir(cell=cell, bidirectional=True), repo, name="bi", version=1)
        path = repo / "bi" / "1" / "model.onnx"
        runtime = ModelRuntime("bi", 1, path)
        runtime.load(RuntimeOptions(provider="cpu"))
        assert runtime.ragged is not None and runtime.ragged.time_input == "input"
        assert [s.name for s in runtime.inputs] == [s for s in ("input", "h0", "c0") if s != "c0" or cell == "lstm"]
        parts = []
        for i, t in enumerate([9, 2, 14, 6]):
            x = sample_input(1 + i % 2, t, seed=10 + i)
            parts.append({"input": x, **{name: runtime.zero_state(name, x.shape[0]) for name in runtime.state_inputs}})
        merged, lengths = merge_inputs(parts, "input")
        assert lengths is not None and merged["input"].shape[1] == 14
        pieces = split_outputs(runtime.predict(merged, None, lengths), [p["input"].shape[0] for p in parts])
        for part, got in zip(parts, pieces):
            want = _alone_in_original_file(path, part["input"])
            for name in want:
                np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=f"{cell} {name}")
        # Without the lengths the padded zeros would be read (the reverse direction most of all): the check bites.
        blind = split_outputs(runtime.predict(merged, None), [p["input"].shape[0] for p in parts])
        assert not np.allclose(blind[1]["hn"], pieces[1]["hn"], atol=1e-3)


def test_sequences_in_a_ragged_batch_carry_exact_state(tiny_repository):
    import threading

    from lstm_onnx.client.client import InferenceClient, split_time
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, metrics_port=-1, http_port=-1,
                              executor_threads=1)
    # Each sequence streams in its own chunk length, so concurrent chunks merge with others of other lengths.
    sequences = {sid: (sample_input(1, 24, seed=sid), chunk) for sid, chunk in [(1, 3), (2, 5), (3, 8), (4, 2)]}
    results: dict[int, list] = {}
    with BackgroundServer(settings) as srv:
        def stream(sid):
            x, chunk = sequences[sid]
            with InferenceClient(srv.url) as client:
                results[sid] = list(client.stream_sequence("tiny_lstm", [{"input": c} for c in split_time(x, chunk)],
                                                           sid))

        threads = [threading.Thread(target=stream, args=(sid,)) for sid in sequences]
        with _executor_held(srv, len(sequences)):  # the first chunks of all four (T 3, 5, 8, 2) queue and merge
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        counters = srv.running.scheduler.metrics.counters("tiny_lstm", "1")
    path = tiny_repository / "tiny_lstm" / "1" / "model.onnx"
    for sid, (x, chunk) in sequences.items():
        got = results[sid]
        h = c = None
        for piece, answer in zip(split_time(x, chunk), got):
            want = _alone_in_original_file(path, piece, h, c)
            for name in want:
                np.testing.assert_allclose(answer[name], want[name], atol=1e-5, rtol=0, err_msg=f"seq {sid} {name}")
            # Carry what the server answered: the next chunk must continue from exactly that state.
            h, c = answer["hn"], answer["cn"]
        whole = _alone_in_original_file(path, x)
        np.testing.assert_allclose(got[-1]["output"], whole["output"], atol=1e-5, rtol=0)
    assert counters.success == sum(len(split_time(x, c)) for x, c in sequences.values())
    assert counters.exec_count < counters.success, "no chunks of different sequences were merged"


def test_model_reading_every_step_is_not_rewritten(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from lstm_onnx.server.padding import add_sequence_lens
    from lstm_onnx.server.runtime import ModelRuntime, RuntimeOptions

    hidden = 3
    rng = np.random.default_rng(0)
    weights = [helper.make_tensor(name, TensorProto.FLOAT, shape, rng.standard_normal(shape).astype(np.float32).ravel())
               for name, shape in (("W", [1, 4 * hidden, 2]), ("R", [1, 4 * hidden, hidden]))]
    # Y (every step, padded ones included) is an output: padding would change it, so no rewrite.
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y", "y_h"], hidden_size=hidden)
    graph = helper.make_graph([node], "every_step", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("y_h", TensorProto.FLOAT, None)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rewritten, why = add_sequence_lens(model, trusted=True)
    assert rewritten is None and "graph output 'y'" in why
    # The same node reading only final states, from a batch-major input: rewritten.
    graph.output.pop(0)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rewritten, why = add_sequence_lens(model, trusted=False)
    assert rewritten is None and "Transpose" in why  # time-major x: the server pads axis 1, which is batch here
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    runtime = ModelRuntime("every_step", 1, path)
    runtime.load(RuntimeOptions(provider="cpu"))
    assert runtime.ragged is None and [s.name for s in runtime.inputs] == ["x"]
    # Batch-major input transposed into the node, final state out: a foreign model that is safe to rewrite.
    graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 2]))
    graph.node.insert(0, helper.make_node("Transpose", ["x"], ["x_t"], perm=[1, 0, 2]))
    graph.node[1].input[0] = "x_t"
    rewritten, plan = add_sequence_lens(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                                        trusted=False)
    assert rewritten is not None and plan.time_input == "x"
    assert list(rewritten.graph.node[1].input)[4] == plan.lengths_input


def _write_width_model(repo, name: str = "widths") -> None:
    """x [batch, n] -> y = x, dynamic n, with dynamic batching: requests of different n must never merge."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (repo / name / "1").mkdir(parents=True)
    onnx.save(model, str(repo / name / "1" / "model.onnx"))
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'dynamic_batching { max_queue_delay_microseconds: 0 }\n'
        'input [{ name: "x" data_type: TYPE_FP32 dims: [-1] }]\n'
        'output [{ name: "y" data_type: TYPE_FP32 dims: [-1] }]\n')


def test_requests_with_different_batch_keys_never_share_a_run(tmp_path):
    """Queued behind a run: two requests of width 3 merge into one run, the width-4 one runs alone; execution
    counts pinned, since a wrong merge would only show as extra runs (each request re-run alone after it fails)."""
    import grpc

    from lstm_onnx.protocol.codec import decode_response, encode_request
    from lstm_onnx.protos import grpc_service_pb2 as pb
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    _write_width_model(tmp_path)
    settings = ServerSettings(model_repository=str(tmp_path), grpc_port=0, metrics_port=-1, http_port=-1,
                              executor_threads=1)
    rng = np.random.default_rng(0)
    first, *queued = [rng.standard_normal((1, n)).astype(np.float32) for n in (3, 3, 4, 3)]
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        scheduler = srv.running.scheduler
        batcher = scheduler.batcher("widths", srv.running.repository.resolve("widths"))
        release = threading.Event()
        srv.running.executor.submit(release.wait, 30)  # the one executor thread: runs start only when released
        try:
            calls = [stub.ModelInfer.future(encode_request("widths", {"x": first}), timeout=30)]
            _wait_until(lambda: scheduler.in_flight == 1, "the first request never arrived")
            calls += [stub.ModelInfer.future(encode_request("widths", {"x": x}), timeout=30) for x in queued]
            _wait_until(lambda: len(batcher._queue) == 3, "the other three never queued behind the first")
        finally:
            release.set()
        answers = [decode_response(call.result(30))["y"] for call in calls]
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="widths"), timeout=30).model_stats[0]
    for got, want in zip(answers, [first, *queued]):
        np.testing.assert_array_equal(got, want)
    assert stats.inference_count == 4 and stats.execution_count == 3, (
        f"got {stats.execution_count} runs for 4 requests, expected 3: the first alone, the two of width 3 "
        "merged, the one of width 4 alone")
    assert sorted((b.batch_size, b.compute_infer.count) for b in stats.batch_stats) == [(1, 2), (2, 1)]


def _wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)
