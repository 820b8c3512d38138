"""Integer weights as onnxruntime's quantizer writes them: DynamicQuantizeLSTM and integer MatMul heads.

Every stored integer is read back as `(q - zero_point) * scale`, with one scale and zero point per
direction (per tensor) or per output row (per channel), and kept beside the float value so the report
can show each gate's integer range, scale and zero point, and the rounding bound scale/2.
"""
from __future__ import annotations

import numpy as np

from .gates import GateShapeError
from .result import GateTensor, Quantization

# DynamicQuantizeLSTM's inputs (com.microsoft contrib op spec): the LSTM's eight, then the weights' scales
# and zero points. W is stored transposed as [D, input, 4H] and R as [D, H, 4H].
QUANT_ROLES = {"W_scale": 8, "W_zero_point": 9, "R_scale": 10, "R_zero_point": 11}
INTEGER_DTYPES = (np.int8, np.uint8)


def dequantize_recurrent(
    node: str, role: str, q: np.ndarray, scale: np.ndarray | None, zero_point: np.ndarray | None, gates: int,
    names: tuple[str, str, str],
) -> tuple[np.ndarray, Quantization]:
    """One DynamicQuantizeLSTM weight ([D, in, G*H] integers) as the spec's float layout [D, G*H, in].

    The returned Quantization holds q, scale and zero point per row of that layout ([D, G*H, in] and
    [D, G*H]); raises GateShapeError when a shape or dtype contradicts the contrib op spec.
    """
    where = f"{node} {role} '{names[0]}'"
    if q.dtype not in INTEGER_DTYPES:
        raise GateShapeError(f"{where}: got dtype {q.dtype}, expected int8 or uint8 (a quantized weight)")
    if q.ndim != 3 or q.shape[2] % gates:
        raise GateShapeError(f"{where}: got shape {list(q.shape)}, expected [directions, input, {gates}*hidden]")
    d, rows = q.shape[0], q.shape[2]
    if scale is None:
        raise GateShapeError(f"{where}: no {role}_scale, expected a float tensor [{d}] or [{d}, {rows}]")
    scale = np.asarray(scale, np.float32)
    zero_point = np.zeros(scale.shape, q.dtype) if zero_point is None else np.asarray(zero_point)
    if scale.shape not in ((d,), (d, rows)):
        raise GateShapeError(f"{node} {role}_scale '{names[1]}': got shape {list(scale.shape)}, "
                             f"expected [{d}] (per tensor) or [{d}, {rows}] (per channel)")
    if zero_point.shape != scale.shape:
        raise GateShapeError(f"{node} {role}_zero_point '{names[2]}': got shape {list(zero_point.shape)}, "
                             f"expected {list(scale.shape)} like its scale")
    per_channel = scale.ndim == 2
    row_scale = np.broadcast_to(scale.reshape(d, -1), (d, rows))
    row_zp = np.broadcast_to(zero_point.reshape(d, -1), (d, rows))
    q_rows = np.ascontiguousarray(np.transpose(q, (0, 2, 1)))  # (D, G*H, in)
    value = (q_rows.astype(np.float32) - row_zp[:, :, None].astype(np.float32)) * row_scale[:, :, None]
    value = value.astype(np.float32)
    return value, Quantization(q_rows, np.array(row_scale), np.array(row_zp), str(q.dtype), per_channel, names)


def attach_quantization(gates: list[GateTensor], role: str, quant: Quantization) -> None:
    """Give each W or R gate slice its integers, scales and zero points, and point its index at the stored layout."""
    kind = role  # "W" or "R"
    for g in gates:
        if g.kind != kind:
            continue
        # g.index is "[d, a:b, :]" in the spec's layout; the stored integers are transposed: [d, :, a:b].
        d, span = g.index.strip("[]").split(", ")[:2]
        lo, hi = (int(x) for x in span.split(":"))
        di = int(d)
        g.quant = Quantization(quant.q[di, lo:hi], quant.scale[di, lo:hi], quant.zero_point[di, lo:hi], quant.dtype,
                               quant.per_channel, quant.tensors)
        g.source = quant.tensors[0]
        g.index = f"[{di}, :, {lo}:{hi}]"


def dequantize_matrix(name: str, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
                      names: tuple[str, str, str]) -> tuple[np.ndarray, Quantization]:
    """A MatMulInteger/DynamicQuantizeMatMul weight [K, N]: scale and zero point per tensor or per column.

    The Quantization is kept in the transposed [N, K] layout so that, as for gates, one scale belongs to
    one row; the returned float value keeps the stored [K, N] layout.
    """
    if q.dtype not in INTEGER_DTYPES or q.ndim != 2:
        raise GateShapeError(f"quantized weight '{name}': got {q.dtype} {list(q.shape)}, expected int8/uint8 [K, N]")
    n = q.shape[1]
    scale = np.asarray(scale, np.float32).reshape(-1)
    zero_point = np.zeros(scale.shape, q.dtype) if zero_point is None else np.asarray(zero_point).reshape(-1)
    if scale.size not in (1, n) or zero_point.size != scale.size:
        raise GateShapeError(f"quantized weight '{name}': scale {scale.size} / zero point {zero_point.size} values, "
                             f"expected 1 (per tensor) or {n} (per column) each")
    col_scale = np.broadcast_to(scale, (n,))
    col_zp = np.broadcast_to(zero_point, (n,))
    value = ((q.astype(np.float32) - col_zp.astype(np.float32)) * col_scale).astype(np.float32)
    return value, Quantization(np.ascontiguousarray(q.T), np.array(col_scale), np.array(col_zp), str(q.dtype),
                               scale.size > 1, names)
