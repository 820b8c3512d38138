"""`audit --plot FILE.png`: per layer, direction and gate, W | R | b as heatmaps, and with --checkpoint trained - init.

One row of panels per layer and direction, one panel per gate; with init.safetensors beside the checkpoint a
second row below it draws the change training made. All value panels share one symmetric colour scale, all
change panels another. matplotlib (Agg canvas, no pyplot, no display) is imported lazily.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from lstm_onnx.contract import INIT_FILE
from lstm_onnx.contract import ONNX_GATE_ORDER as ONNX_ORDER

from .gates import DISPLAY_ORDER, LETTERS
from .result import Audit, Layer

# Row kind -> its colour map and colourbar label: one symmetric scale for each.
SCALES = {"value": ("RdBu_r", "weight value (one scale for every W, R, b panel)"),
          "change": ("PuOr_r", "trained - init (one scale for every change panel)")}
PANEL_W, PANEL_H, BAR_H = 3.4, 2.5, 0.3  # inches per panel; the colourbar row, in panel heights
MIN_MATRIX, MIN_VECTOR, GAP = 0.3, 0.14, 0.08  # block widths drawn, as fractions of the widest block
# What a panel draws, in order: (name, kinds of the audit summed into it).
BLOCKS = (("W", ("W",)), ("R", ("R",)), ("b", ("bW", "bR")), ("P", ("P",)))


def _gate_blocks(parts: dict[str, np.ndarray], h: int) -> list[tuple[str, np.ndarray]]:
    """W [h, in], R [h, h], b = bW + bR [h, 1] and P [h, 1] of one gate, those it has."""
    out = []
    for name, kinds in BLOCKS:
        present = [parts[k] for k in kinds if k in parts]
        if present:
            out.append((name, np.sum([np.asarray(a, np.float64) for a in present], axis=0).reshape(h, -1)))
    return out


def _rows(audit: Audit) -> list[tuple[Layer, str, str, dict[str, list[tuple[str, np.ndarray]]]]]:
    """(layer, direction, "value" | "change", gate -> blocks) per row of panels, change rows below their values."""
    rows = []
    for layer in audit.layers:
        for direction in layer.directions:
            gates = [g for g in layer.gates if g.direction == direction]
            if not gates:
                continue
            values, changes = {}, {}
            for gate in DISPLAY_ORDER[layer.op]:
                mine = {g.kind: g for g in gates if g.gate == gate}
                values[gate] = _gate_blocks({k: g.array for k, g in mine.items()}, layer.hidden_size)
                # A block's change is drawn only when every tensor summed into it has its init value.
                moved = {k: np.asarray(g.array, np.float64) - audit.init_arrays[g.key]
                         for k, g in mine.items() if g.key in audit.init_arrays}
                changes[gate] = [(name, block) for name, block in _gate_blocks(moved, layer.hidden_size)
                                 if all(k in moved for k in dict(BLOCKS)[name] if k in mine)]
            rows.append((layer, direction, "value", values))
            if any(changes.values()):
                rows.append((layer, direction, "change", changes))
    return rows


def _limit(rows: list, what: str) -> float:
    """The largest finite |value| over every block of the rows of one kind (0.0 when there is none)."""
    finite = [np.abs(b[np.isfinite(b)]) for _, _, w, gates in rows if w == what
              for blocks in gates.values() for _, b in blocks]
    return max((float(a.max()) for a in finite if a.size), default=0.0)


def _change_note(audit: Audit, drawn: bool) -> str:
    """The second title line: whether the change from init is drawn, and if not why."""
    if audit.checkpoint is None:
        return "no --checkpoint: pass the run directory to also draw the change from init (was it trained?)"
    where = audit.checkpoint_path or "the run directory"
    if drawn:
        quantized = any(x.op_type for x in audit.layers)
        return (f"below each row: trained - init, from {INIT_FILE} in {where}"
                + (" (dequantized weights: includes up to scale/2 of rounding)" if quantized else ""))
    if any(f.code == "UNTRAINED_UNKNOWN" for f in audit.findings):
        return f"{where} has no {INIT_FILE}: the change from init (was it trained?) cannot be drawn"
    return f"the checkpoint {where} does not match this model (see findings): no change from init drawn"


def _draw_panel(ax, blocks: list[tuple[str, np.ndarray]], h: int, norm, cmap) -> None:
    """The blocks of one gate side by side, each at least a readable width, outlined, ticked with name and shape."""
    from matplotlib.patches import Rectangle

    widest = max(b.shape[1] for _, b in blocks)
    x, ticks, labels = 0.0, [], []
    for name, block in blocks:
        cols = block.shape[1]
        width = max(cols, widest * (MIN_VECTOR if name in ("b", "P") else MIN_MATRIX))
        image = ax.imshow(np.ma.masked_invalid(block), cmap=cmap, norm=norm, extent=(x, x + width, h, 0),
                          aspect="auto", interpolation="nearest")
        image.set_label(name)
        ax.add_patch(Rectangle((x, 0), width, h, fill=False, edgecolor="0.35", linewidth=0.6))
        ticks.append(x + width / 2)
        labels.append(f"{name}\n{h}×{cols}" if name in ("W", "R") else f"{name}\n{h}")
        x += width + widest * GAP
    ax.set_xlim(-widest * GAP / 2, x - widest * GAP / 2)
    ax.set_ylim(h, 0)
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.tick_params(axis="x", length=0)
    step = max(1, int(np.ceil(h / 4)))
    ax.set_yticks([t + 0.5 for t in range(0, h, step)], [str(t) for t in range(0, h, step)], fontsize=7)
    ax.set_frame_on(False)


def _panel_title(layer: Layer, direction: str, gate: str, what: str, blocks: list) -> tuple[str, str]:
    """Layer, direction and gate, then where its rows sit in ONNX's W and R, or the change; and the title colour."""
    h, d = layer.hidden_size, layer.directions.index(direction)
    start = ONNX_ORDER[layer.op].index(gate) * h
    head = f"{layer.label} {direction} · {gate} ({LETTERS[layer.op][gate]})"
    if what == "value":
        return f"{head}\nONNX W, R [{d}, {start}:{start + h}, :]", "black"
    if blocks and all(not np.any(b) for _, b in blocks):
        return f"{head}\ntrained - init: UNCHANGED", "#b00020"
    return f"{head}\ntrained - init", "black"


