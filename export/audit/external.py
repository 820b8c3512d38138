"""Safe reading of ONNX tensors whose bytes live in external data files next to the model."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


class ExternalDataError(ValueError):
    """An external-data reference is unsafe (outside the model folder, a link) or does not fit its file."""


def tensor_to_array(tensor: onnx.TensorProto, base_dir: str | os.PathLike) -> np.ndarray:
    """A TensorProto as a numpy array, reading external data from `base_dir` safely when it has any."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    raw = read_external_bytes(tensor, base_dir)
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = raw
    return numpy_helper.to_array(inline)


def expected_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes the tensor's dims and data type call for (sub-byte types rounded up)."""
    count = 1
    for d in tensor.dims:
        count *= int(d)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type, dtype.itemsize * 8)
    return (count * bits + 7) // 8


def read_external_bytes(tensor: onnx.TensorProto, base_dir: str | os.PathLike) -> bytes:
    """The raw bytes of an external tensor, refusing anything that could read outside the model.

    Refused: an absolute location, one that leaves `base_dir`, a symlink anywhere on the way, a file
    with more than one hard link (it may be a file elsewhere on the machine), and an offset/length
    that does not fit the file or the tensor's shape.
    """
    where = f"tensor {tensor.name!r}"
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location")
    if not location:
        raise ExternalDataError(f"{where}: external data has no 'location', expected a file name")
    offset = _parse_int(where, "offset", info.get("offset", "0"))
    length = _parse_int(where, "length", info["length"]) if "length" in info else None
    want = expected_nbytes(tensor)
    if length is not None and length != want:
        raise ExternalDataError(
            f"{where}: external length {length} bytes, expected {want} for dims {list(tensor.dims)}"
        )
    path = _resolve_inside(where, Path(base_dir), location)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ExternalDataError(f"{where}: cannot open external file {location!r} ({exc.strerror})") from None
    # fstat on the open descriptor: the checks hold for the file actually read. Before fdopen, which raises
    # IsADirectoryError (not our error) for a folder.
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ExternalDataError(f"{where}: external location {location!r} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_nlink > 1:
            raise ExternalDataError(
                f"{where}: external file {location!r} has {st.st_nlink} hard links, expected 1 "
                "(a hard link can expose a file from outside the model folder)"
            )
        if offset + want > st.st_size:
            raise ExternalDataError(
                f"{where}: external bytes [{offset}, {offset + want}) outside {location!r} ({st.st_size} bytes)"
            )
        f.seek(offset)
        data = f.read(want)
    if len(data) != want:
        raise ExternalDataError(f"{where}: read {len(data)} bytes from {location!r}, expected {want}")
    return data


def _parse_int(where: str, key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ExternalDataError(f"{where}: external {key} {value!r}, expected a non-negative integer") from None
    if number < 0:
        raise ExternalDataError(f"{where}: external {key} {number}, expected a non-negative integer")
    return number


def _resolve_inside(where: str, base_dir: Path, location: str) -> Path:
    rel = Path(location)
    if rel.is_absolute() or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise ExternalDataError(f"{where}: external location {location!r} is absolute, expected a path inside the model folder")
    if any(part == ".." for part in rel.parts):
        raise ExternalDataError(f"{where}: external location {location!r} leaves the model folder")
    base = base_dir.resolve()
    current = base
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            raise ExternalDataError(f"{where}: external location {location!r} goes through a symlink ({part!r})")
    if not current.resolve().is_relative_to(base):
        raise ExternalDataError(f"{where}: external location {location!r} leaves the model folder")
    return current
