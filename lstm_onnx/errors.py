"""User errors of the `lstm-onnx` command: each ends in one line on stderr and a documented exit code.

Imports nothing: every subcommand's handler (model/, export/, server/, client/) raises these.
"""
from __future__ import annotations


class UsageError(Exception):
    """A mistake in how the command was called: one line on stderr, exit 2."""


class CheckFailed(Exception):
    """A check the user asked for failed (parity, audit, bad data): one line on stderr, exit 1."""
