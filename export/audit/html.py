"""`audit --html FILE`: one self-contained page (inline CSS and PNG data URIs, no script, nothing fetched).

It shows what the text report shows (layout, layer tables, head, comparison, totals, findings) and
draws, per layer and direction, one heatmap per gate of W | R | b; with --checkpoint the change from
init.safetensors, with --against the change from the old model. matplotlib is imported lazily.
"""
from __future__ import annotations

import base64
import html
import io
import os

import numpy as np

from .gates import DISPLAY_ORDER, describe_layout
from .report import (
    against_table,
    head_table,
    layer_heading,
    layer_notes,
    layer_table,
    parameter_totals,
    sorted_findings,
)
from .result import Audit, Layer

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1b1b1b; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 28px; } h3 { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0 16px; font: 12px ui-monospace, monospace; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; white-space: nowrap; }
th { background: #f0f0f0; }
tr.error td { background: #fde2e2; } tr.warning td { background: #fff4d6; } tr.info td { background: #eef5ff; }
td.status-changed, td.status-added, td.status-removed, td.status-reshaped { color: #b00020; font-weight: bold; }
td.status-quantized { color: #7a5b00; } td.status-identical { color: #1e6b1e; }
.notes { font: 12px ui-monospace, monospace; color: #444; white-space: pre-wrap; }
.scroll { overflow-x: auto; }
img.heatmap { display: block; max-width: 100%; border: 1px solid #ddd; margin: 4px 0 12px; }
"""


def _table(headers: list[str], rows: list[list[str]], cls: str, status_col: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            attr = f' class="status-{html.escape(cell)}"' if i == status_col else ""
            cells.append(f"<td{attr}>{html.escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _heatmap(layer: Layer, direction: str, arrays: dict[tuple[str, str], np.ndarray], title: str,
             diverging: bool) -> str:
    """One row of panels, one per gate: W | R | bW | bR side by side, NaN columns as separators."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = DISPLAY_ORDER[layer.op]
    fig, axes = plt.subplots(1, len(gates), figsize=(3.4 * len(gates), 2.8), squeeze=False)
    h = layer.hidden_size
    for ax, gate in zip(axes[0], gates):
        blocks = []
        for kind in ("W", "R", "bW", "bR"):
            part = arrays.get((gate, kind))
            if part is None:
                continue
            if blocks:
                blocks.append(np.full((h, 1), np.nan))
            blocks.append(np.asarray(part, np.float64).reshape(h, -1))
        if not blocks:
            ax.axis("off")
            continue
        image = np.hstack(blocks)
        lim = float(np.nanmax(np.abs(image))) if np.isfinite(image).any() else 1.0
        lim = lim or 1.0
        cmap = plt.get_cmap("RdBu_r" if diverging else "viridis").copy()
        cmap.set_bad("0.25")
        im = ax.imshow(image, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_title(f"{gate}: W | R | bW | bR", fontsize=8)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046)
    same = all(not np.any(np.asarray(a, np.float64)) for a in arrays.values()) and "change" in title
    fig.suptitle(f"{layer.label} {direction}: {title}" + (" (no change: every value identical)" if same else ""),
                 fontsize=9)
    fig.tight_layout()
    uri = _png(fig)
    plt.close(fig)
    return (f'<img class="heatmap" alt="{html.escape(f"{layer.label} {direction} {title}")}" '
            f'src="{uri}">')


def _heatmaps(audit: Audit, layer: Layer) -> list[str]:
    out = []
    for direction in layer.directions:
        gates = [g for g in layer.gates if g.direction == direction and g.kind != "P"]
        if not gates:
            continue
        values = {(g.gate, g.kind): g.array for g in gates}
        out.append(_heatmap(layer, direction, values, "weights", True))
        init = {(g.gate, g.kind): g.array.astype(np.float64) - audit.init_arrays[g.key]
                for g in gates if g.key in audit.init_arrays}
        if init:
            out.append(_heatmap(layer, direction, init, "change from init (checkpoint)", True))
        old = {(g.gate, g.kind): g.array.astype(np.float64) - audit.old_arrays[g.key]
               for g in gates if g.key in audit.old_arrays}
        if old:
            title = f"change from {os.path.basename(audit.against_path or '')}"
            out.append(_heatmap(layer, direction, old, title, True))
    return out


def render_html(audit: Audit) -> str:
    """The whole report as one HTML string."""
    esc = html.escape
    parts = [f"<h1>ONNX weight audit: {esc(audit.path)}</h1>", f"<p>producer: {esc(audit.producer)}</p>"]
    findings = sorted_findings(audit)
    counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
    parts.append(f'<h2 id="findings">Findings: {counts["error"]} error(s), {counts["warning"]} warning(s), '
                 f'{counts["info"]} info</h2>')
    rows = "".join(f'<tr class="{esc(f.severity)}"><td>{esc(f.severity.upper())}</td><td>{esc(f.code)}</td>'
                   f"<td>{esc(f.message)}</td></tr>" for f in findings)
    parts.append(f'<table class="findings"><thead><tr><th>severity</th><th>code</th><th>message</th></tr></thead>'
                 f"<tbody>{rows}</tbody></table>")
    parts.append(f"<p>{esc(parameter_totals(audit))}</p>")
    seen: set[str] = set()
    for layer in audit.layers:
        if layer.gates and layer.op not in seen:
            seen.add(layer.op)
            lines = describe_layout(layer.op, layer.hidden_size, len(layer.directions), layer.input_size or 0,
                                    any(x.sources.get("P") for x in audit.layers))
            parts.append(f'<h2>Where the {esc(layer.op)} gates live</h2>'
                         f'<div class="notes">{esc(chr(10).join(lines))}</div>')
    for layer in audit.layers:
        parts.append(f'<h2 id="{esc(layer.label)}">{esc(layer_heading(layer))}</h2>')
        reads = " <- ".join(layer.reads)
        parts.append(f'<div class="notes">{esc(chr(10).join(layer_notes(layer) + [f"reads: {reads}"]))}</div>')
        if not layer.gates:
            parts.append("<p>(weights could not be resolved; see findings)</p>")
            continue
        parts.append(_table(*layer_table(audit, layer), cls="gates"))
        parts += _heatmaps(audit, layer)
    parts.append("<h2>Other parameters</h2>")
    parts.append(_table(*head_table(audit), cls="head") if audit.head else "<p>none</p>")
    if audit.not_counted:
        items = "".join(f"<li>{esc(n)}: {esc(w)}</li>" for n, w in audit.not_counted)
        parts.append(f"<p>Not parameters (the counting rule of docs/contract.md):</p><ul>{items}</ul>")
    if audit.against is not None:
        parts.append(f'<h2 id="against">Against {esc(audit.against_path or "")}</h2>')
        structure = audit.structure or ["same (layers, cell, hidden size, directions, input size, head)"]
        parts.append("<ul>" + "".join(f"<li>structure: {esc(s)}</li>" for s in structure) + "</ul>")
        parts.append(_table(*against_table(audit), cls="against", status_col=1))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>ONNX weight audit: {esc(os.path.basename(audit.path))}</title><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def write_html(audit: Audit, path: str | os.PathLike) -> None:
    """Write render_html(audit) to `path` (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(audit))
