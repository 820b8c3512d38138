"""Checks on a model file before onnxruntime opens it: every external-data reference stays inside the model's folder."""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import onnx


class ModelFileError(ValueError):
    """A model file that must not be loaded: unreadable, or reaching outside its folder for external data."""


def check_model_file(path: str | os.PathLike) -> None:
    """Raise ModelFileError naming the file and tensor when the model's external data could read outside its folder.

    onnxruntime itself refuses absolute paths, '..' and symlinks that escape, but follows a hard link, which
    can expose any file of the same filesystem; this check refuses links of either kind, and offsets or
    lengths past the end of the file. Only the graph structure is parsed (no tensor bytes are read).
    """
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-like errors, or OSError
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})".splitlines()[0]) \
            from None
    base = path.parent
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(path, base, tensor)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a graph: initializers, sparse ones, and those in node attributes and subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _check_external(path: Path, base: Path, tensor: onnx.TensorProto) -> None:
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
    try:
        fd = os.open(current, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ModelFileError(f"{where}: external file {location!r} cannot be opened ({exc.strerror})") from None
    try:
        st = os.fstat(fd)  # of the descriptor: what was checked is what was opened
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{where}: external location {location!r} is not a regular file")
    if st.st_nlink != 1:
        raise ModelFileError(f"{where}: external file {location!r} has {st.st_nlink} hard links, expected 1 "
                             "(a hard link can expose a file from outside the model folder)")
    try:
        offset, length = int(info.get("offset", "0")), int(info.get("length", "0"))
    except ValueError:
        raise ModelFileError(f"{where}: external offset/length {info.get('offset')!r}/{info.get('length')!r}, "
                             "expected integers") from None
    if offset < 0 or length < 0 or offset + length > st.st_size:
        raise ModelFileError(f"{where}: external bytes [{offset}, {offset + length}) outside {location!r} "
                             f"({st.st_size} bytes)")
