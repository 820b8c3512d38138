"""A small gRPC client for this server (and any KServe v2 server): infer and stream a sequence in chunks."""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import grpc
import numpy as np

from lstm_onnx.protocol import codec
from lstm_onnx.protocol.codec import SequenceControl
from lstm_onnx.protos import grpc_service_pb2 as pb
from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

DEFAULT_MESSAGE_BYTES = 64 * 1024 * 1024


class ClientError(Exception):
    """The server answered with an error status; the message is the server's one line."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code


def server_filled_inputs(config) -> set[str]:
    """Inputs the server supplies itself: ones marked optional, and sequence_batching's implicit state."""
    return ({t.name for t in config.input if t.optional}
            | {s.input_name for s in config.sequence_batching.state})


class InferenceClient:
    """Blocking client over one channel; use as a context manager."""

    def __init__(self, url: str, max_message_bytes: int = DEFAULT_MESSAGE_BYTES, timeout_s: float = 60.0):
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        self.channel = grpc.insecure_channel(url, options=options)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.timeout_s = timeout_s

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise ClientError(exc.code(), exc.details()) from None

    def metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        return self._call(self.stub.ModelMetadata, pb.ModelMetadataRequest(name=model, version=version))

    def optional_inputs(self, model: str) -> set[str]:
        """Inputs a client may leave out: recurrent state the server fills (see `server_filled_inputs`)."""
        return server_filled_inputs(self._call(self.stub.ModelConfig, pb.ModelConfigRequest(name=model)).config)

    def task(self, model: str) -> str | None:
        """What the model's `output` holds (classification or regression), from config.pbtxt's parameters."""
        config = self._call(self.stub.ModelConfig, pb.ModelConfigRequest(name=model)).config
        if "lstm_onnx.task" not in config.parameters:
            return None  # a repository from another tool
        return config.parameters["lstm_onnx.task"].string_value or None

    def ready(self) -> bool:
        return self._call(self.stub.ServerReady, pb.ServerReadyRequest()).ready

    def infer(self, model: str, inputs: dict[str, np.ndarray], version: str = "", outputs: list[str] | None = None,
              sequence: SequenceControl | None = None) -> dict[str, np.ndarray]:
        """One ModelInfer call; returns the outputs by name."""
        request = codec.encode_request(model, inputs, version, outputs, sequence)
        return codec.decode_response(self._call(self.stub.ModelInfer, request))

    def stream_sequence(self, model: str, chunks: list[dict[str, np.ndarray]], sequence_id: int | str,
                        version: str = "") -> Iterator[dict[str, np.ndarray]]:
        """Send chunks of one sequence over ModelStreamInfer (start on the first, end on the last); yields
        each chunk's outputs, and raises ClientError on a chunk the server refused."""
        last = len(chunks) - 1
        requests = (codec.encode_request(model, chunk, version, sequence=SequenceControl(sequence_id, i == 0, i == last),
                                         request_id=str(i)) for i, chunk in enumerate(chunks))
        try:
            for response in self.stub.ModelStreamInfer(requests, timeout=self.timeout_s):
                if response.error_message:
                    # The server names the status a unary call would have had (servicer.STREAM_ERROR_CODE).
                    name = response.infer_response.parameters["error_code"].string_param
                    code = grpc.StatusCode[name] if name in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
                    raise ClientError(code, response.error_message)
                yield codec.decode_response(response.infer_response)
        except grpc.RpcError as exc:
            raise ClientError(exc.code(), exc.details()) from None


def random_inputs(metadata: pb.ModelMetadataResponse, batch: int, time: int, seed: int = 0,
                  skip: set[str] = frozenset()) -> dict[str, np.ndarray]:
    """Random inputs for a model from its metadata: dynamic axes become batch (first) and time (others)."""
    from lstm_onnx.protocol.datatypes import numpy_of

    rng = np.random.default_rng(seed)
    arrays = {}
    for tensor in metadata.inputs:
        if tensor.name in skip:
            continue
        dims = [d if d >= 0 else (batch if i == 0 else time) for i, d in enumerate(tensor.shape)]
        dtype = numpy_of(tensor.datatype)
        if dtype.kind == "f":
            arrays[tensor.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind == "b":
            arrays[tensor.name] = rng.integers(0, 2, dims).astype(dtype)
        else:
            arrays[tensor.name] = rng.integers(0, 10, dims).astype(dtype)
    return arrays


def split_time(array: np.ndarray, chunk: int) -> list[np.ndarray]:
    """Split [B, T, ...] into chunks of `chunk` time steps (the last may be shorter)."""
    return [array[:, start:start + chunk] for start in itertools.islice(range(0, array.shape[1], chunk), None)]
