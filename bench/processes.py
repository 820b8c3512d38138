"""Servers as child processes for the bench: the real server and the echo floor, with cold start, memory and imports."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ChildServer:
    """A server in its own process; `url` once it serves, `cold_start_s` from spawn to serving."""

    def __init__(self, argv: list[str], ready_pattern: str, env: dict[str, str] | None = None, timeout_s: float = 60):
        self.argv = argv
        started = time.perf_counter()
        self.process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, **(env or {})})
        self.log: list[str] = []
        pattern = re.compile(ready_pattern)
        deadline = started + timeout_s
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"{' '.join(argv[:4])}: exited before serving:\n" + "".join(self.log[-20:]))
            self.log.append(line)
            match = pattern.search(line)
            if match:
                self.port = int(match.group(1))
                break
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"{' '.join(argv[:4])}: not serving after {timeout_s} s")
        self.cold_start_s = time.perf_counter() - started
        self.url = f"127.0.0.1:{self.port}"
        # Keep draining the log so a chatty child never blocks on a full pipe.
        import threading

        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.log.append(line)
            del self.log[:-200]

    def rss_mb(self) -> float:
        """Resident memory of the process now, in MB (10^6 bytes)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
        return float("nan")

    def loaded_torch(self) -> bool:
        """Whether any torch library is mapped into the process."""
        maps = Path(f"/proc/{self.process.pid}/maps").read_text()
        return "libtorch" in maps or "/torch/" in maps

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "ChildServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_model_server(repository: Path, *flags: str, env: dict[str, str] | None = None) -> ChildServer:
    """`lstm-onnx serve` on a free loopback port, metrics off; returns once it logs `serving`."""
    argv = [sys.executable, "-m", "lstm_onnx", "serve", "--model-repository", str(repository), "--grpc-port", "0",
            "--metrics-port", "-1", "--http-port", "-1", *flags]
    return ChildServer(argv, serving_pattern(flags), env)


def serving_pattern(flags: list[str] | tuple[str, ...]) -> str:
    """The log line that says `serve` with these flags serves; its group is the gRPC port. With several workers
    the supervisor logs once all of them serve (a worker's own `serving` line comes earlier)."""
    workers = int(flags[flags.index("--workers") + 1]) if "--workers" in flags else 1
    return r'msg="workers serving" grpc=[\d.]+:(\d+)' if workers > 1 else r"msg=serving grpc=[\d.]+:(\d+)"


def start_echo_server(response_bytes: int) -> ChildServer:
    """The gRPC floor (bench.echo) on a free loopback port."""
    return ChildServer([sys.executable, "-m", "bench.echo", "--response-bytes", str(response_bytes)],
                       r"listening (\d+)")
