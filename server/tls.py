"""TLS for the gRPC port: server credentials from PEM files, optionally requiring client certificates."""
from __future__ import annotations

from pathlib import Path

import grpc


def _read(label: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{label} {path}: cannot read ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{label} {path}: got no PEM block, expected a PEM file")
    return data


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """Credentials for `add_secure_port`; with `client_ca`, a client must present a certificate that CA signed."""
    pair = (_read("tls_key", key), _read("tls_cert", cert))
    if client_ca:
        return grpc.ssl_server_credentials([pair], root_certificates=_read("tls_client_ca", client_ca),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


def channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """Client side: trust `ca`; present `cert`/`key` when the server asks for a client certificate."""
    return grpc.ssl_channel_credentials(root_certificates=_read("ca", ca),
                                        private_key=_read("key", key) if key else None,
                                        certificate_chain=_read("cert", cert) if cert else None)
