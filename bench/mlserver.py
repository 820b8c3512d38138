"""MLServer 1.7.1 as the bench's Python peer: its venv (outside the repository), its settings, its process.

The venv lives in $LSTM_ONNX_MLSERVER_VENV or <temp dir>/mlserver-venv and is created with `python3 -m venv` and
`pip install mlserver==1.7.1 onnxruntime numpy` when missing; nothing of MLServer is kept in the repository. The
server runs bench/mlserver_runtime.py on the same exported model with adaptive batching on, gRPC on a free
loopback port, REST on another, metrics off.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.processes import ROOT, ChildServer

VERSION = "1.7.1"
PACKAGES = [f"mlserver=={VERSION}", "onnxruntime", "numpy"]
MAX_BATCH_TIME_S = 0.0005  # the same 500 µs our exported config.pbtxt gives dynamic_batching


def venv_dir() -> Path:
    """Where MLServer's venv is (or would be) installed."""
    default = Path(tempfile.gettempdir()) / "mlserver-venv"
    return Path(os.environ.get("LSTM_ONNX_MLSERVER_VENV", str(default)))


def ensure_venv(log=print, install: bool = True) -> Path | None:
    """The venv's `mlserver` executable, installing MLServer first when allowed; None (with the reason logged)
    when it is missing and cannot be installed."""
    venv = venv_dir()
    exe = venv / "bin" / "mlserver"
    if _version_ok(venv):
        return exe
    if not install:
        log(f"mlserver: no MLServer {VERSION} in {venv}")
        return None
    python = shutil.which("python3")
    if python is None:
        log("mlserver: no python3 on PATH to create its venv")
        return None
    log(f"mlserver: installing {' '.join(PACKAGES)} into {venv} (once)")
    try:
        subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *PACKAGES], check=True, capture_output=True,
                       timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log(f"mlserver: could not install MLServer {VERSION}: {exc} {detail.decode(errors='replace')[-300:]}")
        return None
    return exe if _version_ok(venv) else None


def _version_ok(venv: Path) -> bool:
    python = venv / "bin" / "python"
    if not (venv / "bin" / "mlserver").exists() or not python.exists():
        return False
    result = subprocess.run([str(python), "-c", "import mlserver, onnxruntime; print(mlserver.__version__)"],
                            capture_output=True, text=True, timeout=120)
    return result.returncode == 0 and result.stdout.strip() == VERSION


def free_port() -> int:
    """A loopback TCP port free now (MLServer takes fixed ports, not 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_settings(folder: Path, model_path: Path, name: str, max_batch_size: int, max_batch_time_s: float,
                   grpc_port: int, http_port: int, parallel_workers: int) -> Path:
    """settings.json and model-settings.json for `mlserver start folder`: the model, adaptive batching, ports."""
    folder.mkdir(parents=True, exist_ok=True)
    server = {"debug": False, "host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port,
              "metrics_endpoint": None, "parallel_workers": parallel_workers,
              "grpc_max_message_length": 64 * 1024 * 1024}
    model = {"name": name, "implementation": "bench.mlserver_runtime.OnnxLstmRuntime",
             # Adaptive batching as MLServer documents it: at most this many requests, waiting at most this long.
             "max_batch_size": max_batch_size, "max_batch_time": max_batch_time_s,
             # Only `input` is declared: the load generator sends what the metadata lists, state stays zero.
             "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, -1, _features(model_path)]}],
             "parameters": {"uri": str(model_path.resolve()), "version": "1"}}
    (folder / "settings.json").write_text(json.dumps(server, indent=1))
    (folder / "model-settings.json").write_text(json.dumps(model, indent=1))
    return folder


def _features(model_path: Path) -> int:
    """The feature count of the model's `input` [batch, time, features], read from the ONNX graph."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    for tensor in graph.input:
        if tensor.name == "input":
            return tensor.type.tensor_type.shape.dim[2].dim_value
    raise ValueError(f"model {model_path}: got inputs {[t.name for t in graph.input]}, expected one named 'input'")


def describe(folder: Path) -> str:
    """The settings that matter for the comparison, in one line."""
    server = json.loads((folder / "settings.json").read_text())
    model = json.loads((folder / "model-settings.json").read_text())
    return (f"adaptive batching max_batch_size {model['max_batch_size']}, max_batch_time {model['max_batch_time']:g} s, "
            f"parallel_workers {server['parallel_workers']}, runtime bench/mlserver_runtime.py")


def start_mlserver(exe: Path, folder: Path, timeout_s: float = 60) -> ChildServer:
    """`mlserver start folder`; returns once its gRPC port answers and the model is ready."""
    env = {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    settings = json.loads((folder / "settings.json").read_text())
    name = json.loads((folder / "model-settings.json").read_text())["name"]
    server = ChildServer([str(exe), "start", str(folder)], r"gRPC server running on \S*?:(\d+)", env=env,
                         timeout_s=timeout_s)
    if server.port != settings["grpc_port"]:
        server.stop()
        raise RuntimeError(f"mlserver: serves gRPC on {server.port}, expected {settings['grpc_port']}")
    deadline = time.perf_counter() + timeout_s
    while not asyncio.run(_model_ready(server.url, name)):
        if time.perf_counter() > deadline or server.process.poll() is not None:
            server.stop()
            raise RuntimeError(f"mlserver: model '{name}' not ready after {timeout_s:g} s:\n" + "".join(server.log[-20:]))
        time.sleep(0.2)
    return server


async def _model_ready(url: str, name: str) -> bool:
    import grpc

    from lstm_onnx.protos import grpc_service_pb2 as pb
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(url) as channel:
        try:
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(pb.ModelReadyRequest(name=name),
                                                                               timeout=5)
        except grpc.aio.AioRpcError:
            return False
    return reply.ready


def serve_model(model_path: Path, work: Path, name: str = "lstm", max_batch_size: int = 64,
                max_batch_time_s: float = MAX_BATCH_TIME_S, parallel_workers: int = 0, log=print) -> ChildServer | None:
    """MLServer serving `model_path` as `name`, or None (reason logged) when MLServer is not available.

    parallel_workers 0 runs inference in the server's own process: on 2 busy shared cores one probe each measured
    552 req/s at c64 and 2.4 ms p50 at c1 against 387 req/s and 4.8 ms with the default 1 (a separate inference
    process; with uvloop >= 0.22 that process also fails to start under MLServer 1.7.1)."""
    exe = ensure_venv(log)
    if exe is None:
        return None
    folder = write_settings(work / f"mlserver-{name}", model_path, name, max_batch_size, max_batch_time_s,
                            free_port(), free_port(), parallel_workers)
    return start_mlserver(exe, folder)


def main() -> int:
    """`python3 -m bench.mlserver`: install MLServer's venv where venv_dir() says (what `make mlserver-venv` runs);
    exit 1, saying why, when it cannot be installed."""
    exe = ensure_venv()
    if exe is None:
        print(f"mlserver: no working MLServer {VERSION} in {venv_dir()}", flush=True)
        return 1
    print(f"mlserver: MLServer {VERSION} in {venv_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
