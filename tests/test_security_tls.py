"""TLS and mutual TLS on the gRPC port with a CA made here, loopback by default, and the limits that protect the server."""
from __future__ import annotations

import ipaddress
import socket
import threading

import grpc
import numpy as np
import pytest
from conftest import require_module
from reliability.fuzz import encode

from lstm_onnx.protos import grpc_service_pb2 as pb
from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

require_module("cryptography.x509", "cryptography is not installed (the test extra)")
from pki import issue as _issue  # noqa: E402
from pki import write as _write  # noqa: E402

MODEL = "tiny_lstm"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, two client certificates it signed, and one a stranger signed."""
    root = tmp_path_factory.mktemp("pki")
    ca, ca_key = _issue("test CA", ca=True)
    stranger, stranger_key = _issue("stranger CA", ca=True)
    files = {"ca": _write(root / "ca", ca, ca_key)[0]}
    files["server"] = _write(root / "server", *_issue("127.0.0.1", ca, ca_key, server=True))
    files["client"] = _write(root / "client", *_issue("client", ca, ca_key))
    files["other"] = _write(root / "other", *_issue("other client", ca, ca_key))  # a second identity, same CA
    files["rogue"] = _write(root / "rogue", *_issue("rogue", stranger, stranger_key))
    return files


def _serve(repository, **overrides):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    return BackgroundServer(ServerSettings(model_repository=str(repository), **{
        "grpc_port": 0, "metrics_port": -1, "http_port": -1, **overrides}))


def _infer(channel) -> np.ndarray:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    response = stub.ModelInfer(encode(MODEL, {"input": np.ones((1, 3, 1), np.float32)}), timeout=10)
    return np.frombuffer(response.raw_output_contents[0], np.float32)


def _secure(url: str, pki, client: str | None = None) -> grpc.Channel:
    from lstm_onnx.server.tls import channel_credentials

    cert, key = pki[client] if client else ("", "")
    # The certificate names 127.0.0.1; the URL is that address, so hostname checks really run.
    return grpc.secure_channel(url, channel_credentials(pki["ca"], cert, key))


def test_tls_serves_tls_clients_and_refuses_plaintext(tiny_repository, pki):
    with _serve(tiny_repository, tls_cert=pki["server"][0], tls_key=pki["server"][1]) as srv:
        with _secure(srv.url, pki) as channel:
            assert _infer(channel).shape == (4,)
        with grpc.insecure_channel(srv.url) as channel, pytest.raises(grpc.RpcError) as caught:
            _infer(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tiny_repository, pki):
    with _serve(tiny_repository, tls_cert=pki["server"][0], tls_key=pki["server"][1],
                tls_client_ca=pki["ca"]) as srv:
        with _secure(srv.url, pki, "client") as channel:
            assert _infer(channel).shape == (4,)
        for who in (None, "rogue"):
            with _secure(srv.url, pki, who) as channel, pytest.raises(grpc.RpcError) as caught:
                _infer(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, who


def test_tls_settings_must_come_in_pairs_and_name_readable_pem_files(tmp_path, pki):
    from lstm_onnx.server.settings import ServerSettings
    from lstm_onnx.server.tls import server_credentials

    for bad in ({"tls_cert": pki["server"][0]}, {"tls_key": pki["server"][1]}, {"tls_client_ca": pki["ca"]}):
        with pytest.raises(ValueError, match="tls"):
            ServerSettings(model_repository="r", **bad).validate()
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(ValueError, match="not.pem: got no PEM block"):
        server_credentials(str(tmp_path / "not.pem"), pki["server"][1])


def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback else address


def test_default_binding_is_loopback_only(tiny_repository):
    from lstm_onnx.server.settings import ServerSettings

    assert ServerSettings().host == "127.0.0.1"
    outward = _outward_address()
    with _serve(tiny_repository) as srv:
        with grpc.insecure_channel(srv.url) as channel:
            assert _infer(channel).shape == (4,)
        if outward is None:
            pytest.skip("no non-loopback address on this machine to try")
        with grpc.insecure_channel(f"{outward}:{srv.running.grpc_port}") as channel, \
                pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=3)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_concurrent_streams_beyond_the_limit_are_refused(tiny_repository):
    with _serve(tiny_repository, max_concurrent_streams=2, max_streams_per_client=2) as srv, grpc.insecure_channel(srv.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = encode(MODEL, {"input": np.ones((1, 2, 1), np.float32)})
        release = threading.Event()

        def held_open():  # one request, then the stream stays open until released
            yield request
            release.wait(30)

        holders = []
        for _ in range(2):
            call = stub.ModelStreamInfer(held_open(), timeout=30)
            assert not next(call).error_message
            holders.append(call)
        third = stub.ModelStreamInfer(iter([request]), timeout=10)
        with pytest.raises(grpc.RpcError) as caught:
            list(third)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_streams" in caught.value.details()
        release.set()
        for call in holders:
            list(call)  # the request iterators end: so do the streams
        assert not next(stub.ModelStreamInfer(iter([request]), timeout=10)).error_message


def test_request_deadline_setting_answers_deadline_exceeded_and_ends_the_sequence(tiny_repository):
    with _serve(tiny_repository, request_timeout_s=1e-6) as srv, grpc.insecure_channel(srv.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = encode(MODEL, {"input": np.ones((1, 2, 1), np.float32)})
        request.parameters["sequence_id"].int64_param = 7
        request.parameters["sequence_start"].bool_param = True
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "request_timeout_s" in caught.value.details()
        srv.call(_noop())
        assert len(srv.running.scheduler.sequences) == 0, "a timed-out sequence kept its stale state"


async def _noop() -> None:
    return None


def _step(seq_id, start: bool = False, end: bool = False, outputs: list[str] | None = None):
    from lstm_onnx.protocol.codec import SequenceControl, encode_request

    return encode_request(MODEL, {"input": np.ones((1, 2, 1), np.float32)}, outputs=outputs,
                          sequence=SequenceControl(seq_id, start, end))


def _mutual(tiny_repository, pki, **overrides):
    return _serve(tiny_repository, tls_cert=pki["server"][0], tls_key=pki["server"][1], tls_client_ca=pki["ca"],
                  **overrides)


def test_a_sequence_belongs_to_the_certificate_identity_that_started_it(tiny_repository, pki):
    with _mutual(tiny_repository, pki) as srv, _secure(srv.url, pki, "client") as mine, \
            _secure(srv.url, pki, "other") as theirs:
        owner, stranger = pb_grpc.GRPCInferenceServiceStub(mine), pb_grpc.GRPCInferenceServiceStub(theirs)
        owner.ModelInfer(_step("session-1", start=True), timeout=10)
        for what in (_step("session-1"), _step("session-1", outputs=["hn"]), _step("session-1", end=True),
                     _step("session-1", start=True)):
            with pytest.raises(grpc.RpcError) as caught:
                stranger.ModelInfer(what, timeout=10)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value.details()
            assert "another client identity" in caught.value.details() and "'other client'" in caught.value.details()
        stranger.ModelInfer(_step("session-2", start=True), timeout=10)  # its own ids are its own
        response = owner.ModelInfer(_step("session-1", end=True), timeout=10)  # the owner's log was untouched
        assert response.parameters["sequence_step"].int64_param == 2
        sequence = srv.running.scheduler.sequences._live[(MODEL, "session-2")]
        assert sequence.owner == "other client"


def test_a_client_share_of_sequences_is_counted_per_certificate_identity(tiny_repository, pki):
    with _mutual(tiny_repository, pki, max_sequences=8, max_sequences_per_client=1) as srv, \
            _secure(srv.url, pki, "client") as mine, _secure(srv.url, pki, "other") as theirs:
        first, second = pb_grpc.GRPCInferenceServiceStub(mine), pb_grpc.GRPCInferenceServiceStub(theirs)
        first.ModelInfer(_step(1, start=True), timeout=10)
        with pytest.raises(grpc.RpcError) as caught:
            first.ModelInfer(_step(2, start=True), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sequences_per_client" in caught.value.details()
        second.ModelInfer(_step(2, start=True), timeout=10)  # same address, another identity: its own share


def test_rest_refuses_another_identity_s_sequence_with_403(tiny_repository, pki):
    import ssl

    import httpx

    def context(client: str):
        c = ssl.create_default_context(cafile=pki["ca"])
        c.load_cert_chain(*pki[client])
        return c

    def body(start: bool = False, end: bool = False) -> dict:
        return {"inputs": [{"name": "input", "shape": [1, 2, 1], "datatype": "FP32", "data": [1.0, 1.0]}],
                "parameters": {"sequence_id": "rest-1", "sequence_start": start, "sequence_end": end}}

    with _mutual(tiny_repository, pki, http_port=0) as srv:
        url = f"https://{srv.http_url}/v2/models/{MODEL}/infer"
        with httpx.Client(verify=context("client"), timeout=30) as owner, \
                httpx.Client(verify=context("other"), timeout=30) as stranger:
            assert owner.post(url, json=body(start=True)).status_code == 200
            refused = stranger.post(url, json=body(end=True))
            assert refused.status_code == 403 and "another client identity" in refused.json()["error"], refused.text
            with _secure(srv.url, pki, "other") as channel, pytest.raises(grpc.RpcError) as caught:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_step("rest-1"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED  # the same owner over either protocol
            with _secure(srv.url, pki, "client") as channel:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_step("rest-1"), timeout=10)
            assert owner.post(url, json=body(end=True)).status_code == 200
