"""A real redis-server on a free loopback port for the tests, started and stopped by them (no persistence)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

from conftest import missing_tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_redis_server() -> str:
    """The redis-server binary; skips (saying why) when missing, but fails in CI, where .ci/run installs it."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing_tool("redis-server is not installed (Debian: apt-get install -y redis-server; .ci/run installs it)")
    return binary


class RedisServer:
    """`redis-server --port N --save '' --appendonly no`; stop() and start() again keep the port (a restart)."""

    def __init__(self, binary: str, port: int | None = None, *extra: str, tls: dict[str, str] | None = None):
        self.binary = binary
        self.port = port or free_port()
        self.extra = extra  # more redis-server flags (--requirepass ...)
        self.tls = tls  # {"cert", "key", "ca"}: TLS only (rediss://), on the same port; clients need not show one
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls['ca']}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        ports = ["--port", str(self.port)]
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls["cert"],
                     "--tls-key-file", self.tls["key"], "--tls-ca-cert-file", self.tls["ca"], "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen([self.binary, *ports, "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", *self.extra], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with self._connect() as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # up (a password-protected one says NOAUTH)
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within 10 s")

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.2)
        if not self.tls:
            return sock
        import ssl

        context = ssl.create_default_context(cafile=self.tls["ca"])
        return context.wrap_socket(sock, server_hostname="127.0.0.1")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def keys(self, pattern: str = "lstm-onnx:seq:*") -> list[bytes]:
        """Keys matching `pattern` (SCAN, on a connection of its own)."""
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            return sorted(client.scan_iter(pattern))
        finally:
            client.close()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)
