"""Data: the default task is deterministic and learnable-shaped; user .npz/.csv files load or fail clearly."""
from __future__ import annotations

import numpy as np
import pytest

from lstm_onnx.model.data import DataError, load_data, make_default_task, split_dataset


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _write_csv(path, text: str):
    path.write_text(text)
    return path


def _csv_from_arrays(path, x: np.ndarray, y: np.ndarray):
    n, t, f = x.shape
    labels = ["y"] if y.ndim == 1 else [f"y{k}" for k in range(y.shape[1])]
    header = labels + [f"t{i}_f{j}" for i in range(t) for j in range(f)]
    rows = [",".join(header)]
    for i in range(n):
        label = [str(v) for v in np.atleast_1d(y[i])]
        rows.append(",".join(label + [repr(float(v)) for v in x[i].reshape(-1)]))
    return _write_csv(path, "\n".join(rows) + "\n")


def test_default_task_is_deterministic_from_seed():
    a, b, c = make_default_task(3), make_default_task(3), make_default_task(4)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)
    assert a.x.shape == (3000, 64, 1) and a.x.dtype == np.float32
    assert a.task == "classification" and a.num_outputs == 4 and a.input_size == 1
    assert set(np.unique(a.y)) == {0, 1, 2, 3}
    assert a.spec["kind"] == "default" and a.spec["seed"] == 3 and a.spec["name"] == "sine-frequency"


def test_default_task_parameters_are_recorded_and_applied():
    d = make_default_task(0, num_sequences=10, seq_len=5)
    assert d.x.shape == (10, 5, 1)
    assert d.spec["num_sequences"] == 10 and d.spec["seq_len"] == 5
    with pytest.raises(DataError, match="unknown parameters \\['bogus'\\]"):
        make_default_task(0, bogus=1)


def test_split_is_disjoint_and_seeded():
    d = make_default_task(0, num_sequences=50, seq_len=3)
    train, val = split_dataset(d, 0.2, seed=1)
    assert len(train) == 40 and len(val) == 10
    both = np.concatenate([train.x, val.x]).reshape(50, -1)
    assert len({row.tobytes() for row in both}) == 50  # every sequence lands on exactly one side
    again, _ = split_dataset(d, 0.2, seed=1)
    assert np.array_equal(again.x, train.x)


def test_npz_integer_labels_mean_classification(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 4, 2)).astype(np.float32)
    d = load_data(_write_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2])))
    assert d.task == "classification" and d.num_outputs == 3 and d.input_size == 2
    assert d.spec["kind"] == "file" and d.spec["sha256"].startswith("sha256:") and d.spec["path"].endswith("d.npz")


def test_npz_float_or_2d_labels_mean_regression(tmp_path):
    x = np.zeros((4, 3, 1))
    d = load_data(_write_npz(tmp_path / "a.npz", x=x, y=np.array([0.5, 1.0, 2.0, 3.0])))
    assert d.task == "regression" and d.num_outputs == 1 and d.y.shape == (4, 1)
    d = load_data(_write_npz(tmp_path / "b.npz", x=x, y=np.ones((4, 3))))
    assert d.task == "regression" and d.num_outputs == 3
    d = load_data(_write_npz(tmp_path / "c.npz", x=x, y=np.array([0, 1, 2, 3])), task="regression")
    assert d.task == "regression" and d.y.dtype == np.float32


def test_num_classes_may_exceed_the_labels_seen(tmp_path):
    d = load_data(_write_npz(tmp_path / "d.npz", x=np.zeros((3, 2, 1)), y=np.array([0, 1, 1])), num_classes=5)
    assert d.num_outputs == 5


def test_csv_reads_time_major_columns(tmp_path):
    x = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    d = load_data(_csv_from_arrays(tmp_path / "d.csv", x, np.array([1, 0])))
    assert np.array_equal(d.x, x)
    assert d.task == "classification" and list(d.y) == [1, 0]
    d = load_data(_csv_from_arrays(tmp_path / "r.csv", x, np.array([[0.5, 1.5], [2.5, 3.5]])))
    assert d.task == "regression" and d.y.shape == (2, 2) and d.y[1, 1] == 3.5


