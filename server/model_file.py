"""Checks on the files of a model folder before anything reads them: regular files only, sizes bounded, the model
file and every external-data reference inside the model's folder, each declared length the one its tensor needs."""
from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx

DEFAULT_MAX_MODEL_BYTES = 4 << 30  # model.onnx plus its external data; an LSTM server's models are megabytes
# Sub-byte element types are packed: bits per element (the others take their numpy itemsize).
_PACKED_BITS = {name: bits for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2),
                                               ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))}


class ModelFileError(ValueError):
    """A model file that must not be loaded: unreadable, too large, or reaching outside its folder."""


def read_regular_file(path: str | os.PathLike, max_bytes: int, limit_name: str) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `max_bytes` (`limit_name` in the message).

    A FIFO, a device or a folder is refused from its stat, before it is opened, and the open itself does not
    block (a FIFO waits for a writer forever); what is read is what the descriptor's own stat checked.
    """
    fd = _open_regular(Path(path), str(path))
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise ModelFileError(f"{path}: {size} bytes, above {limit_name} {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # a file growing while read still stops at the limit
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ModelFileError(f"{path}: more than {limit_name} {max_bytes} bytes")
    return data


def check_model_file(path: str | os.PathLike, folder: str | os.PathLike | None = None,
                     max_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> None:
    """Raise ModelFileError naming the file (and tensor) when the model must not be loaded.

    Refused: a model file that is not a regular file, resolves outside `folder` (the model's folder) through a
    symlink, or is larger than `max_bytes` together with its external data; external data that could read
    outside the model file's folder (onnxruntime refuses absolute paths, '..' and escaping symlinks, but follows
    a hard link, which can expose any file of the same filesystem; this check refuses links of either kind),
    and declared offsets or lengths past the end of the file or different from what the tensor holds. Only the
    graph structure is read: no external byte is, so a sparse file declaring gigabytes costs nothing.
    """
    path = Path(path)
    if folder is not None:
        _check_inside(path, Path(folder))
    data = read_regular_file(path, max_bytes, "max_model_bytes")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-like errors, or OSError
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})".splitlines()[0]) \
            from None
    base, total = path.parent, len(data)
    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            length = _check_external(path, base, tensor)
            total += length
            if total > max_bytes:
                raise ModelFileError(f"{path}: tensor {tensor.name!r}: external data of {length} bytes brings the "
                                     f"model to {total} bytes, above max_model_bytes {max_bytes}")


def _check_inside(path: Path, folder: Path) -> None:
    resolved, root = path.resolve(), folder.resolve()
    if not resolved.is_relative_to(root):
        raise ModelFileError(f"{path}: leads through a symlink to {resolved}, outside the model folder {root}; "
                             "expected a file inside it")


def _open_regular(path: Path, what: str, follow: bool = True) -> int:
    """A read descriptor on `path`, known to be a regular file; ModelFileError naming `what` otherwise."""
    try:
        st = os.stat(path, follow_symlinks=follow)
    except OSError as exc:
        raise ModelFileError(f"{what}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{what}: {_kind(st.st_mode)}, expected a regular file")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ModelFileError(f"{what}: cannot be opened ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode  # of the descriptor: what was checked is what was opened
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ModelFileError(f"{what}: {_kind(mode)}, expected a regular file")
    os.set_blocking(fd, True)
    return fd


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a model: initializers, sparse ones, and those in node attributes, subgraphs and functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def _check_external(path: Path, base: Path, tensor: onnx.TensorProto) -> int:
    """The external bytes the tensor declares, once they are known to be inside a plain file of its folder."""
    where = f"{path}: tensor {tensor.name!r}"
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise ModelFileError(f"{where}: external data without a location, expected a file name in {base}")
    rel = Path(location)
    if rel.is_absolute() or location.startswith(("/", "\\")) or ".." in rel.parts or ":" in location:
        raise ModelFileError(f"{where}: external location {location!r} leaves the model folder, expected a "
                             "relative path inside it")
    current = base
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            raise ModelFileError(f"{where}: external location {location!r} goes through a symlink ({part!r}), "
                                 "expected plain files")
    fd = _open_regular(current, f"{where}: external file {location!r}", follow=False)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_nlink != 1:
        raise ModelFileError(f"{where}: external file {location!r} has {st.st_nlink} hard links, expected 1 "
                             "(a hard link can expose a file from outside the model folder)")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else st.st_size - offset  # no length: to the end
    except ValueError:
        raise ModelFileError(f"{where}: external offset/length {info.get('offset')!r}/{info.get('length')!r}, "
                             "expected integers") from None
    expected = _tensor_bytes(where, tensor)
    if length != expected:
        raise ModelFileError(f"{where}: external data declares {length} bytes, expected {expected} "
                             f"({onnx.TensorProto.DataType.Name(tensor.data_type)} {list(tensor.dims)})")
    if offset < 0 or offset + length > st.st_size:
        raise ModelFileError(f"{where}: external bytes [{offset}, {offset + length}) outside {location!r} "
                             f"({st.st_size} bytes)")
    return length


def _tensor_bytes(where: str, tensor: onnx.TensorProto) -> int:
    """The bytes a tensor of its data type and dims holds (packed for sub-byte types)."""
    elements = math.prod(tensor.dims)
    known = tensor.data_type in onnx.TensorProto.DataType.values()
    name = onnx.TensorProto.DataType.Name(tensor.data_type) if known else f"type {tensor.data_type}"
    if name in _PACKED_BITS:
        return math.ceil(elements * _PACKED_BITS[name] / 8)
    if not known or name in ("STRING", "UNDEFINED"):
        raise ModelFileError(f"{where}: external data of {name}, expected a fixed-size element type")
    return elements * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
