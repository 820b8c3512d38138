"""Subcommands `export`, `verify` and `audit`; parsers only here, the work happens in the handlers' modules."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from . import audit_cli

    audit_cli.add_parser(sub)
