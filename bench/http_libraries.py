"""Which async HTTP library serves REST: each candidate answers our infer request inside one asyncio loop.

`python -m bench.http_libraries` starts each candidate in its own process (uvloop, as the server runs), sends the
request our REST endpoint gets most (POST .../infer, Triton binary tensors, B=1 T=50 F=8 FP32: a small JSON
header and 1600 bytes) from an aiohttp client in another process, and prints c1 p50 and c64 req/s. The handler
parses the header with orjson, reads the tensor by Inference-Header-Content-Length and answers a 16-byte binary
output, so the figures are the library's cost on our request with no model behind it.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import numpy as np

CANDIDATES = ("aiohttp", "starlette+uvicorn", "uvicorn-asgi")
HEADER = json.dumps({"inputs": [{"name": "input", "shape": [1, 50, 8], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 1600}}],
                     "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
BODY = HEADER + np.zeros(400, np.float32).tobytes()
PATH = "/v2/models/lstm/infer"


def _answer(header_length: int, body: bytes) -> tuple[bytes, int]:
    import orjson

    request = orjson.loads(body[:header_length])
    tensor = np.frombuffer(body[header_length:], np.float32)
    out = tensor[:4].tobytes()
    head = orjson.dumps({"model_name": "lstm", "model_version": "1", "outputs": [
        {"name": request["outputs"][0]["name"], "datatype": "FP32", "shape": [1, 4],
         "parameters": {"binary_data_size": len(out)}}]})
    return head + out, len(head)


async def _serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        payload, length = _answer(int(request.headers["Inference-Header-Content-Length"]), body)
        return web.Response(body=payload, headers={"Inference-Header-Content-Length": str(length)},
                            content_type="application/octet-stream")

    app = web.Application()
    app.router.add_post(PATH, infer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _serve_uvicorn(port: int, app) -> None:
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="none", http="httptools", lifespan="off",
                            access_log=False, log_level="warning")
    server = uvicorn.Server(config)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup()  # not serve(): that captures the process's signals, which belong to our loop
    print("ready", flush=True)
    await asyncio.Event().wait()


def _starlette_app():
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request):
        body = await request.body()
        payload, length = _answer(int(request.headers["inference-header-content-length"]), body)
        return Response(payload, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(length)})

    return Starlette(routes=[Route(PATH, infer, methods=["POST"])])


async def _asgi_app(scope, receive, send):
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    headers = dict(scope["headers"])
    payload, length = _answer(int(headers[b"inference-header-content-length"]), b"".join(chunks))
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/octet-stream"), (b"content-length", str(len(payload)).encode()),
        (b"inference-header-content-length", str(length).encode())]})
    await send({"type": "http.response.body", "body": payload})


def serve(kind: str, port: int) -> None:
    import uvloop

    if kind == "aiohttp":
        main = _serve_aiohttp(port)
    elif kind == "starlette+uvicorn":
        main = _serve_uvicorn(port, _starlette_app())
    else:
        main = _serve_uvicorn(port, _asgi_app)
    uvloop.run(main)


async def _load(port: int, concurrency: int, seconds: float) -> tuple[float, float]:
    import aiohttp

    url = f"http://127.0.0.1:{port}{PATH}"
    headers = {"Inference-Header-Content-Length": str(len(HEADER)), "Content-Type": "application/octet-stream"}
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        for _ in range(20):  # warm-up
            async with session.post(url, data=BODY, headers=headers) as r:
                await r.read()
        deadline = time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                async with session.post(url, data=BODY, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, r.status
                latencies.append(time.perf_counter() - start)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, float(np.percentile(latencies, 50)) * 1e3


def measure(kind: str, port: int, seconds: float) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "bench.http_libraries", "serve", kind, str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        rps1, p50 = asyncio.run(_load(port, 1, seconds))
        rps64, _ = asyncio.run(_load(port, 64, seconds))
    finally:
        proc.terminate()
        proc.wait(10)
    return {"library": kind, "c1_p50_ms": round(p50, 3), "c1_rps": round(rps1), "c64_rps": round(rps64)}


def main() -> None:
    import socket

    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    results: dict[str, list[dict]] = {k: [] for k in CANDIDATES}
    for _ in range(rounds):  # alternated, so drifting machine load hits every candidate alike
        for kind in CANDIDATES:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            results[kind].append(measure(kind, port, seconds))
    for kind, rows in results.items():
        p50 = float(np.median([r["c1_p50_ms"] for r in rows]))
        c64 = float(np.median([r["c64_rps"] for r in rows]))
        print(json.dumps({"library": kind, "c1_p50_ms": round(p50, 3), "c64_rps": round(c64),
                          "rounds": rows}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        main()
