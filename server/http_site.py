"""An aiohttp application on a port of the server's own event loop, with bounded headers, connections and time.

Used for the REST port and the metrics port. No thread and no second process: aiohttp's protocol objects run on
the loop that grpc.aio runs on.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger("lstm_onnx.server")


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP port bounds (from the server settings)."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 8190  # one header line, and one header field, at most this long
    max_headers: int = 64
    max_connections: int = 1024
    client_timeout_s: float = 30.0  # headers, and then the body, must arrive within this; idle connections close


_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s")


class _Refuse(asyncio.Protocol):
    """A connection over the limit: one 503 answer, then closed, before a byte of its request is read."""

    def __init__(self, limit: int):
        self.body = b'{"error": "too many open connections: the limit is %d (http_max_connections)"}' % limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_REFUSED % (len(self.body), self.body))
        transport.close()


class _BoundedFactory:
    """aiohttp's protocol factory, refusing a connection while `limit` are open."""

    def __init__(self, server: web.Server, limit: int):
        self.server = server
        self.limit = limit
        self.refused = 0

    def __call__(self) -> asyncio.Protocol:
        if len(self.server.connections) >= self.limit:
            self.refused += 1
            return _Refuse(self.limit)
        return self.server()


class HttpSite:
    """One listening port serving an aiohttp application; `port` is the one bound (0 picks a free one)."""

    def __init__(self, app: web.Application, limits: HttpLimits):
        self.app = app
        self.limits = limits
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._server: asyncio.base_events.Server | None = None
        self.factory: _BoundedFactory | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                    reuse_port: bool = False) -> "HttpSite":
        limits = self.limits
        # keepalive_timeout runs from the moment a connection opens until a request's headers are read, so it
        # also ends a client that sends its headers too slowly; the body has its own timeout in the handler.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     keepalive_timeout=limits.client_timeout_s,
                                     max_line_size=limits.max_header_bytes, max_field_size=limits.max_header_bytes,
                                     max_headers=limits.max_headers)
        await self._runner.setup()
        self.factory = _BoundedFactory(self._runner.server, limits.max_connections)
        self._server = await asyncio.get_running_loop().create_server(
            self.factory, host.strip("[]"), port, ssl=ssl_context, reuse_port=reuse_port or None)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self, grace: float = 1.0) -> None:
        """Stop listening, let requests in progress finish within `grace`, then close every connection."""
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            self._runner.server.pre_shutdown()
            try:
                await asyncio.wait_for(self._runner.server.shutdown(grace), grace + 1.0)
            except asyncio.TimeoutError:
                pass
            await self._runner.cleanup()


def ssl_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """Server TLS from the same PEM files as the gRPC port; with `client_ca`, client certificates are required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"tls: cannot load cert {cert!r}, key {key!r}, client CA {client_ca!r}: {exc}") from None
    return context