def plot_figure(audit: Audit) -> Any:
    """The --plot figure (a matplotlib Figure on an Agg canvas); ValueError when no gate could be resolved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    rows = _rows(audit)
    if not rows:
        raise ValueError("--plot: the model has no resolved recurrent gates to draw")
    cols = max(len(DISPLAY_ORDER[layer.op]) for layer, *_ in rows)
    kinds = ["value"] + (["change"] if any(what == "change" for _, _, what, _ in rows) else [])
    fig = Figure(figsize=(PANEL_W * cols, PANEL_H * (len(rows) + BAR_H) + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    fig.get_layout_engine().set(wspace=0.08)
    grid = fig.add_gridspec(len(rows) + 1, cols, height_ratios=[BAR_H] + [1] * len(rows))
    # The colourbars side by side above the panels: their size does not grow with the number of rows.
    top = grid[0, :].subgridspec(1, 2, wspace=0.1) if len(kinds) == 2 else \
        grid[0, :].subgridspec(1, 3, width_ratios=[1, 2, 1])
    slots = [top[0, 0], top[0, 1]] if len(kinds) == 2 else [top[0, 1]]
    scales = {}
    for slot, what in zip(slots, kinds):
        cmap, label = SCALES[what]
        lim = _limit(rows, what) or 1.0  # all zero: any symmetric scale draws it white
        scales[what] = (Normalize(-lim, lim), _cmap(cmap))
        bar = fig.colorbar(ScalarMappable(*scales[what]), cax=fig.add_subplot(slot), orientation="horizontal")
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    nonfinite = False
    for r, (layer, direction, what, gates) in enumerate(rows):
        for c in range(cols):
            ax = fig.add_subplot(grid[r + 1, c])
            if c >= len(DISPLAY_ORDER[layer.op]):  # a GRU row in a figure that also has LSTM layers
                ax.axis("off")
                continue
            gate = DISPLAY_ORDER[layer.op][c]
            blocks = gates[gate]
            title, colour = _panel_title(layer, direction, gate, what, blocks)
            ax.set_title(title, fontsize=8, color=colour)
            if not blocks:
                ax.text(0.5, 0.5, "no init value" if what == "change" else "not resolved", ha="center",
                        va="center", fontsize=8, transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            nonfinite |= any(not np.isfinite(b).all() for _, b in blocks)
            _draw_panel(ax, blocks, layer.hidden_size, *scales[what])
            if c == 0:
                ax.set_ylabel("hidden unit", fontsize=8)
            else:  # one hidden size per row: the first panel's unit numbers hold for the whole row
                ax.tick_params(axis="y", labelleft=False)
    ops = "/".join(sorted({f"{x.op_type} (dequantized)" if x.op_type else x.op for x, *_ in rows}))
    peepholes = " | P (peepholes)" if any(g.kind == "P" for x, *_ in rows for g in x.gates) else ""
    lines = [f"{os.path.basename(audit.path)}: {ops} weights per layer, direction and gate: "
             f"W [hidden × input] | R [hidden × hidden] | b = bW + bR{peepholes}", _change_note(audit, len(kinds) == 2)]
    if len(kinds) == 2 and not _limit(rows, "change"):
        lines.append(f"every drawn gate equals {INIT_FILE}: training did not move any of these weights")
    skipped = [x.label for x in audit.layers if not x.gates]
    if skipped:
        lines.append(f"not drawn ({', '.join(skipped)}): weights not resolved, see findings")
    if nonfinite:
        lines.append("NaN/Inf drawn black (see the NONFINITE finding)")
    fig.suptitle("\n".join(lines), fontsize=9)
    return fig


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="black")


def write_plot(audit: Audit, path: str | os.PathLike) -> None:
    """Save plot_figure(audit) as a PNG."""
    fig = plot_figure(audit)
    fig.savefig(path, format="png", dpi=100)
