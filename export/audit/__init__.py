"""The weight audit: which weights exist in an ONNX file, per layer, direction and gate, and where they came from.

Reads any ONNX model with LSTM/GRU nodes (ours or another tool's, float or onnxruntime-quantized).
Modules, each importing only those before it: `result` (plain data, nothing of ours), `gates` and
`external` (splitting, safe tensor reads), `quantized` (integer weights), `folding` (constant subgraphs),
`heads` (the counting rule), `shapes` (checks around each node), `graph` (resolving the recurrence),
`findings` (checks), `comparison` (--against), `provenance` (checkpoint comparison), `report`, `plot`
(--plot), `html` and `cli`. May import lstm_onnx.contract, onnx, numpy and (lazily) safetensors and matplotlib; never
torch, onnxruntime or the rest of export/ and server/.
"""
from __future__ import annotations

import os
from pathlib import Path

from .comparison import compare_models
from .findings import check_all
from .graph import read_graph
from .provenance import compare_checkpoint
from .result import Audit, AuditInputError, Finding

__all__ = ["Audit", "AuditInputError", "Finding", "audit_model"]


def audit_model(path: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                against: str | os.PathLike | None = None, fail_on_change: bool = False) -> Audit:
    """Audit every LSTM/GRU node of an ONNX model (float or onnxruntime-quantized).

    With `checkpoint` (a run directory) also trace provenance; with `against` (another ONNX file) compare
    gate by gate, and make CHANGED_GATES an error when `fail_on_change`.
    """
    audit = read_graph(path)
    check_all(audit)
    if checkpoint is not None:
        compare_checkpoint(audit, Path(checkpoint))
    if against is not None:
        old = read_graph(against)
        compare_models(audit, old, fail_on_change)
    return audit
