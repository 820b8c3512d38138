"""The metrics page: Triton's families by name, type and labels (docs/user_guide/metrics.md), parsed by prometheus_client."""
from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_models import sample_input

# Triton's families that a CPU server exposes: name -> (type, labels). Taken from Triton's metrics.md tables
# (inference request metrics, latencies, pending requests, CPU metrics).
TRITON_FAMILIES = {
    "nv_inference_request_success": ("counter", {"model", "version"}),
    "nv_inference_request_failure": ("counter", {"model", "reason", "version"}),
    "nv_inference_count": ("counter", {"model", "version"}),
    "nv_inference_exec_count": ("counter", {"model", "version"}),
    "nv_inference_request_duration_us": ("counter", {"model", "version"}),
    "nv_inference_queue_duration_us": ("counter", {"model", "version"}),
    "nv_inference_compute_input_duration_us": ("counter", {"model", "version"}),
    "nv_inference_compute_infer_duration_us": ("counter", {"model", "version"}),
    "nv_inference_compute_output_duration_us": ("counter", {"model", "version"}),
    "nv_inference_pending_request_count": ("gauge", {"model", "version"}),
    "nv_cpu_utilization": ("gauge", set()),
    "nv_cpu_memory_total_bytes": ("gauge", set()),
    "nv_cpu_memory_used_bytes": ("gauge", set()),
}


@pytest.fixture(scope="module")
def server(tiny_repository):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    with BackgroundServer(ServerSettings(model_repository=str(tiny_repository), grpc_port=0, http_port=-1, metrics_port=0)) as srv:
        yield srv


def _scrape(server) -> dict:
    url = f"http://127.0.0.1:{server.running.metrics_port}/metrics"
    return {f.name: f for f in text_string_to_metric_families(urllib.request.urlopen(url, timeout=10).read().decode())}


def test_metrics_page_has_tritons_families_with_their_types_and_labels(server, triton):
    import tritonclient.grpc as tc

    x = sample_input(1, 5)
    for _ in range(4):
        tensor = tc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        triton.infer("tiny_lstm", [tensor])
    families = _scrape(server)
    for name, (kind, labels) in TRITON_FAMILIES.items():
        assert name in families, name
        assert families[name].type == kind, (name, families[name].type)
        assert families[name].samples, name
        assert all(set(s.labels) == labels for s in families[name].samples), name
    by_model = {(s.labels["model"], s.labels["version"]): s.value
                for s in families["nv_inference_request_success"].samples}
    stats = triton.get_inference_statistics("tiny_lstm").model_stats[0].inference_stats
    assert by_model[("tiny_lstm", "1")] == stats.success.count >= 4
    (util,) = families["nv_cpu_utilization"].samples
    assert 0.0 <= util.value <= 1.0
    (total,), (used,) = families["nv_cpu_memory_total_bytes"].samples, families["nv_cpu_memory_used_bytes"].samples
    assert 0 < used.value < total.value


def test_cpu_collector_reads_utilization_and_memory_from_proc(tmp_path: Path):
    from lstm_onnx.server.system_metrics import CpuCollector

    def write(busy: int, idle: int) -> None:
        # user nice system idle iowait irq softirq steal
        (tmp_path / "stat").write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")

    (tmp_path / "meminfo").write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n")
    write(100, 900)
    collector = CpuCollector(tmp_path)
    write(175, 925)  # 75 busy of 100 jiffies since the last look
    families = {f.name: f for f in collector.collect()}
    assert families["nv_cpu_utilization"].samples[0].value == pytest.approx(0.75)
    assert families["nv_cpu_memory_total_bytes"].samples[0].value == 1000 * 1024
    assert families["nv_cpu_memory_used_bytes"].samples[0].value == 750 * 1024
