"""Structured log lines on stderr: key=value or JSON, one event per line."""
from __future__ import annotations

import json
import logging
import sys
import time


class StructuredFormatter(logging.Formatter):
    """`ts=... level=... msg="..." key=value` or the same as a JSON object; fields come from extra={"fields": {}}."""

    def __init__(self, style: str = "kv"):
        super().__init__()
        self.style_name = style

    def format(self, record: logging.LogRecord) -> str:
        event = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        event.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        if self.style_name == "json":
            return json.dumps(event, default=str)
        return " ".join(f"{k}={_kv(v)}" for k, v in event.items())


def _kv(value: object) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


def configure_logging(style: str = "kv", level: str = "INFO") -> None:
    """Send the server's logs to stderr in the chosen style (replaces earlier handlers of this logger)."""
    logger = logging.getLogger("lstm_onnx")
    logger.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter(style))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
