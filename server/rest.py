"""KServe v2 over HTTP/REST with Triton's extensions: one route table; handlers translate and nothing else.

Metadata, config, statistics and the repository index are answered by the gRPC servicer's own methods (the
same protobuf messages, written as JSON); inference goes to the same scheduler as gRPC, so batches merge
requests of both protocols and a sequence may alternate between them. Errors become `{"error": "..."}` with
the HTTP status of lstm_onnx.protocol.errors (Triton's mapping) and the same text as the gRPC message.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from lstm_onnx.protocol import rest_codec
from lstm_onnx.protocol.errors import InvalidArgument, http_status_of
from lstm_onnx.protos import grpc_service_pb2 as pb

from .clients import client_of_http
from .http_site import HttpLimits
from .servicer import InferenceServicer

log = logging.getLogger("lstm_onnx.server")

# REST adds Triton's binary tensor extension to what the gRPC servicer reports.
REST_EXTENSIONS = ["binary_tensor_data"]
_INT64_TYPES = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def to_json(message) -> dict:
    """A protobuf message as Triton writes it in REST: field names as in the .proto, int64 as numbers."""
    value = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True)
    return _numbers(message.DESCRIPTOR, value)


def _numbers(descriptor, value: dict) -> dict:
    """protobuf's JSON writes int64 as strings (JavaScript's precision); Triton's JSON has numbers."""
    for name, item in value.items():
        f = descriptor.fields_by_name.get(name)
        if f is None:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            inner = f.message_type.fields_by_name["value"]
            if inner.message_type is not None:
                for key in item:
                    _numbers(inner.message_type, item[key])
        elif f.message_type is not None:
            for element in (item if isinstance(item, list) else [item]):
                if isinstance(element, dict):
                    _numbers(f.message_type, element)
        elif f.type in _INT64_TYPES:
            value[name] = [int(x) for x in item] if isinstance(item, list) else int(item)
    return value


def _stats_json(response: pb.ModelStatisticsResponse) -> dict:
    """Statistics as Triton writes them: every duration present, zeros for a model not yet asked anything."""
    for stats in response.model_stats:
        for f in stats.inference_stats.DESCRIPTOR.fields:
            getattr(stats.inference_stats, f.name).SetInParent()
    return to_json(response)


