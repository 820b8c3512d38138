"""The inference service's gRPC method handlers: the servicer's methods, where request bytes protobuf cannot decode
(nested past its recursion limit, or corrupt) are refused as INVALID_ARGUMENT rather than grpcio's UNKNOWN."""
from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError

from lstm_onnx.protocol.errors import InvalidArgument, status_of
from lstm_onnx.protos import grpc_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class Undecodable:
    """What a request decodes to when protobuf cannot decode its bytes; the handler refuses it with `error`."""

    def __init__(self, error: InvalidArgument):
        self.error = error


def add_inference_servicer(servicer, server: grpc.aio.Server) -> None:
    """Register the servicer's methods, as the generated add_GRPCInferenceServiceServicer_to_server does, with
    requests decoded by `decoder`."""
    handlers = {method.name: _handler(getattr(servicer, method.name), method) for method in SERVICE.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def decoder(request_type) -> Callable[[bytes], object]:
    """A request deserializer that returns Undecodable instead of raising, so the call gets a status of ours."""
    name = request_type.DESCRIPTOR.full_name

    def decode_request(data: bytes):
        try:
            return request_type.FromString(data)
        except DecodeError as exc:
            return Undecodable(InvalidArgument(f"request: cannot be decoded as {name} ({exc}), expected a "
                                               "well-formed protobuf message nested at most 100 levels deep"))

    return decode_request


def _handler(behaviour, method: MethodDescriptor) -> grpc.RpcMethodHandler:
    decode = decoder(message_factory.GetMessageClass(method.input_type))
    encode = message_factory.GetMessageClass(method.output_type).SerializeToString
    if method.client_streaming and method.server_streaming and inspect.isasyncgenfunction(behaviour):
        async def guarded(requests, context):
            async for response in behaviour(_refuse_undecodable(requests, context), context):
                yield response
    elif not method.client_streaming and not method.server_streaming and inspect.iscoroutinefunction(behaviour):
        async def guarded(request, context):
            if isinstance(request, Undecodable):
                await context.abort(*status_of(request.error))
            return await behaviour(request, context)
    else:
        guarded = behaviour  # the generated UNIMPLEMENTED stubs: they read no request
    factory = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
               (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return factory[method.client_streaming, method.server_streaming](
        guarded, request_deserializer=decode, response_serializer=encode)


async def _refuse_undecodable(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> AsyncIterator:
    """The stream's requests; one that did not decode ends the stream with INVALID_ARGUMENT (its id unread, it
    cannot be answered in the stream as other failed requests are)."""
    async for request in requests:
        if isinstance(request, Undecodable):
            await context.abort(*status_of(request.error))
        yield request
