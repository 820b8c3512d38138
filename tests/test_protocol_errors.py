"""The error mapping on its own: every error class's gRPC code and HTTP status, bugs as INTERNAL, text that fits."""
from __future__ import annotations

import grpc
import pytest

from lstm_onnx.protocol import errors
from lstm_onnx.protocol.errors import MAX_ECHO_CHARS, MAX_STATUS_BYTES, clip, http_status_of, status_of

# Triton's http_server.cc mapping, and the standard gRPC->HTTP one for the two codes Triton lacks.
EXPECTED = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND, 404),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE, 503),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, 400),
    (errors.Aborted, grpc.StatusCode.ABORTED, 400),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (errors.Internal, grpc.StatusCode.INTERNAL, 500),
    (errors.ServerError, grpc.StatusCode.INTERNAL, 500),
]


@pytest.mark.parametrize("cls, code, http", EXPECTED, ids=[c.__name__ for c, _, _ in EXPECTED])
def test_each_error_class_maps_to_its_grpc_code_and_http_status(cls, code, http):
    assert status_of(cls("model 'm': bad")) == (code, "model 'm': bad")
    assert http_status_of(cls("model 'm': bad")) == (http, "model 'm': bad")


def test_unimplemented_is_501_over_http():
    assert errors.HTTP_STATUS[grpc.StatusCode.UNIMPLEMENTED] == 501


@pytest.mark.parametrize("exc", [ZeroDivisionError("boom"), KeyError("boom"), RuntimeError("boom")])
def test_an_exception_outside_our_classes_is_internal_naming_its_type(exc):
    code, message = status_of(exc)
    assert code == grpc.StatusCode.INTERNAL
    assert message == f"internal error: {type(exc).__name__}: {exc}"
    assert http_status_of(exc) == (500, message)


def test_clip_keeps_short_text_and_cuts_long_text_saying_its_length():
    assert clip("a" * MAX_ECHO_CHARS) == "a" * MAX_ECHO_CHARS
    assert clip("a" * (MAX_ECHO_CHARS + 1)) == "a" * MAX_ECHO_CHARS + f"\u2026 ({MAX_ECHO_CHARS + 1} chars)"
    assert clip("abcdef", 3) == "abc\u2026 (6 chars)"
    assert clip("abc", 3) == "abc"
    assert clip("ab", 3) == "ab" and clip("") == ""  # shorter than the limit: untouched too


def test_limits_stay_what_clients_are_told():
    # 4096 bytes of status text stay well under gRPC's 8 KiB soft metadata limit; 256 characters of echoed name
    # are what the gRPC and REST error tests (test_security_requests.py) rely on.
    assert (MAX_STATUS_BYTES, MAX_ECHO_CHARS) == (4096, 256)


def _wire(text: str) -> int:
    """Bytes of `text` percent-encoded in a gRPC status header, computed independently of errors.py."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in text.encode("utf-8"))


@pytest.mark.parametrize("char, width", [("a", 1), ("%", 3), ("\u00e9", 6), ("\u20ac", 9), ("\n", 3), ("~", 1),
                                         (" ", 1), ("\x7f", 3), ("\x1f", 3)])
def test_status_text_fits_the_header_budget_exactly(char, width):
    assert _wire(char) == width
    fits = char * (MAX_STATUS_BYTES // width)
    assert status_of(errors.InvalidArgument(fits))[1] == fits  # at the budget: untouched
    longer = fits + char * 2
    message = status_of(errors.InvalidArgument(longer))[1]
    suffix = f"\u2026 ({len(longer)} chars)"
    assert message.endswith(suffix) and set(message[:-len(suffix)]) == {char}
    assert _wire(message) <= MAX_STATUS_BYTES  # cut, and as long as the budget allows
    head = len(message) - len(suffix)
    assert _wire(char * (head + 1) + suffix) > MAX_STATUS_BYTES  # one more character would not have fitted


def test_status_text_cut_is_as_long_as_the_budget_allows():
    text = "x" * 10_000
    message = status_of(errors.NotFound(text))[1]
    suffix = "\u2026 (10000 chars)"
    assert message == "x" * (MAX_STATUS_BYTES - _wire(suffix)) + suffix
    assert _wire(message) == MAX_STATUS_BYTES
    small = errors._fit("y" * 50, budget=40)
    assert small == "y" * (40 - _wire("\u2026 (50 chars)")) + "\u2026 (50 chars)"
    assert errors._fit("y" * 40, budget=40) == "y" * 40
    assert errors._fit("y" * 41, budget=41) == "y" * 41  # an odd budget, filled exactly
    assert errors._fit("y" * 41, budget=40) == "y" * (40 - _wire("\u2026 (41 chars)")) + "\u2026 (41 chars)"


def test_undecodable_text_counts_replacement_bytes():
    lone = "\ud800"  # a lone surrogate: not encodable, replaced by '?' when measured
    assert errors._wire_bytes(lone) == 1 and errors._wire_bytes("ab") == 2 and errors._wire_bytes("%") == 3
