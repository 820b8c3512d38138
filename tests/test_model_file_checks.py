"""server/model_file.py on its own (hand-built model files in a temporary folder, no server): every refusal with
its exact message, the limits at their edges, and external data found wherever a model can hold a tensor."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from lstm_onnx.server.model_file import ModelFileError, check_model_file, read_regular_file


def _external(name: str, location: str | None = "w.bin", dims=(4,), data_type=TensorProto.FLOAT,
              **entries: str) -> TensorProto:
    tensor = TensorProto(name=name, data_type=data_type, dims=list(dims))
    tensor.data_location = TensorProto.EXTERNAL
    if location is not None:
        tensor.external_data.add(key="location", value=location)
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    return tensor


def _model(*initializers: TensorProto, nodes=(), functions=(), sparse=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", [], [], initializer=list(initializers),
                              sparse_initializer=list(sparse))
    model = helper.make_model(graph)
    model.functions.extend(functions)
    return model


def _write(folder: Path, model: onnx.ModelProto, data: dict[str, int] | None = None) -> Path:
    """model.onnx in `folder`, and each external file of the given size (bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in (data if data is not None else {"w.bin": 16}).items():
        (folder / name).write_bytes(b"\0" * size)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _refusal(path: Path, folder=None, **kw) -> str:
    with pytest.raises(ModelFileError) as info:
        check_model_file(path, folder, **kw)
    return str(info.value)


# read_regular_file


def test_a_regular_file_at_the_limit_is_read_whole(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    assert read_regular_file(path, 6, "the limit") == b"abcdef"
    with pytest.raises(ModelFileError) as info:
        read_regular_file(path, 5, "the limit")
    assert str(info.value) == f"{path}: 6 bytes, above the limit 5"


def test_a_file_longer_than_its_stat_says_stops_at_the_limit():
    # /proc files stat as regular files of size 0 and read as more: the read's own bound must stop them.
    with pytest.raises(ModelFileError) as info:
        read_regular_file("/proc/self/status", 10, "lim")
    assert str(info.value) == "/proc/self/status: more than lim 10 bytes"
    assert read_regular_file("/proc/self/status", 1 << 20, "lim").startswith(b"Name:")


def test_what_is_not_a_regular_file_is_refused_by_kind(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        kinds = [(fifo, "a FIFO"), (tmp_path, "a directory"), (sock_path, "a socket"),
                 (Path("/dev/null"), "a character device")]
        block = next((p for p in Path("/dev").glob("loop*") if p.is_block_device()), None)
        if block is not None:
            kinds.append((block, "a block device"))
        for path, kind in kinds:
            with pytest.raises(ModelFileError) as info:
                read_regular_file(path, 100, "lim")
            assert str(info.value) == f"{path}: {kind}, expected a regular file"
    finally:
        sock.close()
    with pytest.raises(ModelFileError) as info:
        read_regular_file(tmp_path / "missing", 100, "lim")
    assert str(info.value) == f"{tmp_path / 'missing'}: cannot be read (No such file or directory)"


# check_model_file: the model file


def test_a_good_model_with_external_data_passes_at_exactly_the_size_limit(tmp_path):
    path = _write(tmp_path, _model(_external("w", length="16")))
    total = path.stat().st_size + 16
    check_model_file(path, tmp_path, max_bytes=total)
    assert _refusal(path, tmp_path, max_bytes=total - 1) == (
        f"{path}: tensor 'w': external data of 16 bytes brings the model to {total} bytes, above max_model_bytes "
        f"{total - 1}")
    # The model file alone above the limit: refused before any tensor is read.
    assert _refusal(path, max_bytes=10) == f"{path}: {path.stat().st_size} bytes, above max_model_bytes 10"


def test_the_sizes_of_all_external_tensors_add_up(tmp_path):
    path = _write(tmp_path, _model(_external("a", length="16"), _external("b", "v.bin", length="16")),
                  {"w.bin": 16, "v.bin": 16})
    size = path.stat().st_size
    check_model_file(path, max_bytes=size + 32)
    assert _refusal(path, max_bytes=size + 31) == (
        f"{path}: tensor 'b': external data of 16 bytes brings the model to {size + 32} bytes, above "
        f"max_model_bytes {size + 31}")


def test_a_model_file_symlinked_from_outside_its_folder_is_refused(tmp_path):
    outside = _write(tmp_path / "outside", _model())
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.onnx").symlink_to(outside)
    assert _refusal(folder / "model.onnx", folder) == (
        f"{folder / 'model.onnx'}: leads through a symlink to {outside}, outside the model folder {folder}; "
        "expected a file inside it")
    inside = folder / "real.onnx"
    inside.write_bytes(_model().SerializeToString())
    (folder / "link.onnx").symlink_to(inside)
    check_model_file(folder / "link.onnx", folder)  # a symlink inside the folder is fine
    check_model_file(outside)  # no folder given: no containment check


def test_bytes_that_are_not_a_model_are_refused_on_one_line(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\xff\xff\xff\xff not protobuf\n")
    message = _refusal(path)
    assert message.startswith(f"{path}: not a readable ONNX model (DecodeError: ")
    assert "\n" not in message


# check_model_file: external references


@pytest.mark.parametrize("location", ["/etc/passwd", "\\share\\w.bin", "../w.bin", "a/../../w.bin", "c:w.bin"])
def test_an_external_location_leaving_the_folder_is_refused(tmp_path, location):
    path = _write(tmp_path, _model(_external("w", location)))
    assert _refusal(path) == (f"{path}: tensor 'w': external location {location!r} leaves the model folder, "
                              "expected a relative path inside it")


def test_an_external_tensor_without_a_location_is_refused(tmp_path):
    for tensor in (_external("w", None), _external("w", "")):
        path = _write(tmp_path, _model(tensor))
        assert _refusal(path) == f"{path}: tensor 'w': external data without a location, expected a file name in {tmp_path}"


def test_an_external_location_through_a_symlink_anywhere_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "w.bin").write_bytes(b"\0" * 16)
    (tmp_path / "data").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "link.bin").symlink_to(tmp_path / "real" / "w.bin")
    for location, part in (("data/w.bin", "data"), ("real/link.bin", "link.bin")):
        path = _write(tmp_path, _model(_external("w", location)), {})
        assert _refusal(path) == (f"{path}: tensor 'w': external location {location!r} goes through a symlink "
                                  f"({part!r}), expected plain files")
    check_model_file(_write(tmp_path, _model(_external("w", "real/w.bin")), {}))


def test_an_external_location_that_is_missing_or_a_folder_is_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    path = _write(tmp_path, _model(_external("w", "sub")), {})
    assert _refusal(path) == f"{path}: tensor 'w': external file 'sub': a directory, expected a regular file"
    path = _write(tmp_path, _model(_external("w", "gone.bin")), {})
    assert _refusal(path) == f"{path}: tensor 'w': external file 'gone.bin': cannot be read (No such file or directory)"


def test_an_external_file_with_another_hard_link_is_refused(tmp_path):
    path = _write(tmp_path, _model(_external("w")))
    os.link(tmp_path / "w.bin", tmp_path / "again.bin")
    assert _refusal(path) == (f"{path}: tensor 'w': external file 'w.bin' has 2 hard links, expected 1 (a hard link "
                              "can expose a file from outside the model folder)")


@pytest.mark.parametrize("entries, message", [
    ({"offset": "x"}, "external offset/length 'x'/None, expected integers"),
    ({"length": "1.5"}, "external offset/length None/'1.5', expected integers"),
    ({"length": "12"}, "external data declares 12 bytes, expected 16 (FLOAT [4])"),
    ({"offset": "4"}, "external data declares 12 bytes, expected 16 (FLOAT [4])"),  # no length: to the end
    ({"offset": "1", "length": "16"}, "external bytes [1, 17) outside 'w.bin' (16 bytes)"),
    ({"offset": "-1", "length": "16"}, "external bytes [-1, 15) outside 'w.bin' (16 bytes)"),
])
def test_external_offsets_and_lengths_must_fit_the_file_and_the_tensor(tmp_path, entries, message):
    path = _write(tmp_path, _model(_external("w", **entries)))
    assert _refusal(path) == f"{path}: tensor 'w': {message}"


def test_external_data_at_an_offset_to_the_end_of_its_file_passes(tmp_path):
    check_model_file(_write(tmp_path, _model(_external("w", offset="4", length="16")), {"w.bin": 20}))
    check_model_file(_write(tmp_path, _model(_external("w", offset="4")), {"w.bin": 20}))
    check_model_file(_write(tmp_path, _model(_external("w")), {"w.bin": 16}))


@pytest.mark.parametrize("type_name, dims, expected", [
    ("INT4", [8], 4), ("UINT4", [8], 4), ("FLOAT4E2M1", [8], 4), ("INT2", [8], 2), ("UINT2", [8], 2),
    ("FLOAT6E2M3", [8], 6), ("FLOAT6E3M2", [8], 6), ("INT4", [3], 2), ("INT2", [3], 1), ("FLOAT6E2M3", [3], 3),
    ("DOUBLE", [2, 3], 48), ("FLOAT16", [5], 10), ("UINT8", [7], 7),
])
def test_external_lengths_are_checked_against_the_packed_or_itemsize_bytes(tmp_path, type_name, dims, expected):
    data_type = getattr(TensorProto, type_name)
    path = _write(tmp_path, _model(_external("w", dims=dims, data_type=data_type, length=str(expected))),
                  {"w.bin": 64})
    check_model_file(path)
    path = _write(tmp_path, _model(_external("w", dims=dims, data_type=data_type, length=str(expected + 1))),
                  {"w.bin": 64})
    assert _refusal(path) == (f"{path}: tensor 'w': external data declares {expected + 1} bytes, expected {expected} "
                              f"({type_name} {dims})")


@pytest.mark.parametrize("data_type, name", [(TensorProto.STRING, "STRING"), (TensorProto.UNDEFINED, "UNDEFINED"),
                                             (999, "type 999")])
def test_external_data_of_a_type_without_a_fixed_size_is_refused(tmp_path, data_type, name):
    path = _write(tmp_path, _model(_external("w", data_type=data_type, length="4")))
    assert _refusal(path) == f"{path}: tensor 'w': external data of {name}, expected a fixed-size element type"


def _bad(name: str) -> TensorProto:
    return _external(name, "../outside.bin")


def _sparse(name: str) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(_bad(name), helper.make_tensor(f"{name}_i", TensorProto.INT64, [1], [0]), [4])


def _sparse_indices(name: str) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(helper.make_tensor(f"{name}_v", TensorProto.FLOAT, [1], [1.0]), _bad(name), [4])


def _node(**attrs) -> onnx.NodeProto:
    return helper.make_node("Constant", [], ["y"], **attrs)


def _subgraph(*initializers, nodes=()) -> onnx.GraphProto:
    return helper.make_graph(list(nodes), "sub", [], [], initializer=list(initializers))


PLACES = {
    "initializer": lambda: _model(_bad("t")),
    "sparse values": lambda: _model(sparse=[_sparse("t")]),
    "sparse indices": lambda: _model(sparse=[_sparse_indices("t")]),
    "node attribute t": lambda: _model(nodes=[_node(value=_bad("t"))]),
    "node attribute tensors": lambda: _model(nodes=[_node(values=[helper.make_tensor("ok", 1, [1], [1.0]), _bad("t")])]),
    "node sparse_tensor values": lambda: _model(nodes=[_node(sparse_value=_sparse("t"))]),
    "node sparse_tensor indices": lambda: _model(nodes=[_node(sparse_value=_sparse_indices("t"))]),
    "subgraph g": lambda: _model(nodes=[_node(body=_subgraph(_bad("t")))]),
    "subgraphs": lambda: _model(nodes=[_node(branches=[_subgraph(), _subgraph(_bad("t"))])]),
    "node in a subgraph": lambda: _model(nodes=[_node(body=_subgraph(nodes=[_node(value=_bad("t"))]))]),
    "function": lambda: _model(functions=[helper.make_function("d", "f", [], ["y"], [_node(value=_bad("t"))],
                                                               [helper.make_opsetid("", 21)])]),
}


@pytest.mark.parametrize("place", list(PLACES))
def test_external_data_is_checked_wherever_a_model_holds_a_tensor(tmp_path, place):
    path = _write(tmp_path, PLACES[place]())
    assert _refusal(path) == (f"{path}: tensor 't': external location '../outside.bin' leaves the model folder, "
                              "expected a relative path inside it")


def _unreadable_regular_file(tmp_path: Path) -> Path | None:
    """A regular file that open(O_RDONLY) refuses: mode 000 for a normal user; for root (whom modes do not stop)
    a write-only sysfs attribute, which the kernel refuses to open for reading."""
    if os.geteuid() != 0:
        path = tmp_path / "locked"
        path.write_bytes(b"x")
        path.chmod(0)
        return path
    for candidate in [Path("/sys/bus/pci/rescan"), Path("/sys/class/zram-control/hot_remove"),
                      *Path("/sys/devices").glob("pci*/*/rescan")]:
        try:
            st = candidate.stat()
        except OSError:
            continue
        if candidate.is_file() and not st.st_mode & 0o444:
            return candidate
    return None


def test_a_regular_file_that_cannot_be_opened_is_refused_with_the_reason(tmp_path):
    path = _unreadable_regular_file(tmp_path)
    if path is None:
        pytest.skip("no regular file here that open() refuses")
    with pytest.raises(ModelFileError) as info:
        read_regular_file(path, 100, "lim")
    assert str(info.value) == f"{path}: cannot be opened (Permission denied)"


def test_open_regular_without_following_refuses_a_symlink_itself(tmp_path):
    # The backstop under the external-data walk: the descriptor is opened on the link's own stat, not its target's.
    from lstm_onnx.server.model_file import _open_regular

    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ModelFileError) as info:
        _open_regular(tmp_path / "link", "what", follow=False)
    assert str(info.value) == "what: not a regular file, expected a regular file"
    fd = _open_regular(tmp_path / "link", "what")
    try:
        assert os.read(fd, 10) == b"x"
    finally:
        os.close(fd)
