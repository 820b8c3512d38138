"""`make demo`: train the default model, export, verify, audit, serve, answer a request and a chunked stream, stop.

Every step is the real `lstm-onnx` command, printed before it runs, so the demo doubles as a walkthrough.
Outputs go to demo/ (run directory, model repository, reports, audit plot).
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo"
CLI = [sys.executable, "-m", "lstm_onnx"]


def step(title: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run one real command, printing it, its output (kept in .stdout) and its exit code."""
    print(f"\n=== {title}\n$ lstm-onnx {shlex.join(args)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(CLI + list(args), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    print(result.stdout, end="", flush=True)
    print(f"--- {title}: exit {result.returncode} in {time.perf_counter() - started:.1f} s", flush=True)
    if check and result.returncode != 0:
        sys.exit(f"demo: step '{title}' failed with exit code {result.returncode}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                sys.exit(f"demo: the server exited with code {process.returncode} before it was ready")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    sys.exit(f"demo: the server at {url} was not SERVING within {timeout:.0f} s")


def main() -> int:
    import numpy as np

    OUT.mkdir(exist_ok=True)
    run, repo = OUT / "run", OUT / "models"
    step("train the default model (sine-frequency task)", "train", "--output", str(run), "--no-progress")
    tolerance: list[str] = []  # the defaults: atol 1e-5, rtol 1e-5, 10x the FP32 floor
    step("export to a Triton-layout model repository", "export", str(run), "--repository", str(repo),
         "--name", "lstm", "--report", str(OUT / "export_report.json"), *tolerance)
    model = repo / "lstm" / "1" / "model.onnx"
    step("verify parity on every available provider", "verify", str(model), "--checkpoint", str(run),
         "--report", str(OUT / "verify_report.json"), *tolerance)
    step("audit every gate against the checkpoint", "audit", str(model), "--checkpoint", str(run),
         "--gates-npz", str(OUT / "gates.npz"), "--plot", str(OUT / "gates.png"))

    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    url, http_url = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
    serve = ["serve", "--model-repository", str(repo), "--grpc-port", str(grpc_port), "--http-port", str(http_port),
             "--metrics-port", str(metrics_port)]
    print(f"\n=== serve\n$ lstm-onnx {shlex.join(serve)} &", flush=True)
    server = subprocess.Popen(CLI + serve, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        wait_ready(url, server)
        # One held-out sequence of the default task, the way a client would send it.
        sys.path.insert(0, str(ROOT))
        from lstm_onnx.model.data import make_default_task  # noqa: E402  (demo only: the server never imports model)

        data = make_default_task(seed=123, num_sequences=8)
        x, y = data.x[:1], int(data.y[0])
        np.save(OUT / "sequence.npy", x)
        answer = step("answer a real request", "infer", "--url", url, "--model", "lstm", "--input",
                      str(OUT / "sequence.npy"))
        predicted = re.search(r"class (\d+), probability ([0-9.]+)", answer.stdout)
        if predicted:
            verdict = "right" if int(predicted.group(1)) == y else "wrong"
            print(f"predicted class {predicted.group(1)} (probability {predicted.group(2)}), true class {y}: {verdict}")
        step("stream the same sequence in chunks of 16 steps (server carries h/c)", "stream", "--url", url,
             "--model", "lstm", "--input", str(OUT / "sequence.npy"), "--chunk", "16")
        step("the same request over REST (KServe v2 HTTP, binary tensors)", "infer", "--protocol", "http", "--url",
             http_url, "--model", "lstm", "--input", str(OUT / "sequence.npy"))
        import urllib.request

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        print("\n=== metrics (excerpt)")
        print("\n".join(line for line in metrics.splitlines() if line.startswith("nv_inference_request_success") and "{" in line))
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        print(f"\n=== server stopped (SIGTERM, exit {code})")
    print(f"\ndemo done: outputs in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
