"""Stateful sequences on the real server: chunked equals whole, over ModelInfer and streams; errors, eviction, bound."""
from __future__ import annotations

import queue
import time

import grpc
import numpy as np
import pytest
from server_models import sample_input


def _start(repo, **overrides):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    return BackgroundServer(ServerSettings(model_repository=str(repo), grpc_port=0, metrics_port=-1, **overrides))


@pytest.fixture(scope="module")
def server(tiny_repository):
    with _start(tiny_repository) as srv:
        yield srv


@pytest.mark.parametrize("model", ["tiny_lstm", "tiny_gru"])
def test_chunked_sequence_over_model_infer_equals_whole(server, model):
    from lstm_onnx.client.client import InferenceClient, split_time
    from lstm_onnx.server.sequences import SequenceControl

    x = sample_input(2, 23, seed=3)
    with InferenceClient(server.url) as client:
        whole = client.infer(model, {"input": x})
        chunks = split_time(x, 5)
        for i, chunk in enumerate(chunks):
            control = SequenceControl(f"seq-{model}", start=i == 0, end=i == len(chunks) - 1)
            last = client.infer(model, {"input": chunk}, sequence=control)
    for name in whole:
        np.testing.assert_allclose(last[name], whole[name], atol=1e-5, rtol=0)


def test_chunked_sequence_over_our_stream_equals_whole(server):
    from lstm_onnx.client.client import InferenceClient, split_time

    x = sample_input(1, 17, seed=4)
    with InferenceClient(server.url) as client:
        whole = client.infer("tiny_lstm", {"input": x})
        results = list(client.stream_sequence("tiny_lstm", [{"input": c} for c in split_time(x, 4)], 77))
    assert len(results) == 5
    np.testing.assert_allclose(results[-1]["output"], whole["output"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(results[-1]["cn"], whole["cn"], atol=1e-5, rtol=0)


def test_tritonclient_stream_with_sequence_ids_and_an_error_that_keeps_the_stream_open(server):
    import tritonclient.grpc as tc

    x = sample_input(1, 12, seed=5)
    answers: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(server.url)
    whole_in = tc.InferInput("input", list(x.shape), "FP32")
    whole_in.set_data_from_numpy(x)
    whole = client.infer("tiny_lstm", [whole_in]).as_numpy("output")
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        unknown = tc.InferInput("input", [1, 4, 1], "FP32")
        unknown.set_data_from_numpy(x[:, :4])
        client.async_stream_infer("tiny_lstm", [unknown], sequence_id=999, sequence_start=False)
        for i in range(3):
            chunk = tc.InferInput("input", [1, 4, 1], "FP32")
            chunk.set_data_from_numpy(np.ascontiguousarray(x[:, 4 * i:4 * i + 4]))
            client.async_stream_infer("tiny_lstm", [chunk], sequence_id=42, sequence_start=i == 0,
                                      sequence_end=i == 2)
        got = [answers.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
        client.close()
    assert got[0][0] is None and "sequence 999" in str(got[0][1]) and "sequence_start" in str(got[0][1])
    assert all(error is None for _, error in got[1:])
    np.testing.assert_allclose(got[-1][0].as_numpy("output"), whole, atol=1e-5, rtol=0)


def test_unknown_sequence_without_start_is_invalid_argument(server):
    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.server.sequences import SequenceControl

    with InferenceClient(server.url) as client:
        with pytest.raises(ClientError) as info:
            client.infer("tiny_gru", {"input": sample_input(1, 3)}, sequence=SequenceControl(12345))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        # An ended sequence is unknown again.
        client.infer("tiny_gru", {"input": sample_input(1, 3)}, sequence=SequenceControl(5, start=True, end=True))
        with pytest.raises(ClientError):
            client.infer("tiny_gru", {"input": sample_input(1, 3)}, sequence=SequenceControl(5))


def test_idle_sequences_are_evicted_and_live_ones_bounded(tiny_run_dir, tmp_path):
    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.export.repository import export_to_repository
    from lstm_onnx.server.sequences import SequenceControl

    # A stateless config gives no idle timeout, so the server's setting applies (sequence_batching's would win).
    export_to_repository(tiny_run_dir, tmp_path, name="tiny_lstm", config_style="stateless")
    x = sample_input(1, 3)
    with _start(tmp_path, sequence_idle_timeout_s=0.3, max_sequences=2) as srv:
        with InferenceClient(srv.url) as client:
            client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(1, start=True))
            client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(2, start=True))
            with pytest.raises(ClientError) as info:
                client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(3, start=True))
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit is 2" in str(info.value)
            client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(1))  # still live
            deadline = time.monotonic() + 10
            while len(srv.running.scheduler.sequences) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(srv.running.scheduler.sequences) == 0
            with pytest.raises(ClientError) as info:
                client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(1))
            assert "evicted" in str(info.value)
            client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(3, start=True))  # room again


def test_sequence_id_on_a_stateless_model_is_refused(tmp_path):
    from server_models import write_identity_model

    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.server.sequences import SequenceControl

    write_identity_model(tmp_path / "plain" / "1" / "model.onnx", "FP32")
    with _start(tmp_path) as srv, InferenceClient(srv.url) as client:
        with pytest.raises(ClientError) as info:
            client.infer("plain", {"x": np.ones((1, 3), np.float32)}, sequence=SequenceControl(1, start=True))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no recurrent state" in str(info.value)


def test_bidirectional_model_takes_a_sequence_only_whole(make_run_dir, tmp_path):
    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.export.repository import export_to_repository
    from lstm_onnx.server.sequences import SequenceControl

    export_to_repository(make_run_dir(bidirectional=True), tmp_path, name="bi")
    x = sample_input(1, 9, seed=2)
    with _start(tmp_path) as srv, InferenceClient(srv.url) as client:
        whole = client.infer("bi", {"input": x})
        one = client.infer("bi", {"input": x}, sequence=SequenceControl(7, start=True, end=True))
        np.testing.assert_array_equal(one["output"], whole["output"])
        with pytest.raises(ClientError) as info:
            client.infer("bi", {"input": x[:, :4]}, sequence=SequenceControl(8, start=True))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "bidirectional" in str(info.value)
        assert client.infer("bi", {"input": x})["output"].shape == (1, 4)
