"""The real server on port 0: every non-inference RPC, health, reflection and metrics, via our client and tritonclient."""
from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_models import build_repository, sample_input


@pytest.fixture(scope="module")
def server(tiny_repository, tmp_path_factory):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    repo = build_repository(tiny_repository, tmp_path_factory.mktemp("rpc") / "repo")
    # A broken model beside good ones: the others serve (Triton with --exit-on-error=false).
    settings = ServerSettings(model_repository=str(repo), grpc_port=0, metrics_port=0, http_port=-1,
                              exit_on_error="false")
    with BackgroundServer(settings) as srv:
        srv.repo = repo
        yield srv


def test_server_live_and_metadata_name_real_extensions(triton):
    assert triton.is_server_live()
    meta = triton.get_server_metadata()
    assert meta.name == "lstm-onnx"
    assert {"model_configuration", "statistics", "sequence"} <= set(meta.extensions)
    assert "shared_memory" not in " ".join(meta.extensions)


def test_broken_model_is_reported_and_others_serve(triton):
    assert not triton.is_server_ready()  # one model failed, as Triton reports it
    assert not triton.is_model_ready("broken")
    assert triton.is_model_ready("tiny_lstm") and triton.is_model_ready("tiny_gru")
    index = {(m.name, m.version): m for m in triton.get_model_repository_index().models}
    assert index[("broken", "1")].state == "UNAVAILABLE"
    assert "model.onnx" in index[("broken", "1")].reason or "onnx" in index[("broken", "1")].reason.lower()
    assert index[("tiny_lstm", "1")].state == "READY"


def test_model_metadata_lists_graph_tensors_with_dynamic_axes(triton):
    meta = triton.get_model_metadata("tiny_lstm")
    assert meta.versions == ["1"] and meta.platform == "onnxruntime_onnx"
    shapes = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert shapes == {"input": ("FP32", [-1, -1, 1]), "h0": ("FP32", [-1, 2, 8]), "c0": ("FP32", [-1, 2, 8])}
    assert [t.name for t in meta.outputs] == ["output", "hn", "cn"]


def test_model_config_reports_provider_and_inferred_config(triton):
    config = triton.get_model_config("tiny_lstm").config
    assert config.parameters["execution_provider"].string_value == "cpu"
    assert config.instance_group[0].kind == 2  # KIND_CPU
    # Unidirectional, stateful: Triton's sequence batcher with implicit state, not the dynamic batcher.
    assert config.max_batch_size > 0 and config.WhichOneof("scheduling_choice") == "sequence_batching"
    # No config.pbtxt: inputs and outputs come from the graph, batch axis split off.
    inferred = triton.get_model_config("identity_int64").config
    assert [(i.name, list(i.dims)) for i in inferred.input] == [("x", [3])]
    assert inferred.max_batch_size == 8 and inferred.WhichOneof("scheduling_choice") == "dynamic_batching"


def test_unknown_model_is_not_found_and_server_keeps_serving(triton):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND" and "nope" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("tiny_lstm", model_version="7")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("broken")
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert triton.is_server_live()


def test_statistics_and_metrics_count_requests(server, triton):
    import tritonclient.grpc as tc

    def counts(stats) -> dict:
        s = stats.inference_stats
        ones = [b for b in stats.batch_stats if b.batch_size == 1]
        return {"success": s.success.count, "fail": s.fail.count, "queue": s.queue.count,
                "compute_input": s.compute_input.count, "compute_infer": s.compute_infer.count,
                "compute_output": s.compute_output.count, "executions": stats.execution_count,
                "inferences": stats.inference_count,
                "runs_of_1": [(b.compute_input.count, b.compute_infer.count, b.compute_output.count) for b in ones]}

    before = counts(triton.get_inference_statistics("tiny_gru").model_stats[0])
    x = sample_input(1, 4)
    for _ in range(3):  # one after another: each runs alone
        tensor = tc.InferInput("input", x.shape, "FP32")
        tensor.set_data_from_numpy(x)
        triton.infer("tiny_gru", [tensor])
    stats = triton.get_inference_statistics("tiny_gru").model_stats[0]
    after = counts(stats)
    runs_before = before["runs_of_1"][0][0] if before["runs_of_1"] else 0
    assert {k: after[k] - before[k] for k in after if k != "runs_of_1"} == {
        "success": 3, "fail": 0, "queue": 3, "compute_input": 3, "compute_infer": 3, "compute_output": 3,
        "executions": 3, "inferences": 3}
    assert after["runs_of_1"] == [(runs_before + 3,) * 3]
    # perf_analyzer refuses statistics whose compute counts differ ("Server side statistics compute counts must
    # be the same"): Triton counts queue and each compute phase once per successful request.
    s = stats.inference_stats
    assert s.success.count == s.queue.count == s.compute_input.count == s.compute_infer.count == s.compute_output.count
    assert s.compute_infer.ns > 0 and s.compute_input.ns > 0 and s.success.ns >= s.compute_infer.ns
    url = f"http://127.0.0.1:{server.running.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    success = {tuple(sorted(s.labels.items())): s.value for s in families["nv_inference_request_success"].samples}
    assert success[(("model", "tiny_gru"), ("version", "1"))] == stats.inference_stats.success.count
    expected = {"nv_inference_request_success": "counter", "nv_inference_request_failure": "counter",
                "nv_inference_count": "counter", "nv_inference_exec_count": "counter",
                "nv_inference_request_duration_us": "counter", "nv_inference_queue_duration_us": "counter",
                "nv_inference_compute_infer_duration_us": "counter", "nv_inference_pending_request_count": "gauge",
                "nv_inference_compute_input_duration_us": "counter",
                "nv_inference_compute_output_duration_us": "counter"}
    assert {name: families[name].type for name in expected} == expected
    for name in expected:
        labels = {"model", "reason", "version"} if name == "nv_inference_request_failure" else {"model", "version"}
        assert all(set(s.labels) == labels for s in families[name].samples), name
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/nope", timeout=10)


def test_health_serving_when_all_models_load_and_reflection_lists_services(server, tiny_repository):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    # The shared server has a broken model, so it is NOT_SERVING; a clean repository is SERVING.
    with grpc.insecure_channel(server.url) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with BackgroundServer(ServerSettings(model_repository=str(tiny_repository), grpc_port=0,
                                         metrics_port=-1, http_port=-1)) as ok:
        with grpc.insecure_channel(ok.url) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            requests = iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                             reflection_pb2.ServerReflectionRequest(
                                 file_containing_symbol="inference.GRPCInferenceService")])
            listed, described = list(stub.ServerReflectionInfo(requests))
            names = {s.name for s in listed.list_services_response.service}
            assert names == {"inference.GRPCInferenceService", "grpc.health.v1.Health",
                             "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
            assert described.file_descriptor_response.file_descriptor_proto  # grpcurl can describe and call


def test_our_client_reads_metadata_and_infers(server):
    from lstm_onnx.client.client import InferenceClient
    from lstm_onnx.client.loadgen import reference_outputs

    with InferenceClient(server.url) as client:
        assert client.metadata("tiny_lstm").name == "tiny_lstm"
        assert client.optional_inputs("tiny_lstm") == {"h0", "c0"}
        x = sample_input(2, 3)
        out = client.infer("tiny_lstm", {"input": x}, outputs=["output"])
    assert list(out) == ["output"]
    want = reference_outputs(server.repo / "tiny_lstm" / "1" / "model.onnx", {"input": x})["output"]
    np.testing.assert_allclose(out["output"], want, atol=1e-6, rtol=0)
