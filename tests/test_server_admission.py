"""Bounded admission on the real server: queued requests and their bytes, a client's share of the sequence and
stream slots, idle streams, and capped string sequence ids; each refusal names the setting and the server serves on."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from server_models import MARK, Gate

MODEL = "tiny_lstm"


def _start(repo, **overrides):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    return BackgroundServer(ServerSettings(model_repository=str(repo), **{
        "grpc_port": 0, "http_port": -1, "metrics_port": -1, **overrides}))


def _request(model: str = MODEL, value: float = 0.5, sequence=None, junk_bytes: int = 0):
    from lstm_onnx.protocol.codec import encode_request

    request = encode_request(model, {"input": np.full((1, 2, 1), value, np.float32)}, sequence=sequence)
    if junk_bytes:  # a parameter the server ignores: it still holds the whole message while the request waits
        request.parameters["junk"].string_param = "x" * junk_bytes
    return request


def _stub(channel):
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    return pb_grpc.GRPCInferenceServiceStub(channel)


def _until(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s:g} s for {what}"
        time.sleep(0.002)


def _refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details()


def _held(srv, model: str = MODEL) -> Gate:
    return Gate(srv.running.repository.get(model).resolve("").runtime)


def test_queued_requests_beyond_the_per_model_limit_are_refused(tiny_repository):
    with _start(tiny_repository, max_queued_requests_per_model=2) as srv, grpc.insecure_channel(srv.url) as channel:
        stub, gate = _stub(channel), _held(srv)
        try:
            waiting = [stub.ModelInfer.future(_request(value=MARK), timeout=30) for _ in range(2)]
            _until(lambda: srv.running.scheduler.in_flight == 2, "two requests held")
            message = _refused(lambda: stub.ModelInfer(_request(value=MARK), timeout=10),
                               grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "max_queued_requests_per_model" in message and "limit is 2" in message, message
            other = stub.ModelInfer(_request("tiny_gru"), timeout=10)  # another model still has room
            assert other.outputs
        finally:
            gate.close()
        for future in waiting:
            assert future.result().outputs
        assert stub.ModelInfer(_request(), timeout=10).outputs  # room again once they are answered


def test_queued_requests_beyond_the_total_limit_are_refused(tiny_repository):
    with _start(tiny_repository, max_queued_requests=2) as srv, grpc.insecure_channel(srv.url) as channel:
        stub, gate = _stub(channel), _held(srv)
        gru_gate = _held(srv, "tiny_gru")
        try:
            waiting = [stub.ModelInfer.future(_request(model, value=MARK), timeout=30) for model in (MODEL, "tiny_gru")]
            _until(lambda: srv.running.scheduler.in_flight == 2, "two requests held")
            message = _refused(lambda: stub.ModelInfer(_request(), timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "max_queued_requests" in message and "limit is 2" in message, message
        finally:
            gate.close()
            gru_gate.close()
        for future in waiting:
            assert future.result().outputs


def test_queued_bytes_beyond_the_limit_are_refused_even_when_they_are_ignored_parameters(tiny_repository):
    limit = 1 << 20
    with _start(tiny_repository, max_queued_bytes_per_model=limit, max_queued_bytes=4 * limit) as srv, \
            grpc.insecure_channel(srv.url) as channel:
        stub, gate = _stub(channel), _held(srv)
        try:
            first = stub.ModelInfer.future(_request(value=MARK, junk_bytes=600_000), timeout=30)
            _until(lambda: srv.running.scheduler.in_flight == 1, "the first request held")
            message = _refused(lambda: stub.ModelInfer(_request(value=MARK, junk_bytes=600_000), timeout=10),
                               grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "max_queued_bytes_per_model" in message and f"limit is {limit}" in message, message
            assert stub.ModelInfer(_request("tiny_gru", junk_bytes=600_000), timeout=10).outputs
        finally:
            gate.close()
        assert first.result().outputs
        assert srv.running.scheduler.queued_bytes() == 0
    with _start(tiny_repository, max_queued_bytes=limit) as srv, grpc.insecure_channel(srv.url) as channel:
        message = _refused(lambda: _stub(channel).ModelInfer(_request(junk_bytes=2 * limit), timeout=10),
                           grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "max_queued_bytes" in message, message


def test_admission_limits_have_documented_defaults():
    from lstm_onnx.server.settings import ServerSettings

    settings = ServerSettings(model_repository="r").validate()
    assert settings.max_queued_requests_per_model > 0 and settings.max_queued_requests > 0
    assert 0 < settings.max_queued_bytes_per_model <= settings.max_queued_bytes
    assert settings.sequences_per_client == settings.max_sequences // 4
    assert settings.streams_per_client == settings.max_concurrent_streams // 4
    with pytest.raises(ValueError, match="max_sequences_per_client"):
        ServerSettings(model_repository="r", max_sequences=4, max_sequences_per_client=5).validate()


def test_one_client_cannot_hold_every_sequence_slot(tiny_repository):
    from lstm_onnx.protocol.codec import SequenceControl

    with _start(tiny_repository, max_sequences=8, max_sequences_per_client=2) as srv, \
            grpc.insecure_channel(srv.url) as channel:
        stub = _stub(channel)
        for i in (1, 2):
            stub.ModelInfer(_request(sequence=SequenceControl(i, start=True)), timeout=10)
        message = _refused(lambda: stub.ModelInfer(_request(sequence=SequenceControl(3, start=True)), timeout=10),
                           grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "max_sequences_per_client" in message and "2 sequences" in message, message
        stub.ModelInfer(_request(sequence=SequenceControl(1)), timeout=10)  # its own keep going
        stub.ModelInfer(_request(sequence=SequenceControl(2, end=True)), timeout=10)
        stub.ModelInfer(_request(sequence=SequenceControl(3, start=True)), timeout=10)  # an ended one frees a slot


def test_one_client_cannot_hold_every_stream_slot(tiny_repository):
    with _start(tiny_repository, max_concurrent_streams=8, max_streams_per_client=2) as srv, \
            grpc.insecure_channel(srv.url) as channel:
        stub, release = _stub(channel), threading.Event()

        def held_open():
            yield _request()
            release.wait(30)

        holders = []
        for _ in range(2):
            call = stub.ModelStreamInfer(held_open(), timeout=30)
            assert not next(call).error_message
            holders.append(call)
        message = _refused(lambda: list(stub.ModelStreamInfer(iter([_request()]), timeout=10)),
                           grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "max_streams_per_client" in message, message
        release.set()
        for call in holders:
            list(call)
        assert not next(stub.ModelStreamInfer(iter([_request()]), timeout=10)).error_message


def test_an_idle_stream_is_ended_and_frees_its_slot(tiny_repository):
    with _start(tiny_repository, stream_idle_timeout_s=0.5, max_concurrent_streams=1,
                max_streams_per_client=1) as srv, grpc.insecure_channel(srv.url) as channel:
        stub, release = _stub(channel), threading.Event()

        def idle_after_one():
            yield _request()
            release.wait(30)

        try:
            call = stub.ModelStreamInfer(idle_after_one(), timeout=30)
            assert not next(call).error_message
            started = time.monotonic()
            message = _refused(lambda: list(call), grpc.StatusCode.DEADLINE_EXCEEDED)
            assert "stream_idle_timeout_s" in message and time.monotonic() - started < 10, message
        finally:
            release.set()
        _until(lambda: srv.running.servicer.open_streams == 0, "the idle stream's slot freed")
        assert not next(stub.ModelStreamInfer(iter([_request()]), timeout=10)).error_message


def test_a_busy_stream_is_not_idle(tiny_repository):
    with _start(tiny_repository, stream_idle_timeout_s=0.5) as srv, grpc.insecure_channel(srv.url) as channel:
        stub = _stub(channel)
        gate = _held(srv)

        def slow():  # the first request runs for longer than the idle timeout: not idle, it is waiting on us
            yield _request(value=MARK)
            yield _request()

        try:
            call = stub.ModelStreamInfer(slow(), timeout=30)
            time.sleep(1.0)
        finally:
            gate.close()
        responses = list(call)
        assert len(responses) == 2 and not any(r.error_message for r in responses)


def test_string_sequence_ids_are_capped(tiny_repository):
    from lstm_onnx.protocol.codec import MAX_SEQUENCE_ID_BYTES, SequenceControl
    from lstm_onnx.protocol.errors import InvalidArgument
    from lstm_onnx.protocol.rest_codec import decode_sequence_json

    assert MAX_SEQUENCE_ID_BYTES == 256
    with _start(tiny_repository) as srv, grpc.insecure_channel(srv.url) as channel:
        stub = _stub(channel)
        message = _refused(lambda: stub.ModelInfer(_request(sequence=SequenceControl("s" * 257, start=True)),
                                                   timeout=10), grpc.StatusCode.INVALID_ARGUMENT)
        assert "257 bytes" in message and "at most 256" in message, message
        assert len(srv.running.scheduler.sequences) == 0
        stub.ModelInfer(_request(sequence=SequenceControl("s" * 256, start=True, end=True)), timeout=10)
        # Bytes, not characters: 100 three-byte characters are 300 bytes.
        _refused(lambda: stub.ModelInfer(_request(sequence=SequenceControl("\u20ac" * 100, start=True)), timeout=10),
                 grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(InvalidArgument, match="at most 256 bytes"):
        decode_sequence_json({"sequence_id": "s" * 257, "sequence_start": True})


def test_rest_refuses_beyond_the_queue_limit_with_429_and_a_long_id_with_400(tiny_repository):
    import httpx

    def body(value: float = 0.5, **parameters) -> dict:
        return {"inputs": [{"name": "input", "shape": [1, 2, 1], "datatype": "FP32", "data": [value, value]}],
                "parameters": parameters}

    with _start(tiny_repository, http_port=0, max_queued_requests_per_model=1) as srv, \
            grpc.insecure_channel(srv.url) as channel, httpx.Client(timeout=30) as http:
        url = f"http://{srv.http_url}/v2/models/{MODEL}/infer"
        gate = _held(srv)
        try:
            waiting = _stub(channel).ModelInfer.future(_request(value=MARK), timeout=30)
            _until(lambda: srv.running.scheduler.in_flight == 1, "one request held")
            refused = http.post(url, json=body(MARK))
            assert refused.status_code == 429, refused.text
            assert "max_queued_requests_per_model" in refused.json()["error"]
        finally:
            gate.close()
        assert waiting.result().outputs
        assert http.post(url, json=body()).status_code == 200
        long_id = http.post(url, json=body(sequence_id="s" * 300, sequence_start=True))
        assert long_id.status_code == 400 and "at most 256 bytes" in long_id.json()["error"], long_id.text
        assert http.post(url, json=body()).status_code == 200  # and it serves on


def test_a_client_is_its_certificate_identity_else_its_address():
    from lstm_onnx.server.clients import client_of_grpc

    class Context:
        def __init__(self, peer, auth=None):
            self._peer, self._auth = peer, auth or {}

        def peer(self):
            return self._peer

        def auth_context(self):
            return self._auth

    assert client_of_grpc(Context("ipv4:10.1.2.3:50123")).key == "address 10.1.2.3"
    assert client_of_grpc(Context("ipv6:[::1]:50123")).address == "::1"
    authenticated = client_of_grpc(Context("ipv4:10.1.2.3:1", {"x509_common_name": [b"alice"]}))
    assert (authenticated.identity, authenticated.key) == ("alice", "identity 'alice'")
    assert client_of_grpc(None).identity == ""
