"""Triton's machine-level metric families: CPU utilisation and memory from /proc, GPU figures from NVML on CUDA."""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("lstm_onnx.server")
PROC = Path("/proc")


def read_cpu_times(proc: Path = PROC) -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs from /proc/stat's first line; None off Linux."""
    try:
        fields = (proc / "stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait, as Triton counts them
    total = sum(values[:8])  # user..steal; guest time is already inside user
    return total - idle, total


def read_memory(proc: Path = PROC) -> tuple[int, int] | None:
    """(total, used) bytes from /proc/meminfo, used = MemTotal - MemAvailable (as Triton reports it)."""
    try:
        lines = (proc / "meminfo").read_text().splitlines()
    except OSError:
        return None
    kib = {line.split(":")[0]: int(line.split()[1]) for line in lines if line.count(":") == 1 and line.split()[1:]}
    if "MemTotal" not in kib or "MemAvailable" not in kib:
        return None
    return kib["MemTotal"] * 1024, (kib["MemTotal"] - kib["MemAvailable"]) * 1024


class CpuCollector:
    """nv_cpu_utilization (share of all cores busy since the previous scrape), nv_cpu_memory_*_bytes."""

    def __init__(self, proc: Path = PROC):
        self.proc = proc
        self._lock = threading.Lock()
        self._last = read_cpu_times(proc)

    def utilization(self) -> float:
        now = read_cpu_times(self.proc)
        with self._lock:
            last, self._last = self._last, now
        if now is None or last is None or now[1] <= last[1]:
            return 0.0
        return max(0.0, min(1.0, (now[0] - last[0]) / (now[1] - last[1])))

    def collect(self) -> Iterator[Metric]:
        util = GaugeMetricFamily("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]")
        util.add_metric([], self.utilization())
        yield util
        memory = read_memory(self.proc)
        if memory is not None:
            total = GaugeMetricFamily("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes")
            total.add_metric([], memory[0])
            used = GaugeMetricFamily("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes")
            used.add_metric([], memory[1])
            yield total
            yield used


class GpuCollector:
    """Triton's per-GPU families from NVML (nvidia-ml-py, in the gpu extra), labelled by gpu_uuid.

    Registered only when a model runs on CUDA; without NVML it logs once and yields nothing.
    """

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            # NVML counts energy since the driver loaded; Triton's counter starts with the server.
            self.energy_start = [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]
        except Exception as exc:  # no NVML library, no driver: the CPU families still serve
            log.warning("GPU metrics unavailable", extra={"fields": {"reason": f"{type(exc).__name__}: {exc}"}})
            self.nvml, self.handles = None, []

    def collect(self) -> Iterator[Metric]:
        if self.nvml is None:
            return
        nvml = self.nvml
        families = {
            "util": GaugeMetricFamily("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", labels=["gpu_uuid"]),
            "total": GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", labels=["gpu_uuid"]),
            "used": GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", labels=["gpu_uuid"]),
            "power": GaugeMetricFamily("nv_gpu_power_usage", "GPU power usage in watts", labels=["gpu_uuid"]),
            "limit": GaugeMetricFamily("nv_gpu_power_limit", "GPU power management limit in watts",
                                       labels=["gpu_uuid"]),
            "energy": CounterMetricFamily("nv_energy_consumption", "GPU energy consumption in joules since the "
                                          "server started", labels=["gpu_uuid"]),
        }
        for handle, start_mj in zip(self.handles, self.energy_start):
            uuid = nvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            families["util"].add_metric([uuid], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            families["total"].add_metric([uuid], memory.total)
            families["used"].add_metric([uuid], memory.used)
            families["power"].add_metric([uuid], nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
            families["limit"].add_metric([uuid], nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0)
            families["energy"].add_metric([uuid], (nvml.nvmlDeviceGetTotalEnergyConsumption(handle) - start_mj) / 1000.0)
        yield from families.values()
