"""Reading untrusted bytes safely: ONNX external data (no escapes, links, or overruns) and the numpy safetensors reader."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from audit_models import contract_model, random_layers, run_cli

from lstm_onnx.export.audit import AuditInputError, audit_model
from lstm_onnx.export.audit.provenance import read_tensors


def _external_model(folder: Path, layers=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(contract_model(layers=layers), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    return path


def _edit_external(path: Path, tensor: str | None = None, **changes: str) -> None:
    """Rewrite the external_data entries (of one tensor, or all) without touching the bytes."""
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and tensor in (None, t.name):
            for entry in t.external_data:
                if entry.key in changes:
                    entry.value = changes[entry.key]
    onnx.save(model, str(path))


def _external_errors(path: Path) -> list[str]:
    return [f.message for f in audit_model(path).findings if f.code == "EXTERNAL_DATA"]


def test_audit_reads_external_data_inside_the_model_folder(tmp_path):
    layers = random_layers("LSTM", 2, hidden=4, input_size=3)
    path = _external_model(tmp_path / "m", layers)
    assert (tmp_path / "m" / "weights.bin").stat().st_size > 0
    audit = audit_model(path)
    assert not audit.errors, audit.findings  # the recorded digests match what was read back
    gates = {g.key: g.array for layer in audit.layers for g in layer.gates}
    np.testing.assert_array_equal(gates["layer1.forward.cell.R"], layers[1][1][0, 12:16])


def test_audit_refuses_external_data_outside_the_folder(tmp_path):
    path = _external_model(tmp_path / "m")
    (tmp_path / "m" / "weights.bin").rename(tmp_path / "weights.bin")
    _edit_external(path, location="../weights.bin")
    errors = _external_errors(path)
    assert errors and all("leaves the model folder" in e for e in errors)
    proc = run_cli("audit", str(path))
    assert proc.returncode == 1 and "EXTERNAL_DATA" in proc.stderr


def test_audit_refuses_absolute_external_location(tmp_path):
    path = _external_model(tmp_path / "m")
    _edit_external(path, location=str(tmp_path / "m" / "weights.bin"))
    errors = _external_errors(path)
    assert errors and all("is absolute" in e for e in errors)


def test_audit_refuses_symlinked_external_file(tmp_path):
    path = _external_model(tmp_path / "m")
    (tmp_path / "m" / "real").mkdir()
    (tmp_path / "m" / "weights.bin").rename(tmp_path / "m" / "real" / "weights.bin")
    (tmp_path / "m" / "weights.bin").symlink_to(tmp_path / "m" / "real" / "weights.bin")
    errors = _external_errors(path)
    assert errors and all("symlink" in e for e in errors)


@pytest.mark.parametrize("target", ["outside", "inside"])
def test_audit_refuses_a_symlinked_folder_in_the_middle_of_the_location(tmp_path, target):
    """A symlink anywhere on the way is refused, even one that stays inside the folder (it can be swapped)."""
    path = _external_model(tmp_path / "m")
    real = tmp_path / "elsewhere" if target == "outside" else tmp_path / "m" / "real"
    real.mkdir()
    (tmp_path / "m" / "weights.bin").rename(real / "weights.bin")
    (tmp_path / "m" / "data").symlink_to(real, target_is_directory=True)
    _edit_external(path, location="data/weights.bin")
    errors = _external_errors(path)
    assert errors and all("goes through a symlink ('data')" in e for e in errors), errors
    proc = run_cli("audit", str(path))
    assert proc.returncode == 1 and "EXTERNAL_DATA" in proc.stderr


def test_audit_refuses_hard_linked_external_file(tmp_path):
    path = _external_model(tmp_path / "m")
    os.link(tmp_path / "m" / "weights.bin", tmp_path / "elsewhere.bin")
    errors = _external_errors(path)
    assert errors and all("2 hard links" in e for e in errors)


def test_audit_refuses_external_length_that_does_not_fit_the_shape(tmp_path):
    path = _external_model(tmp_path / "m")
    _edit_external(path, tensor="layer0.R", length="8")
    (error,) = _external_errors(path)
    assert error.startswith("layer0 R: tensor 'layer0.R': external length 8 bytes, expected 256")


def test_audit_refuses_external_offset_past_the_end(tmp_path):
    path = _external_model(tmp_path / "m")
    size = (tmp_path / "m" / "weights.bin").stat().st_size
    _edit_external(path, tensor="head.weight", offset=str(size - 4))
    (error,) = _external_errors(path)
    assert "tensor 'head.weight'" in error and f"({size} bytes)" in error


# --- the numpy-only safetensors reader -------------------------------------------------------------------


def _write_raw(path: Path, header: dict, body: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


def test_checkpoint_reader_matches_torch(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "d": torch.randn(6).half()}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    got = read_tensors(tmp_path / "t.safetensors")
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        np.testing.assert_array_equal(got[name], t.numpy())


@pytest.mark.parametrize("header,body", [
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}, b"\0" * 16),  # outside the data section
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16),  # 12 bytes for 16
    ({"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),  # no such dtype
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),  # negative dim
])
def test_checkpoint_reader_refuses_bad_entries_naming_the_file(tmp_path, header, body):
    path = _write_raw(tmp_path / "bad.safetensors", header, body)
    with pytest.raises(AuditInputError, match="bad.safetensors: not a readable safetensors file"):
        read_tensors(path)


def test_checkpoint_reader_refuses_truncated_and_pickled_files(tmp_path):
    (tmp_path / "short").write_bytes(b"\x01\x02")
    with pytest.raises(AuditInputError, match="short: not a readable safetensors file"):
        read_tensors(tmp_path / "short")
    (tmp_path / "long").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(AuditInputError, match="long: not a readable safetensors file"):
        read_tensors(tmp_path / "long")
    (tmp_path / "pickle").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(AuditInputError, match="looks like a pickle"):
        read_tensors(tmp_path / "pickle")


def _one_tensor(folder: Path, **entries: str) -> onnx.TensorProto:
    """A float32 [4] tensor whose bytes are 16 bytes at offset 8 of folder/w.bin, with these external_data entries."""
    folder.mkdir(parents=True, exist_ok=True)
    values = np.arange(4, dtype="<f4")
    (folder / "w.bin").write_bytes(b"\xff" * 8 + values.tobytes())
    tensor = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[4])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def test_external_reader_reads_exactly_the_declared_bytes(tmp_path):
    from lstm_onnx.export.audit.external import read_external_bytes, tensor_to_array

    tensor = _one_tensor(tmp_path, location="w.bin", offset="8", length="16")
    np.testing.assert_array_equal(tensor_to_array(tensor, tmp_path), np.arange(4, dtype=np.float32))
    inline = onnx.numpy_helper.from_array(np.ones(2, np.float32))
    np.testing.assert_array_equal(tensor_to_array(inline, tmp_path), np.ones(2, np.float32))
    (tmp_path / "z.bin").write_bytes(np.arange(4, dtype="<f4").tobytes())
    for entries in ({"location": "z.bin"}, {"location": "z.bin", "offset": "0"}):  # offset defaults to 0
        assert read_external_bytes(_one_tensor(tmp_path / "x", **entries), tmp_path) == (tmp_path / "z.bin").read_bytes()
    (tmp_path / "z").write_bytes((tmp_path / "z.bin").read_bytes())  # a one-character name is no drive letter
    assert read_external_bytes(_one_tensor(tmp_path / "x", location="z"), tmp_path) == (tmp_path / "z").read_bytes()


@pytest.mark.parametrize("entries, message", [
    ({}, "tensor 'w': external data has no 'location', expected a file name"),
    ({"location": "w.bin", "offset": "x"}, "tensor 'w': external offset 'x', expected a non-negative integer"),
    ({"location": "w.bin", "offset": "-1"}, "tensor 'w': external offset -1, expected a non-negative integer"),
    ({"location": "w.bin", "length": "-16"}, "tensor 'w': external length -16, expected a non-negative integer"),
    ({"location": "w.bin", "length": "12"}, "tensor 'w': external length 12 bytes, expected 16 for dims [4]"),
    ({"location": "w.bin", "offset": "12"}, "tensor 'w': external bytes [12, 28) outside 'w.bin' (24 bytes)"),
    ({"location": "\\\\server\\w.bin"}, "tensor 'w': external location '\\\\\\\\server\\\\w.bin' is absolute, "
                                        "expected a path inside the model folder"),
    ({"location": "C:w.bin"}, "tensor 'w': external location 'C:w.bin' is absolute, expected a path inside the "
                              "model folder"),
    ({"location": "C:"}, "tensor 'w': external location 'C:' is absolute, expected a path inside the model folder"),
    ({"location": "sub/../w.bin"}, "tensor 'w': external location 'sub/../w.bin' leaves the model folder"),
    ({"location": "missing.bin"}, "tensor 'w': cannot open external file 'missing.bin' (No such file or directory)"),
    ({"location": "sub"}, "tensor 'w': external location 'sub' is not a regular file"),
])
def test_external_reader_refuses_each_bad_reference_with_its_reason(tmp_path, entries, message):
    from lstm_onnx.export.audit.external import ExternalDataError, read_external_bytes

    tensor = _one_tensor(tmp_path / "m", **entries)
    (tmp_path / "m" / "sub").mkdir()
    with pytest.raises(ExternalDataError) as caught:
        read_external_bytes(tensor, tmp_path / "m")
    assert str(caught.value) == message


@pytest.mark.parametrize("links", [2, 3])
def test_external_reader_refuses_a_hard_linked_file_saying_why(tmp_path, links):
    # The whole message: what is wrong (the file's link count), what is expected (1), and why it matters.
    from lstm_onnx.export.audit.external import ExternalDataError, read_external_bytes

    tensor = _one_tensor(tmp_path / "m", location="w.bin", offset="8")
    for n in range(1, links):
        os.link(tmp_path / "m" / "w.bin", tmp_path / f"elsewhere-{n}.bin")
    with pytest.raises(ExternalDataError) as caught:
        read_external_bytes(tensor, tmp_path / "m")
    assert str(caught.value) == (f"tensor 'w': external file 'w.bin' has {links} hard links, expected 1 "
                                 "(a hard link can expose a file from outside the model folder)")


def test_external_reader_opens_without_following_a_symlink_swapped_in_after_the_check(tmp_path, monkeypatch):
    # The race O_NOFOLLOW closes: the location passed the symlink walk, then became a symlink before the open.
    # Staged without timing: the walk is made to return the symlink it would have refused.
    from lstm_onnx.export.audit import external

    tensor = _one_tensor(tmp_path / "m", location="w.bin", offset="8")
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 24)
    (tmp_path / "m" / "w.bin").unlink()
    (tmp_path / "m" / "w.bin").symlink_to(tmp_path / "secret.bin")
    monkeypatch.setattr(external, "_resolve_inside", lambda where, base, location: base / location)
    with pytest.raises(external.ExternalDataError) as caught:
        external.read_external_bytes(tensor, tmp_path / "m")
    assert str(caught.value) == "tensor 'w': cannot open external file 'w.bin' (Too many levels of symbolic links)"


def test_external_reader_sizes_packed_4_bit_tensors():
    from lstm_onnx.export.audit.external import expected_nbytes

    for data_type, dims, want in ((onnx.TensorProto.INT4, [3], 2), (onnx.TensorProto.INT4, [4], 2),
                                  (onnx.TensorProto.UINT4, [2, 2], 2),
                                  (onnx.TensorProto.INT8, [3], 3), (onnx.TensorProto.FLOAT, [3], 12)):
        assert expected_nbytes(onnx.TensorProto(data_type=data_type, dims=dims)) == want, data_type
