"""The REST port's limits on the real server: body size, header size, open connections, slow clients, drain, TLS."""
from __future__ import annotations

import socket
import time

import httpx
import pytest
from server_models import sample_input
from test_security_tls import pki  # noqa: F401  (the module's CA and certificates, as a fixture)

MODEL = "tiny_lstm"
TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def server(tiny_repository):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, http_port=0, metrics_port=-1,
                              max_message_bytes=4096, http_max_connections=3, http_max_header_bytes=512,
                              http_client_timeout_s=TIMEOUT_S)
    with BackgroundServer(settings) as srv:
        yield srv


def _connect(server) -> socket.socket:
    host, port = server.http_url.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _open_connections(server) -> int:
    return len(server.running.http_server.factory.server.connections)


def _wait_connections(server, count: int) -> None:
    deadline = time.monotonic() + 10
    while _open_connections(server) != count:
        assert time.monotonic() < deadline, f"got {_open_connections(server)} open connections, expected {count}"
        time.sleep(0.01)


def test_a_connection_over_the_limit_gets_503_and_is_closed(server):
    _wait_connections(server, 0)
    held = []
    try:
        for _ in range(3):
            sock = _connect(server)
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # answered, so the server holds it open
            held.append(sock)
        extra = _connect(server)
        answer = _read_all(extra)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"too many open connections: the limit is 3" in answer
    finally:
        for sock in held:
            sock.close()
    _wait_connections(server, 0)
    assert httpx.get(f"http://{server.http_url}/v2/health/live", timeout=30).status_code == 200


def test_a_body_over_max_message_bytes_is_413_whether_or_not_its_length_is_announced(server):
    _wait_connections(server, 0)
    url = f"http://{server.http_url}/v2/models/{MODEL}/infer"
    announced = httpx.post(url, content=b"x" * 5000, timeout=30)
    assert announced.status_code == 413 and "4096 bytes (max_message_bytes)" in announced.json()["error"]
    chunked = httpx.post(url, content=iter([b"x" * 3000, b"x" * 3000]), timeout=30)
    assert chunked.status_code == 413 and "max_message_bytes" in chunked.json()["error"]
    x = sample_input(1, 3)
    ok = httpx.post(url, json={"inputs": [{"name": "input", "shape": [1, 3, 1], "datatype": "FP32",
                                           "data": x.ravel().tolist()}]}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_a_header_over_the_limit_is_refused(server):
    _wait_connections(server, 0)
    refused = httpx.get(f"http://{server.http_url}/v2", headers={"X-Big": "a" * 600}, timeout=30)
    assert refused.status_code in (400, 431), refused.status_code
    assert httpx.get(f"http://{server.http_url}/v2", headers={"X-Small": "a" * 100}, timeout=30).status_code == 200


def test_a_client_that_never_finishes_its_headers_is_disconnected(server):
    _wait_connections(server, 0)
    sock = _connect(server)
    started = time.monotonic()
    sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: t\r\n")  # and never the blank line
    assert _read_all(sock) == b""  # the server hangs up without an answer
    sock.close()
    assert time.monotonic() - started >= TIMEOUT_S * 0.9


def test_a_body_that_does_not_arrive_in_time_is_408(server):
    _wait_connections(server, 0)
    sock = _connect(server)
    sock.sendall(b"POST /v2/models/tiny_lstm/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"inputs\"")
    answer = _read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert b"not received within 0.5 s (http_client_timeout_s)" in answer


def test_draining_refuses_rest_requests_with_503_and_ready_turns_503(tiny_repository):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, http_port=0, metrics_port=-1)
    with BackgroundServer(settings) as srv, httpx.Client(base_url=f"http://{srv.http_url}", timeout=30) as http:
        assert http.get("/v2/health/ready").status_code == 200
        srv.running.scheduler.draining = True  # what stop() sets first
        body = {"inputs": [{"name": "input", "shape": [1, 1, 1], "datatype": "FP32", "data": [0.5]}]}
        refused = http.post(f"/v2/models/{MODEL}/infer", json=body)
        assert refused.status_code == 503 and refused.json() == {"error": "server is shutting down: no new requests"}
        assert http.get("/v2/health/ready").json() == {"ready": False}
        assert http.get(f"/v2/models/{MODEL}/ready").status_code == 400  # not ready: Triton says 400
        assert http.get("/v2/health/live").status_code == 200


def test_rest_serves_tls_and_mutual_tls_with_the_grpc_certificate_flags(tiny_repository, pki):  # noqa: F811
    import ssl

    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    cert, key = pki["server"]
    settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, http_port=0, metrics_port=-1,
                              tls_cert=cert, tls_key=key)
    with BackgroundServer(settings) as srv:
        live = httpx.get(f"https://{srv.http_url}/v2/health/live", verify=_context(pki["ca"]), timeout=30)
        assert live.json() == {"live": True}
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{srv.http_url}/v2/health/live", timeout=30)  # plaintext is not spoken
    settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, http_port=0, metrics_port=-1,
                              tls_cert=cert, tls_key=key, tls_client_ca=pki["ca"])
    with BackgroundServer(settings) as srv:
        url = f"https://{srv.http_url}/v2/health/live"
        with pytest.raises((httpx.HTTPError, ssl.SSLError)):
            httpx.get(url, verify=_context(pki["ca"]), timeout=30).raise_for_status()  # no client certificate
        with pytest.raises((httpx.HTTPError, ssl.SSLError)):
            httpx.get(url, verify=_context(pki["ca"], pki["rogue"]), timeout=30).raise_for_status()
        assert httpx.get(url, verify=_context(pki["ca"], pki["client"]), timeout=30).status_code == 200


def _context(ca: str, pair: tuple[str, str] | None = None):
    import ssl

    context = ssl.create_default_context(cafile=ca)
    if pair:
        context.load_cert_chain(*pair)
    return context


def test_a_taken_rest_port_fails_start_up_naming_the_port(tiny_repository):
    import asyncio

    from lstm_onnx.server.app import StartupError, start_server
    from lstm_onnx.server.settings import ServerSettings

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, http_port=port, metrics_port=-1)
        with pytest.raises(StartupError, match=rf"REST port 127.0.0.1:{port}: cannot bind \(.*\); choose another with --http-port"):
            asyncio.run(start_server(settings))
