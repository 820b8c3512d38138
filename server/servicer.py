"""The GRPCInferenceService servicer: protobuf in, numpy to the scheduler, protobuf out; nothing else."""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from lstm_onnx.protocol import codec
from lstm_onnx.protocol.errors import status_of
from lstm_onnx.protos import grpc_service_pb2 as pb
from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

from .clients import ANONYMOUS, Client, client_of_grpc
from .repository import READY, Repository
from .scheduler import Scheduler

log = logging.getLogger("lstm_onnx.server")

SERVER_NAME = "lstm-onnx"
SERVER_VERSION = "0.1.0"
# Only what this server really does: model_configuration, statistics, sequences (with string ids, which
# Triton's protocol docs name "sequence(string_id)"), streaming. Not "model_repository": RepositoryModelLoad/
# Unload are not implemented (the repository is read once at start-up, like Triton's --model-control-mode none).
EXTENSIONS = ["model_configuration", "statistics", "sequence", "sequence(string_id)", "streaming"]
# Parameter of a stream's error response that carries the status a unary call would have had.
STREAM_ERROR_CODE = "error_code"


def _status_on_error(method: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """Abort the call with the error's gRPC status; the one place exceptions become statuses."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except Exception as exc:
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error", extra={"fields": {"rpc": method.__name__}})
            await context.abort(code, message)

    return wrapper


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 with Triton's extensions over the repository and scheduler."""

    def __init__(self, repository: Repository, scheduler: Scheduler, max_streams: int = 0,
                 streams_per_client: int = 0, stream_idle_timeout_s: float = 0.0):
        self.repository = repository
        self.scheduler = scheduler
        self.max_streams = max_streams  # 0: no limit
        self.streams_per_client = streams_per_client  # 0: no share, only max_streams
        self.stream_idle_timeout_s = stream_idle_timeout_s  # 0: a stream may wait for its next request forever
        self.open_streams = 0
        self._client_streams: dict[str, int] = {}  # Client.key -> streams it holds open
        self.closing = asyncio.Event()  # set on drain: every stream ends after answering the request it holds
        self.streams_closed = 0  # streams the drain ended (status UNAVAILABLE) rather than the client

    @_status_on_error
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_status_on_error
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.repository.ready and not self.scheduler.draining)

    @_status_on_error
    async def ModelReady(self, request, context):
        # Triton answers ready: false for a model or version it does not have, not NOT_FOUND.
        try:
            ready = self.repository.get(request.name).resolve(request.version).ready
        except Exception:
            ready = False
        return pb.ModelReadyResponse(ready=ready and not self.scheduler.draining)

    @_status_on_error
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    @_status_on_error
    async def ModelMetadata(self, request, context):
        entry = self.repository.get(request.name)
        runtime = entry.resolve(request.version).runtime
        response = pb.ModelMetadataResponse(
            name=entry.name, versions=[str(v) for v in sorted(entry.versions) if entry.versions[v].ready],
            platform=entry.config.platform)
        for spec in runtime.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in runtime.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    @_status_on_error
    async def ModelConfig(self, request, context):
        entry = self.repository.get(request.name)
        if request.version:
            entry.resolve(request.version)
        return pb.ModelConfigResponse(config=entry.config)

    @_status_on_error
    async def ModelStatistics(self, request, context):
        names = [request.name] if request.name else sorted(self.repository.models)
        snapshot = self.scheduler.metrics.snapshot()
        response = pb.ModelStatisticsResponse()
        for name in names:
            entry = self.repository.get(name)
            versions = [entry.resolve(request.version).version] if request.version else sorted(
                v for v, ver in entry.versions.items() if ver.ready)
            for version in versions:
                c = snapshot.get((name, str(version)))
                stats = response.model_stats.add(name=name, version=str(version))
                if c is None:
                    continue
                stats.last_inference, stats.inference_count = c.last_inference_ms, c.inference_count
                stats.execution_count = c.exec_count
                s = stats.inference_stats
                s.success.count, s.success.ns = c.success, c.request_ns
                s.fail.count, s.fail.ns = c.failure, c.failure_ns
                # Triton's counts: queue and the compute phases once per successful request (perf_analyzer checks
                # that the three compute counts agree); batch_stats once per execution of that batch size.
                s.queue.count, s.queue.ns = c.success, c.queue_ns
                s.compute_input.count, s.compute_input.ns = c.success, c.compute_input_ns
                s.compute_infer.count, s.compute_infer.ns = c.success, c.compute_infer_ns
                s.compute_output.count, s.compute_output.ns = c.success, c.compute_output_ns
                for rows in sorted(c.batch_sizes):
                    batch = stats.batch_stats.add(batch_size=rows)
                    runs = c.batch_sizes[rows]
                    batch.compute_input.count, batch.compute_input.ns = runs, c.batch_input_ns[rows]
                    batch.compute_infer.count, batch.compute_infer.ns = runs, c.batch_ns[rows]
                    batch.compute_output.count, batch.compute_output.ns = runs, c.batch_output_ns[rows]
        return response

    @_status_on_error
    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for name, entry in sorted(self.repository.models.items()):
            if not entry.versions:
                if not request.ready:
                    response.models.add(name=name, state="UNAVAILABLE", reason=entry.reason)
                continue
            for number, version in sorted(entry.versions.items()):
                if request.ready and version.state != READY:
                    continue
                response.models.add(name=name, version=str(number), state=version.state, reason=version.reason)
        return response

    @_status_on_error
    async def ModelInfer(self, request, context):
        return await self._infer(request, context.time_remaining(), client_of_grpc(context))

    async def _infer(self, request: pb.ModelInferRequest, time_remaining: float | None = None,
                     client: Client = ANONYMOUS) -> pb.ModelInferResponse:
        inputs, requested, sequence = codec.decode_request(request)
        result = await self.scheduler.infer(request.model_name, request.model_version, inputs, requested, sequence,
                                            request.id, time_remaining, client, request.ByteSize())
        response = codec.encode_response(result.model, result.version, request.id, result.outputs)
        if result.sequence_step:
            codec.encode_sequence_step(response, result.sequence_step, result.sequence_previous_id)
        return response

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in order; a failed request answers error_message and the stream goes on."""
        if self.max_streams and self.open_streams >= self.max_streams:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.open_streams} streams are open on this server process, the limit is "
                                f"{self.max_streams} (max_concurrent_streams, per worker); close one or use ModelInfer")
        client = client_of_grpc(context)
        held = self._client_streams.get(client.key, 0)
        if self.streams_per_client and held >= self.streams_per_client:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this client ({client.key}) holds {held} open streams, its share is "
                                f"{self.streams_per_client} (max_streams_per_client, per worker); close one or use "
                                "ModelInfer")
        # Triton's opt-in: with header triton_grpc_error: true an error ends the stream with its real status.
        grpc_errors = dict(context.invocation_metadata() or ()).get("triton_grpc_error", "").lower() == "true"
        self.open_streams += 1
        self._client_streams[client.key] = held + 1
        try:
            async for response in self._stream(request_iterator, context, client):
                if grpc_errors and response.error_message:
                    code = grpc.StatusCode[response.infer_response.parameters[STREAM_ERROR_CODE].string_param]
                    await context.abort(code, response.error_message)
                yield response
        finally:
            self.open_streams -= 1
            if self._client_streams[client.key] <= 1:
                del self._client_streams[client.key]
            else:
                self._client_streams[client.key] -= 1

    async def _stream(self, request_iterator, context, client: Client = ANONYMOUS
                      ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        requests = aiter(request_iterator)
        answered = 0
        closing = asyncio.ensure_future(self.closing.wait())  # one waiter per stream, not per request
        try:
            while True:
                # Race the next read against the drain, so a stream whose client keeps sending still ends: the
                # request it holds is answered (or refused), and the rest are refused by the stream's status.
                # The idle timeout too: a stream with no request for stream_idle_timeout_s gives its slot back.
                read = asyncio.ensure_future(anext(requests))
                if not closing.done():
                    await asyncio.wait((read, closing), timeout=self.stream_idle_timeout_s or None,
                                       return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    # Leave the pending read to the call (it ends with it): cancelling a read that grpc core
                    # has started fails the whole call with INTERNAL 'Internal error from Core'.
                    read.add_done_callback(lambda t: t.cancelled() or t.exception())
                    if not closing.done():
                        log.info("stream idle", extra={"fields": {"client": client.key, "answered": answered,
                                                                  "idle_s": self.stream_idle_timeout_s}})
                        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                            f"stream idle: no request for {self.stream_idle_timeout_s:g} s after its "
                                            f"{answered} requests were answered (stream_idle_timeout_s); the stream "
                                            "is ended to free its slot, open a new one to go on")
                    self.streams_closed += 1
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        f"server is shutting down: this stream's {answered} requests were answered, "
                                        "any later one was not read; send it to another server")
                try:
                    request = read.result()
                except StopAsyncIteration:
                    return
                answered += 1
                try:
                    response = await self._infer(request, client=client)
                except Exception as exc:
                    code, message = status_of(exc)
                    if code == grpc.StatusCode.INTERNAL:
                        log.exception("internal error", extra={"fields": {"rpc": "ModelStreamInfer"}})
                    # The same text as the unary call; its status name rides along as a response parameter.
                    failed = pb.ModelInferResponse(model_name=request.model_name,
                                                   model_version=request.model_version, id=request.id)
                    failed.parameters[STREAM_ERROR_CODE].string_param = code.name
                    yield pb.ModelStreamInferResponse(error_message=message, infer_response=failed)
                    continue
                yield pb.ModelStreamInferResponse(infer_response=response)
        finally:
            closing.cancel()
