"""The gRPC floor: a minimal grpc.aio server whose ModelInfer answers a fixed, same-sized response at once.

Run as `python -m bench.echo --port P --response-bytes N`; it prints `listening PORT` when ready. The
load generator sends it the very requests it sends the real server, so the difference is the server's work.
"""
from __future__ import annotations

import argparse
import asyncio

import grpc

from lstm_onnx.client.loadgen import INFER_METHOD, MESSAGE_BYTES


def _handler(response: bytes) -> grpc.GenericRpcHandler:
    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    # No (de)serializers: bytes in, bytes out, which is all gRPC itself costs.
    method = grpc.unary_unary_rpc_method_handler(infer)
    service, name = INFER_METHOD.rsplit("/", 1)
    return grpc.method_handlers_generic_handler(service.strip("/"), {name: method})


async def serve_echo(port: int, response: bytes) -> None:
    """Serve until cancelled."""
    server = grpc.aio.server(options=[("grpc.max_send_message_length", MESSAGE_BYTES),
                                      ("grpc.max_receive_message_length", MESSAGE_BYTES)])
    server.add_generic_rpc_handlers((_handler(response),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening {bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 picks a free one)")
    parser.add_argument("--response-bytes", type=int, required=True, help="size of the answer in bytes")
    args = parser.parse_args()
    asyncio.run(serve_echo(args.port, b"\0" * args.response_bytes))


if __name__ == "__main__":
    main()
