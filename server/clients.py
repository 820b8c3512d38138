"""Who sent a request: the client's TLS certificate identity when it has one, else its IP address.

A client's share of the sequence and stream slots is counted per `Client.key`. The key is the address, not the
connection, because connections are free to open: a client holding its share would simply open another. Behind a
proxy every client shares the proxy's address: give such a deployment client certificates, or raise the shares.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class Client:
    """One request's sender: `identity` is the authenticated certificate's subject CN ("" without mutual TLS)."""

    address: str = ""
    identity: str = ""

    @property
    def key(self) -> str:
        """What a client's shares are counted by: its identity when authenticated, else its address."""
        return f"identity {self.identity!r}" if self.identity else f"address {self.address}"


ANONYMOUS = Client()


def client_of_grpc(context: grpc.aio.ServicerContext | None) -> Client:
    """The client of a gRPC call: context.peer() is 'ipv4:1.2.3.4:port', 'ipv6:[::1]:port' or 'unix:path'."""
    if context is None:
        return ANONYMOUS
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    address = rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else peer
    names = (context.auth_context() or {}).get("x509_common_name") or []
    identity = names[0].decode("utf-8", "replace") if names else ""
    return Client(address, identity)


def client_of_http(request) -> Client:
    """The client of an aiohttp request: its remote address and, over mutual TLS, its certificate's CN."""
    identity = ""
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                identity = value
    return Client(request.remote or "", identity)