def _json(value, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type=rest_codec.JSON_TYPE)


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class RestApi:
    """The REST surface over the gRPC servicer (metadata, config, stats, index) and the scheduler (infer)."""

    def __init__(self, servicer: InferenceServicer, limits: HttpLimits):
        self.servicer = servicer
        self.scheduler = servicer.scheduler
        self.limits = limits

    def routes(self) -> list[tuple[str, str, Handler]]:
        """The one route table of the REST surface (Triton's http_server.cc paths); more specific first."""
        table: list[tuple[str, str, Handler]] = [
            ("GET", "/v2", self.server_metadata),
            ("GET", "/v2/health/live", self.live),
            ("GET", "/v2/health/ready", self.ready),
            ("GET", "/v2/models/stats", self.all_stats),
            ("POST", "/v2/repository/index", self.repository_index),
        ]
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            table += [
                ("GET", prefix, self.model_metadata),
                ("GET", prefix + "/ready", self.model_ready),
                ("GET", prefix + "/config", self.model_config),
                ("GET", prefix + "/stats", self.model_stats),
                ("POST", prefix + "/infer", self.infer),
            ]
        return table

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=self.limits.max_body_bytes)
        for method, path, handler in self.routes():
            app.router.add_route(method, path, handler)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The one place REST errors become statuses: ServerError kinds as gRPC's, aiohttp's own as theirs."""
        try:
            return await handler(request)
        except web.HTTPException as exc:  # no such route (404), wrong method (405), slow (408), too large (413)
            if exc.status < 400:
                raise
            text = {404: f"no route {request.method} {request.path}; see GET /v2 and /v2/models/<model>",
                    405: f"method {request.method} is not allowed on {request.path}",
                    413: f"request body: over the limit of {self.limits.max_body_bytes} bytes (max_message_bytes)"}
            return _error(exc.status, text.get(exc.status, exc.text or exc.reason))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            status, message = http_status_of(exc)
            if status == 500:
                log.exception("internal error", extra={"fields": {"path": request.path}})
            return _error(status, message)

    async def _call(self, method, request_message):
        """Run a servicer method's body (without its gRPC abort wrapper): the protobuf answer, or a ServerError."""
        return await method.__wrapped__(self.servicer, request_message, None)

    async def server_metadata(self, request: web.Request) -> web.Response:
        answer = to_json(await self._call(InferenceServicer.ServerMetadata, pb.ServerMetadataRequest()))
        answer["extensions"] = answer["extensions"] + REST_EXTENSIONS
        return _json(answer)

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = (await self._call(InferenceServicer.ServerReady, pb.ServerReadyRequest())).ready
        return _json({"ready": ready}, 200 if ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        message = pb.ModelMetadataRequest(name=request.match_info["model"],
                                          version=request.match_info.get("version", ""))
        return _json(to_json(await self._call(InferenceServicer.ModelMetadata, message)))

    async def model_ready(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        message = pb.ModelReadyRequest(name=name, version=request.match_info.get("version", ""))
        ready = (await self._call(InferenceServicer.ModelReady, message)).ready
        # Triton answers 400 for a model version that is not ready or not known (KServe: 4xx means false).
        return _json({"name": name, "ready": ready}, 200 if ready else 400)

    async def model_config(self, request: web.Request) -> web.Response:
        message = pb.ModelConfigRequest(name=request.match_info["model"],
                                        version=request.match_info.get("version", ""))
        return _json(to_json((await self._call(InferenceServicer.ModelConfig, message)).config))

    async def model_stats(self, request: web.Request) -> web.Response:
        message = pb.ModelStatisticsRequest(name=request.match_info["model"],
                                            version=request.match_info.get("version", ""))
        return _json(_stats_json(await self._call(InferenceServicer.ModelStatistics, message)))

    async def all_stats(self, request: web.Request) -> web.Response:
        return _json(_stats_json(await self._call(InferenceServicer.ModelStatistics, pb.ModelStatisticsRequest())))

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        ready = False
        if body:
            options = rest_codec.load_json(body)
            if not isinstance(options, dict) or not isinstance(options.get("ready", False), bool):
                raise InvalidArgument(f"request body: got {body[:60]!r}, expected an object like {{\"ready\": true}}")
            ready = options.get("ready", False)
        answer = await self._call(InferenceServicer.RepositoryIndex, pb.RepositoryIndexRequest(ready=ready))
        return _json(to_json(answer)["models"])

    async def infer(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        header = rest_codec.parse_header_length(request.headers.get(rest_codec.HEADER_LENGTH), len(body))
        decoded = rest_codec.decode_infer_request(body, header)
        result = await self.scheduler.infer(request.match_info["model"], request.match_info.get("version", ""),
                                            decoded.inputs, decoded.requested, decoded.sequence,
                                            client=client_of_http(request), request_bytes=len(body))
        payload, length = rest_codec.encode_infer_response(result.model, result.version, decoded.id,
                                                           result.outputs, decoded)
        if length is None:
            return web.Response(body=payload, content_type=rest_codec.JSON_TYPE)
        return web.Response(body=payload, content_type=rest_codec.BINARY_TYPE,
                            headers={rest_codec.HEADER_LENGTH: str(length)})

    async def _body(self, request: web.Request) -> bytes:
        """The whole body within the size limit and the slow-client timeout."""
        limit = self.limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
        try:
            async with asyncio.timeout(self.limits.client_timeout_s):
                return await request.read()
        except TimeoutError:  # a slow client: 408, which has no gRPC counterpart (gRPC has its own deadlines)
            raise web.HTTPRequestTimeout(text=f"request body: not received within {self.limits.client_timeout_s:g} s "
                                         "(http_client_timeout_s)") from None
