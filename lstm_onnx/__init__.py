"""lstm-onnx: train a stacked LSTM/GRU, export it to ONNX with explicit LSTM ops, verify, audit and serve it.

Everything installs under this one namespace, mapped from the repository's top-level folders
(pyproject `package-dir`), so a user's own `model.py` or `server.py` can never shadow ours:

  lstm_onnx.contract   shared vocabulary (run-directory files, gate orders, ops, metadata key); numpy only
  lstm_onnx.errors     the CLI's user errors; imports nothing
  lstm_onnx.protos     generated KServe v2 / Triton stubs
  lstm_onnx.protocol   what server and client share: tensor codec, datatypes, error kinds
  lstm_onnx.model      torch network, data, training, run directory           (model/)
  lstm_onnx.export     torch -> ONNX, parity, verify, repository writer        (export/)
  lstm_onnx.export.audit  reading any ONNX recurrence, findings, provenance, reports; no torch
  lstm_onnx.server     onnxruntime server; no torch, model or export          (server/)
  lstm_onnx.client     v2 client, load generator, infer/stream/bench; no server

This module imports nothing of its own: `import lstm_onnx` is free.
"""
from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("lstm-onnx")
except _metadata.PackageNotFoundError:  # running from a tree that was never installed
    __version__ = "0+unknown"
