"""Run memory: a run's peak memory estimated from the graph's recurrent nodes before onnxruntime runs it.

onnxruntime's CPU LSTM/GRU/RNN kernels allocate, for each node, its output Y [T, D, B, H] and a gates workspace
of [T, B, G*H] floats per direction (G gates: LSTM 4, GRU 3, RNN 1), and read an input X [T, B, I] that is the
transposed request (first layer) or the previous layer's Y laid out as [T, B, D*H]; a reverse direction adds a
reversed copy of X [T, B, I] and an output buffer [T, B, H]. Nodes run one after
another, so the peak is the largest node's X + Y + workspace, plus a merged run's padded input. Everything grows with
rows x steps, so a run's estimate is `rows * steps * step_bytes + FIXED_BYTES`. tests/test_server_memory.py
calibrates this against the resident memory a run adds; docs/reliability.md ("Limits") gives the error.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import onnx

from lstm_onnx.contract import ONNX_DOMAINS

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
FLOAT_BYTES = 4  # the kernels compute in float32 (quantized models dequantize to it)
FIXED_BYTES = 8 << 20  # per run besides the per-step terms: small tensors, the head, allocator slack (calibrated)
# Runs estimated above this hand their freed memory back to the OS (malloc_trim) when they end: glibc keeps
# freed blocks below its mmap threshold (which grows to 32 MB as large blocks are freed) in its heaps.
RELEASE_BYTES = 32 << 20


@dataclass(frozen=True)
class RecurrentNode:
    """One LSTM/GRU/RNN node's sizes, read from its weights: W is [D, G*H, I]."""

    op: str
    input_size: int  # I
    hidden_size: int  # H
    directions: int  # D

    @property
    def step_bytes(self) -> int:
        """Bytes per row per time step while this node runs: X + Y + gates workspace."""
        x = self.input_size
        y = self.directions * self.hidden_size
        gates = self.directions * GATES[self.op] * self.hidden_size
        # The reverse direction runs on a time-reversed copy of X and reverses its output back from a buffer.
        reverse = self.input_size + self.hidden_size if self.directions == 2 else 0
        return FLOAT_BYTES * (x + y + gates + reverse)


@dataclass(frozen=True)
class RunMemory:
    """How much memory a run of this model takes, as a function of its rows (B) and longest time axis (T)."""

    nodes: tuple[RecurrentNode, ...]
    input_features: int  # F of the time input

    @property
    def step_bytes(self) -> int:
        """Bytes per row per time step at the run's peak."""
        peak = max(node.step_bytes for node in self.nodes)
        return peak + FLOAT_BYTES * self.input_features  # a merged run's padded copy of the request

    def estimate(self, rows: int, steps: int) -> int:
        """Estimated peak bytes of one run of `rows` rows padded to `steps` steps."""
        return rows * steps * self.step_bytes + FIXED_BYTES

    def max_steps(self, rows: int, budget: int) -> int:
        """The longest time axis a run of `rows` rows may have within `budget` bytes (0: none fits)."""
        return max(0, (budget - FIXED_BYTES) // (rows * self.step_bytes))


def read_run_memory(model: onnx.ModelProto, input_features: int) -> RunMemory | None:
    """The run-memory model of a graph whose time input has `input_features` features (F), or None when it has
    no recurrent node whose hidden size can be read.

    Sizes come from the nodes' attributes; a node's input size from its W initializer, or, when W is computed
    (a quantized model dequantizes it), from the previous node's output (D*H) or F for the first.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    nodes: list[RecurrentNode] = []
    for node in model.graph.node:
        if node.domain not in ONNX_DOMAINS or node.op_type not in GATES:
            continue
        attrs = {a.name: a for a in node.attribute}
        hidden = attrs["hidden_size"].i if "hidden_size" in attrs else 0
        if hidden <= 0:
            return None
        directions = 2 if "direction" in attrs and attrs["direction"].s == b"bidirectional" else 1
        w = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if w is not None and len(w.dims) == 3:
            input_size = int(w.dims[2])
        else:
            input_size = nodes[-1].directions * nodes[-1].hidden_size if nodes else input_features
        nodes.append(RecurrentNode(node.op_type, input_size, int(hidden), directions))
    if not nodes:
        return None
    return RunMemory(tuple(nodes), input_features=input_features)


def _load_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call, and nothing held the same way
        return None


_malloc_trim = _load_trim()
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve blocks of `threshold` bytes and more from mmap, so freeing one returns it to the OS at once.

    glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB), after which runs'
    buffers come from the heap and stay resident when freed: under a stream of medium-sized runs (each below
    RELEASE_BYTES, so not trimmed) RSS then climbs above the run budget. Setting the threshold turns that
    adjustment off. Returns False where there is no glibc (nothing to set)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, threshold))


def release_free_memory() -> None:
    """Return the C heap's free memory to the OS (glibc malloc_trim over every arena); a no-op elsewhere."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def format_bytes(n: int) -> str:
    """Bytes for a message: 2.46 GB, 171 MB (decimal units, as RSS figures are quoted)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"
