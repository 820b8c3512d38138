"""What the audit found, as plain data: the reports are rendered from these alone (imports nothing of ours)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ONNX's `direction` attribute -> the directions a node holds, in the order of its first axis.
DIRECTIONS = {"forward": ("forward",), "reverse": ("reverse",), "bidirectional": ("forward", "reverse")}


@dataclass
class Quantization:
    """How one gate (or head) tensor is stored as integers: value = (q - zero_point) * scale.

    `scale` and `zero_point` hold one value per row of the dequantized slice ([H] for a gate, [N] per
    column for a head matrix), so per-tensor and per-channel quantization read the same way.
    """

    q: np.ndarray  # the stored integers, in the dequantized slice's layout
    scale: np.ndarray
    zero_point: np.ndarray
    dtype: str  # int8 / uint8
    per_channel: bool
    tensors: tuple[str, str, str]  # names of the integer tensor, its scale and its zero point

    @property
    def q_range(self) -> tuple[int, int]:
        return (int(self.q.min()), int(self.q.max())) if self.q.size else (0, 0)

    def bound(self, shape: tuple[int, ...]) -> np.ndarray:
        """The largest rounding error each element can have: scale/2, broadcast to the slice's shape."""
        half = np.asarray(self.scale, np.float64) / 2
        return np.broadcast_to(half.reshape(half.shape + (1,) * (len(shape) - half.ndim)), shape)


@dataclass
class GateTensor:
    """One gate's slice of one fused tensor, with where it came from."""

    layer: int
    direction: str
    gate: str
    kind: str  # W [H, in], R [H, H], bW/bR [H], P [H]
    array: np.ndarray
    source: str  # name of the fused initializer / Constant it was sliced from
    index: str  # the slice inside `source`, e.g. "[0, 8:16, :]"
    quant: Quantization | None = None  # set when the model stores this slice as integers

    @property
    def key(self) -> str:
        return f"layer{self.layer}.{self.direction}.{self.gate}.{self.kind}"

    @property
    def params(self) -> int:
        return int(self.array.size)


class AuditInputError(ValueError):
    """The model or checkpoint given to the audit cannot be read at all (missing, not ONNX, not a run)."""


@dataclass
class Finding:
    """One thing the auditor should know; `severity` is error (exit 1), warning or info."""

    code: str
    severity: str
    message: str
    tensors: list[str] = field(default_factory=list)


@dataclass
class Layer:
    """One recurrent node, its resolved weights split per direction and gate."""

    index: int
    node: str
    op: str
    hidden_size: int
    input_size: int | None
    direction: str
    attributes: dict[str, Any]
    sources: dict[str, str | None]  # role -> resolved tensor name (None: input absent or not constant)
    reads: list[str]  # what feeds X, nearest first: ops between this layer and the previous one
    gates: list[GateTensor] = field(default_factory=list)
    params: int = 0
    op_type: str = ""  # the node's own op when it differs from the cell (com.microsoft.DynamicQuantizeLSTM)
    # role -> how the weight was reached when it is not a plain initializer/Constant: the folded ops
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"layer{self.index}"

    @property
    def directions(self) -> tuple[str, ...]:
        return DIRECTIONS[self.direction]


@dataclass
class HeadTensor:
    """A float initializer outside the recurrent nodes (the head and anything else with weights)."""

    name: str
    array: np.ndarray
    consumers: list[str]
    quant: Quantization | None = None
    origin: str = ""  # for an integer weight: the float tensor it was quantized from, by the quantizer's naming
    transposed: bool = False  # stored transposed against `origin` (onnxruntime turns Gemm transB=1 into MatMul)

    @property
    def params(self) -> int:
        return int(self.array.size)


@dataclass
class Audit:
    """Everything the audit found about one model; reports are rendered from this alone."""

    path: str
    producer: str
    layers: list[Layer]
    head: list[HeadTensor]
    contract: dict[str, Any] | None
    findings: list[Finding] = field(default_factory=list)
    # float initializers that are not parameters under the counting rule (heads.py), with the reason
    not_counted: list[tuple[str, str]] = field(default_factory=list)
    # key -> {"pytorch": "rnn.weight_ih_l0[0:8]", "identical": bool, "change": float | None}; None without --checkpoint
    checkpoint: dict[str, dict[str, Any]] | None = None
    checkpoint_path: str | None = None  # the run directory given as --checkpoint
    checkpoint_params: int | None = None
    # key -> {"max_abs", "relative", "bound_share", "changed", ...}; set by --against (see comparison.py)
    against: dict[str, dict[str, Any]] | None = None
    against_path: str | None = None
    structure: list[str] = field(default_factory=list)  # structural differences found by --against
    # key -> quantization error of an integer gate against its float original (--against FLOAT or --checkpoint)
    quant_errors: dict[str, dict[str, float]] | None = None
    # gate key -> the same slice at init (--checkpoint with init.safetensors) and in the old model (--against),
    # for the change heatmaps of --plot and --html
    init_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    old_arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def recurrent_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def head_params(self) -> int:
        return sum(t.params for t in self.head)

    @property
    def total_params(self) -> int:
        return self.recurrent_params + self.head_params

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def add(self, code: str, severity: str, message: str, tensors: list[str] | None = None) -> None:
        self.findings.append(Finding(code, severity, message, list(tensors or [])))
