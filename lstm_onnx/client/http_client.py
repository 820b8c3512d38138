"""A small blocking REST client for this server (and any KServe v2 REST server): the gRPC client's methods.

Binary tensors (Triton's extension) by default, JSON `data` with binary=False; one keep-alive connection
(http.client, so the client needs nothing beyond the standard library and the protocol layer).
"""
from __future__ import annotations

import http.client
from collections.abc import Iterator
from urllib.parse import quote

import numpy as np
import orjson
from google.protobuf import json_format

from lstm_onnx.protocol import rest_codec
from lstm_onnx.protocol.codec import SequenceControl
from lstm_onnx.protos import grpc_service_pb2 as pb
from lstm_onnx.protos import model_config_pb2 as mc

from .client import ClientError, server_filled_inputs


class HttpClientError(ClientError):
    """The server answered with an HTTP error status; the message is the server's `error` text."""

    def __init__(self, status: int, message: str):
        Exception.__init__(self, f"HTTP {status}: {message}")
        self.code = status


class HttpInferenceClient:
    """Blocking REST client over one connection; use as a context manager. `url` is HOST:PORT."""

    def __init__(self, url: str, timeout_s: float = 60.0, binary: bool = True):
        host, _, port = url.rpartition(":")
        self.connection = http.client.HTTPConnection(host.strip("[]") or url, int(port) if port else 8000,
                                                     timeout=timeout_s)
        self.binary = binary

    def __enter__(self) -> "HttpInferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.connection.close()

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[bytes, http.client.HTTPResponse]:
        try:
            self.connection.request(method, path, body=body, headers=headers or {})
            response = self.connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.connection.close()
            raise HttpClientError(0, f"{self.connection.host}:{self.connection.port}: {exc}") from None
        if response.status >= 400:
            try:
                message = orjson.loads(payload)["error"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                message = payload[:200].decode(errors="replace")
            raise HttpClientError(response.status, message)
        return payload, response

    def _get_json(self, path: str) -> dict:
        return orjson.loads(self._request("GET", path)[0])

    @staticmethod
    def _model_path(model: str, version: str) -> str:
        path = f"/v2/models/{quote(model, safe='')}"
        return path + f"/versions/{quote(version, safe='')}" if version else path

    def metadata(self, model: str, version: str = "") -> pb.ModelMetadataResponse:
        """The model's metadata, as the gRPC client gives it (the same message, read from JSON)."""
        return json_format.ParseDict(self._get_json(self._model_path(model, version)), pb.ModelMetadataResponse(),
                                     ignore_unknown_fields=True)

    def _config(self, model: str) -> mc.ModelConfig:
        """The model's config.pbtxt as the gRPC client gives it (REST answers the ModelConfig message as JSON)."""
        return json_format.ParseDict(self._get_json(self._model_path(model, "") + "/config"), mc.ModelConfig(),
                                     ignore_unknown_fields=True)

    def optional_inputs(self, model: str) -> set[str]:
        """Inputs a client may leave out: recurrent state the server fills (see `server_filled_inputs`)."""
        return server_filled_inputs(self._config(model))

    def task(self, model: str) -> str | None:
        """What the model's `output` holds (classification or regression), from config.pbtxt's parameters."""
        config = self._config(model)
        if "lstm_onnx.task" not in config.parameters:
            return None  # a repository from another tool
        return config.parameters["lstm_onnx.task"].string_value or None

    def ready(self) -> bool:
        try:
            return bool(self._get_json("/v2/health/ready").get("ready"))
        except HttpClientError as exc:
            if exc.code == 503:
                return False
            raise

    def infer(self, model: str, inputs: dict[str, np.ndarray], version: str = "", outputs: list[str] | None = None,
              sequence: SequenceControl | None = None) -> dict[str, np.ndarray]:
        """One POST .../infer; returns the outputs by name."""
        body, length = rest_codec.encode_infer_request(inputs, outputs, self.binary, sequence)
        headers = {"Content-Type": rest_codec.JSON_TYPE}
        if length is not None:
            headers = {"Content-Type": rest_codec.BINARY_TYPE, rest_codec.HEADER_LENGTH: str(length)}
        payload, response = self._request("POST", self._model_path(model, version) + "/infer", body, headers)
        header = response.getheader(rest_codec.HEADER_LENGTH)
        return rest_codec.decode_infer_response(payload, int(header) if header else None)

    def stream_sequence(self, model: str, chunks: list[dict[str, np.ndarray]], sequence_id: int | str,
                        version: str = "") -> Iterator[dict[str, np.ndarray]]:
        """Send chunks of one sequence as successive requests (REST has no stream: the server keeps the state
        between them); yields each chunk's outputs, raises HttpClientError on a chunk the server refused."""
        last = len(chunks) - 1
        for i, chunk in enumerate(chunks):
            yield self.infer(model, chunk, version, sequence=SequenceControl(sequence_id, i == 0, i == last))
