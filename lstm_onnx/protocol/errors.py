"""One exception hierarchy for the server; each error carries the gRPC status it maps to."""
from __future__ import annotations

import grpc

MAX_ECHO_CHARS = 256  # client text (a model, input or output name, a version) as an error quotes it
# A gRPC status message travels in a header, percent-encoded (3 bytes for each byte outside printable ASCII); past
# the peer's metadata limit (8 KiB soft, 16 KiB hard) the client sees RESOURCE_EXHAUSTED instead of the status.
MAX_STATUS_BYTES = 4096


class ServerError(Exception):
    """Base of every error a client can be told about; `code` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServerError):
    """The request is malformed: wrong shape, datatype, name, or parameters."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServerError):
    """No such model, version, or sequence."""

    code = grpc.StatusCode.NOT_FOUND


class Unavailable(ServerError):
    """The model is not ready, or the server is draining."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServerError):
    """A bounded resource is full (live sequences, queued requests or bytes, a client's share, streams)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(ServerError):
    """The authenticated client may not address this object (a sequence another identity started)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(ServerError):
    """The request is valid but its sequence is not in a state it can continue (ended before its turn)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ServerError):
    """A sequence step refused because an earlier step of its sequence was cancelled, timed out or failed:
    it would have run on the wrong state. The client restarts the sequence with sequence_start."""

    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(ServerError):
    """The request took longer than the server's request_timeout_s."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ServerError):
    """The model failed while running; a bug or a broken model, not the client's fault."""

    code = grpc.StatusCode.INTERNAL


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """Client-provided text as an error quotes it: at most `limit` characters, then an ellipsis and its length."""
    return text if len(text) <= limit else f"{text[:limit]}\u2026 ({len(text)} chars)"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and one-line message for any exception (the single place errors become statuses); the
    message fits MAX_STATUS_BYTES on the wire, whatever a client sent for it to quote."""
    if isinstance(exc, ServerError):
        return exc.code, _fit(str(exc))
    return grpc.StatusCode.INTERNAL, _fit(f"internal error: {type(exc).__name__}: {exc}")


def _fit(message: str, budget: int = MAX_STATUS_BYTES) -> str:
    """`message`, or its head and its length when it is longer than `budget` bytes percent-encoded."""
    head = message[:budget + 1]  # every character is at least one byte on the wire
    if len(head) == len(message) and _wire_bytes(head) <= budget:
        return message
    suffix = f"\u2026 ({len(message)} chars)"
    room, used = budget - _wire_bytes(suffix), 0
    for end, char in enumerate(head):
        used += _wire_bytes(char)
        if used > room:
            return head[:end] + suffix
    return head + suffix


def _wire_bytes(text: str) -> int:
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in text.encode("utf-8", "replace"))


# gRPC status -> HTTP status, as Triton's http_server.cc maps its error codes (INTERNAL 500, NOT_FOUND 404,
# UNAVAILABLE 503, UNIMPLEMENTED 501, the rest 400); the codes Triton has no counterpart for take the
# standard gRPC-to-HTTP mapping (RESOURCE_EXHAUSTED 429, DEADLINE_EXCEEDED 504, PERMISSION_DENIED 403).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}


def http_status_of(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and the same one-line message as status_of gives gRPC."""
    code, message = status_of(exc)
    return HTTP_STATUS.get(code, 400), message