# Each bad case: (npz arrays or None, csv text or None, expected message fragment)
X = np.zeros((3, 4, 1))
BAD_NPZ = {
    "wrong rank x": (dict(x=np.zeros((3, 4)), y=np.array([0, 1, 0])), "'x' has shape \\[3, 4\\], expected \\[N, T, F\\]"),
    "wrong rank y": (dict(x=X, y=np.zeros((3, 1, 1))), "'y' has shape \\[3, 1, 1\\], expected \\[N\\] or \\[N, K\\]"),
    "mismatched N": (dict(x=X, y=np.array([0, 1])), "'x' has 3 sequences but 'y' has 2"),
    "NaN": (dict(x=np.where(np.eye(3, 4)[:, :, None] > 0, np.nan, 0.0), y=np.array([0, 1, 0])), "NaN or Inf"),
    "Inf label": (dict(x=X, y=np.array([0.5, np.inf, 1.0])), "'y' holds NaN or Inf"),
    "empty": (dict(x=np.zeros((0, 4, 1)), y=np.zeros((0,), dtype=int)), "empty"),
    "non-numeric": (dict(x=np.array([[["a"]], [["b"]]]), y=np.array([0, 1])), "'x' has dtype <U1, expected numbers"),
    "negative label": (dict(x=X, y=np.array([0, -1, 1])), "class labels range over -1..1, expected integers 0..1"),
    "missing y": (dict(x=X), "missing arrays \\['y'\\]"),
}
BAD_CSV = {
    "wrong rank (no sequence columns)": ("y\n0\n1\n", "no sequence columns"),
    "mismatched N (short row)": ("y,t0_f0,t1_f0\n0,1.0,2.0\n1,3.0\n", "line 3 has 2 fields, expected 3"),
    "NaN": ("y,t0_f0,t1_f0\n0,1.0,nan\n1,3.0,4.0\n", "'x' holds NaN or Inf"),
    "Inf": ("y,t0_f0,t1_f0\n0,1.0,2.0\n1,inf,4.0\n", "'x' holds NaN or Inf"),
    "empty": ("", "empty, expected a header row"),
    "header only": ("y,t0_f0\n", "header only"),
    "non-numeric value": ("y,t0_f0,t1_f0\n0,1.0,abc\n1,3.0,4.0\n", "line 2: value 'abc' is not a number"),
    "non-numeric label": ("y,t0_f0\ncat,1.0\ndog,2.0\n", "line 2: label 'cat' is not a number"),
    "negative label": ("y,t0_f0\n0,1.0\n-2,2.0\n", "class labels range over -2..0"),
    "bad header": ("label,t0_f0\n0,1.0\n", "header starts with 'label', expected label column 'y'"),
    "columns out of order": ("y,t1_f0,t0_f0\n0,1.0,2.0\n1,1.0,2.0\n", "not t0_f0..t1_f0 in time-major order"),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_npz_is_refused_naming_the_file(tmp_path, case):
    arrays, message = BAD_NPZ[case]
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_data(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", sorted(BAD_CSV))
def test_bad_csv_is_refused_naming_the_file(tmp_path, case):
    text, message = BAD_CSV[case]
    path = _write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(DataError, match=message) as info:
        load_data(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", ["npz", "csv"])
def test_labels_beyond_num_classes_are_refused(tmp_path, suffix):
    x, y = np.zeros((3, 2, 1)), np.array([0, 1, 4])
    path = _write_npz(tmp_path / "d.npz", x=x, y=y) if suffix == "npz" else _csv_from_arrays(tmp_path / "d.csv", x, y)
    with pytest.raises(DataError, match="class labels range over 0..4, expected integers 0..2"):
        load_data(path, num_classes=3)


@pytest.mark.parametrize("suffix", ["npz", "csv"])
def test_fractional_labels_cannot_be_classes(tmp_path, suffix):
    x, y = np.zeros((3, 2, 1)), np.array([0.0, 0.5, 1.0])
    path = _write_npz(tmp_path / "d.npz", x=x, y=y) if suffix == "npz" else _csv_from_arrays(tmp_path / "d.csv", x, y)
    with pytest.raises(DataError, match="classification labels must be integers"):
        load_data(path, task="classification")


def test_pickled_object_arrays_are_not_loaded(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([object()], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="unreadable array"):
        load_data(path)


@pytest.mark.parametrize("name,content,message", [
    ("d.txt", b"1,2", "got suffix '.txt', expected .npz or .csv"),
    ("d.npz", b"not a zip", "not a readable .npz archive"),
    ("d.csv", b"\xff\xfe\x00bad", "not UTF-8 text"),
])
def test_unreadable_files_are_refused(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_data(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "nope.npz")
