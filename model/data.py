"""Training data: the embedded default task (noisy sine-frequency classification) and user .npz/.csv files."""
from __future__ import annotations

import csv
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lstm_onnx.contract import file_digest

DEFAULT_TASK = "sine-frequency"
# Frequencies in cycles per time step. Close enough that one period does not tell them apart under the
# noise and random phase/amplitude: the network has to integrate over many steps, i.e. needs memory.
DEFAULT_FREQUENCIES = (0.05, 0.07, 0.09, 0.11)
DEFAULT_TASK_PARAMS: dict[str, Any] = {
    "num_sequences": 3000,
    "seq_len": 64,
    "frequencies": list(DEFAULT_FREQUENCIES),
    "noise": 0.5,
}

CSV_FORMAT_HELP = (
    "CSV: one row per sequence with a header row. Label columns come first: 'y' for one label (a class "
    "index 0..C-1, or one regression value), or 'y0,y1,...,y{K-1}' for K regression values. The remaining "
    "columns hold the sequence, time-major, named 't{t}_f{f}': t0_f0,t0_f1,...,t0_f{F-1},t1_f0,... "
    "so T and F are read from the header."
)
NPZ_FORMAT_HELP = "NPZ: arrays 'x' [N, T, F] (float) and 'y' [N] (integer classes or float values) or [N, K] (floats)."

_LABEL_RE = re.compile(r"^y(\d*)$")
_VALUE_RE = re.compile(r"^t(\d+)_f(\d+)$")


class DataError(ValueError):
    """Training data is unreadable or malformed; the message names the file and the problem."""


@dataclass
class Dataset:
    """Sequences and targets, ready for training.

    x: (N, T, F) float32. y: (N,) int64 class indices for classification, (N, K) float32 for regression.
    """

    x: np.ndarray
    y: np.ndarray
    task: str
    num_outputs: int
    spec: dict[str, Any] = field(default_factory=dict)  # what config.json records as "dataset"

    @property
    def input_size(self) -> int:
        return int(self.x.shape[2])

    def __len__(self) -> int:
        return int(self.x.shape[0])


def make_default_task(seed: int, **params: Any) -> Dataset:
    """Generate the default task: which of 4 frequencies does a noisy, phase-shifted sine wave have?

    Deterministic from `seed`; `params` override DEFAULT_TASK_PARAMS (num_sequences, seq_len, frequencies, noise).
    """
    unknown = sorted(set(params) - set(DEFAULT_TASK_PARAMS))
    if unknown:
        raise DataError(f"default task {DEFAULT_TASK!r}: unknown parameters {unknown}, expected {sorted(DEFAULT_TASK_PARAMS)}")
    p = {**DEFAULT_TASK_PARAMS, **params}
    n, seq_len, noise = int(p["num_sequences"]), int(p["seq_len"]), float(p["noise"])
    freqs = np.asarray(p["frequencies"], dtype=np.float64)
    if n < 2 or seq_len < 1 or freqs.size < 2:
        raise DataError(f"default task {DEFAULT_TASK!r}: got {p}, expected num_sequences >= 2, seq_len >= 1, 2+ frequencies")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, freqs.size, size=n)
    phase = rng.uniform(0.0, 2.0 * math.pi, size=n)
    amplitude = rng.uniform(0.5, 1.5, size=n)
    t = np.arange(seq_len)
    wave = np.sin(2.0 * math.pi * freqs[y][:, None] * t[None, :] + phase[:, None])  # (N, T)
    x = amplitude[:, None] * wave + noise * rng.standard_normal((n, seq_len))
    spec = {"kind": "default", "name": DEFAULT_TASK, **p, "seed": int(seed)}
    return Dataset(x=x[:, :, None].astype(np.float32), y=y.astype(np.int64), task="classification",
                   num_outputs=int(freqs.size), spec=spec)


def load_data(path: str | Path, task: str | None = None, num_classes: int | None = None) -> Dataset:
    """Read and check a user's .npz or .csv file (formats in NPZ_FORMAT_HELP / CSV_FORMAT_HELP).

    The task is inferred unless given: integer y [N] -> classification; float y or y [N, K] -> regression.
    Raises DataError naming the file and the problem; reads nothing else and writes nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path}: not found")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y = _read_npz(path)
    elif suffix == ".csv":
        x, y = _read_csv(path)
    else:
        raise DataError(f"data file {path}: got suffix {path.suffix!r}, expected .npz or .csv")
    x, y, task, num_outputs = check_arrays(x, y, str(path), task=task, num_classes=num_classes)

    spec = {"kind": "file", "path": str(path), "format": suffix[1:], "sha256": file_digest(path),
            "num_sequences": int(x.shape[0]), "seq_len": int(x.shape[1])}
    return Dataset(x=x, y=y, task=task, num_outputs=num_outputs, spec=spec)


def check_arrays(x: np.ndarray, y: np.ndarray, name: str, task: str | None = None,
                 num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, str, int]:
    """Check shapes, values and labels; return (x float32, y, task, num_outputs). Errors name `name`."""
    if x.dtype.kind not in "biuf":
        raise DataError(f"data file {name}: 'x' has dtype {x.dtype}, expected numbers")
    if y.dtype.kind not in "biuf":
        raise DataError(f"data file {name}: 'y' has dtype {y.dtype}, expected numbers")
    if x.ndim != 3:
        raise DataError(f"data file {name}: 'x' has shape {list(x.shape)}, expected [N, T, F]")
    if y.ndim not in (1, 2):
        raise DataError(f"data file {name}: 'y' has shape {list(y.shape)}, expected [N] or [N, K]")
    if x.shape[0] == 0 or 0 in x.shape or 0 in y.shape:
        raise DataError(f"data file {name}: empty ('x' {list(x.shape)}, 'y' {list(y.shape)}), expected at least one sequence")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"data file {name}: 'x' has {x.shape[0]} sequences but 'y' has {y.shape[0]}, expected the same N")
    if x.shape[0] < 2:
        raise DataError(f"data file {name}: got 1 sequence, expected at least 2 (one to train, one to validate)")
    for key, arr in (("x", x), ("y", y)):
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))[0].tolist()
            raise DataError(f"data file {name}: '{key}' holds NaN or Inf (first at index {bad}), expected finite values")
    integer_y = y.dtype.kind in "biu"
    task_given = task
    if task is None:
        task = "classification" if integer_y and y.ndim == 1 else "regression"
    if task == "classification":
        if y.ndim != 1:
            raise DataError(f"data file {name}: classification needs 'y' [N] class indices, got shape {list(y.shape)}")
        if not integer_y and not np.array_equal(y, np.round(y)):
            raise DataError(f"data file {name}: classification labels must be integers 0..C-1, got non-integer values")
        labels = y.astype(np.int64)
        lowest, highest = int(labels.min()), int(labels.max())
        classes = num_classes if num_classes is not None else highest + 1
        if lowest < 0 or highest >= classes:
            hint = ("; if these are values to predict, not classes, add --task regression"
                    if task_given is None else "")
            raise DataError(f"data file {name}: class labels range over {lowest}..{highest}, expected integers "
                            f"0..{classes - 1}{hint}")
        if classes < 2:
            raise DataError(f"data file {name}: only class 0 present, expected at least 2 classes")
        return x.astype(np.float32), labels, task, int(classes)
    if task != "regression":
        raise DataError(f"task: got {task!r}, expected classification or regression")
    values = y.astype(np.float32).reshape(y.shape[0], -1)  # (N, K)
    return x.astype(np.float32), values, task, int(values.shape[1])


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # np.load falls back to unpickling anything that is not a zip; check first so the message says what it is
    if not zipfile.is_zipfile(path):
        raise DataError(f"data file {path}: not a readable .npz archive, expected a zip of .npy arrays (np.savez)")
    try:
        # allow_pickle=False: an object array in a user file must not run code on load
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise DataError(f"data file {path}: missing arrays {missing}, found {sorted(archive.files)}; {NPZ_FORMAT_HELP}")
            return np.asarray(archive["x"]), np.asarray(archive["y"])
    except DataError:
        raise
    except ValueError as exc:  # object arrays refused by allow_pickle=False, or a corrupt member
        raise DataError(f"data file {path}: unreadable array ({exc}); expected numeric arrays") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"data file {path}: not a readable .npz archive ({exc})") from None
    except Exception as exc:  # zipfile.BadZipFile and friends from a truncated or foreign file
        raise DataError(f"data file {path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from None


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except UnicodeDecodeError:
        raise DataError(f"data file {path}: not UTF-8 text, expected CSV") from None
    if not rows:
        raise DataError(f"data file {path}: empty, expected a header row and one row per sequence")
    header = [h.strip() for h in rows[0]]
    label_count = 0
    while label_count < len(header) and _LABEL_RE.match(header[label_count]):
        label_count += 1
    if label_count == 0:
        raise DataError(f"data file {path}: header starts with {header[0]!r}, expected label column 'y' or 'y0'; {CSV_FORMAT_HELP}")
    labels = header[:label_count]
    if labels != ["y"] and labels != [f"y{k}" for k in range(label_count)]:
        raise DataError(f"data file {path}: label columns {labels}, expected ['y'] or ['y0', 'y1', ...]")
    steps: list[tuple[int, int]] = []
    for col in header[label_count:]:
        m = _VALUE_RE.match(col)
        if not m:
            raise DataError(f"data file {path}: column {col!r}, expected 't{{t}}_f{{f}}' after the labels; {CSV_FORMAT_HELP}")
        steps.append((int(m.group(1)), int(m.group(2))))
    if not steps:
        raise DataError(f"data file {path}: no sequence columns, expected 't0_f0', ... after the labels")
    num_t, num_f = max(s[0] for s in steps) + 1, max(s[1] for s in steps) + 1
    expected = [(t, f) for t in range(num_t) for f in range(num_f)]
    if steps != expected:
        missing = [f"t{t}_f{f}" for t, f in expected if (t, f) not in set(steps)]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DataError(f"data file {path}: missing column{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing[:3])}{more}; expected t0_f0..t{num_t - 1}_f{num_f - 1}")
        raise DataError(f"data file {path}: sequence columns are not t0_f0..t{num_t - 1}_f{num_f - 1} in time-major order")
    body = rows[1:]
    if not body:
        raise DataError(f"data file {path}: header only, expected one row per sequence")
    width = len(header)
    label_tokens: list[list[str]] = []
    values = np.empty((len(body), width - label_count), dtype=np.float64)
    for i, row in enumerate(body):
        line = i + 2
        if len(row) != width:
            raise DataError(f"data file {path}: line {line} has {len(row)} fields, expected {width} like the header")
        label_tokens.append([c.strip() for c in row[:label_count]])
        try:
            values[i] = [float(c) for c in row[label_count:]]
        except ValueError:
            bad = next(c for c in row[label_count:] if not _is_float(c))
            raise DataError(f"data file {path}: line {line}: value {bad.strip()!r} is not a number") from None
    y = _parse_labels(label_tokens, path)
    x = values.reshape(len(body), num_t, num_f)  # (N, T, F)
    if label_count > 1 or y.dtype.kind == "f":
        y = y.astype(np.float64)
    return x, (y[:, 0] if label_count == 1 else y)


def _parse_labels(tokens: list[list[str]], path: Path) -> np.ndarray:
    """Integers when every label is written as one (so 'y' of 0,1,2 means classes), floats otherwise."""
    try:
        return np.array([[int(t) for t in row] for row in tokens], dtype=np.int64)
    except ValueError:
        pass
    for line, row in enumerate(tokens, start=2):
        for t in row:
            if not _is_float(t):
                raise DataError(f"data file {path}: line {line}: label {t!r} is not a number")
    return np.array([[float(t) for t in row] for row in tokens], dtype=np.float64)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def split_dataset(data: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Shuffle with `seed` and split off a validation set (at least one sequence on each side)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction: got {val_fraction}, expected a value in (0, 1)")
    n = len(data)
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    val_idx, train_idx = order[:n_val], order[n_val:]

    def part(idx: np.ndarray) -> Dataset:
        return Dataset(x=data.x[idx], y=data.y[idx], task=data.task, num_outputs=data.num_outputs, spec=data.spec)
    return part(train_idx), part(val_idx)
