"""Hostile repository entries: each fails its own model with the reason, the good model beside it serves, and
start-up never blocks on one file (a FIFO, a sparse file, an absurd config value)."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from server_models import write_identity_model

from lstm_onnx.protos import grpc_service_pb2 as pb
from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

STARTUP_BOUND_S = 30  # loading two identity models takes about a second; a blocked open() never ends
MIB = 1 << 20
# A config.pbtxt that loads the identity model READY (test_unaltered_entry_serves): each fault changes one thing.
IDENTITY_CONFIG = """max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] }, { name: "z" data_type: TYPE_FP32 dims: [ 3 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
"""


def _identity(folder: Path, config: str | None = IDENTITY_CONFIG, version: str = "1") -> Path:
    path = folder / version / "model.onnx"
    write_identity_model(path, "FP32")
    if config is not None:
        (folder / "config.pbtxt").write_text(config)
    return path


def _external_add(folder: Path, elements: int, declared: int, file_bytes: int | None = None) -> Path:
    """1/model.onnx: y = x + w, w FLOAT [elements] in external data w.bin declaring `declared` bytes; w.bin is a
    sparse file of `file_bytes` (default: the declared length), so nothing is written to disk."""
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[elements], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(declared))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "add",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [elements])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [elements])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    with open(path.parent / "w.bin", "wb") as f:
        f.truncate(declared if file_bytes is None else file_bytes)
    return path


def _fifo_model(bad: Path) -> None:
    (bad / "1").mkdir(parents=True)
    os.mkfifo(bad / "1" / "model.onnx")


def _fifo_external(bad: Path) -> None:
    path = _external_add(bad, 4, 16)
    (path.parent / "w.bin").unlink()
    os.mkfifo(path.parent / "w.bin")


def _fifo_config(bad: Path) -> None:
    _identity(bad, config=None)
    os.mkfifo(bad / "config.pbtxt")


def _config_bytes(data: bytes) -> Callable[[Path], None]:
    def build(bad: Path) -> None:
        _identity(bad, config=None)
        (bad / "config.pbtxt").write_bytes(data)
    return build


def _config_directory(bad: Path) -> None:
    _identity(bad, config=None)
    (bad / "config.pbtxt").mkdir()


def _version_folder(name: str) -> Callable[[Path], None]:
    return lambda bad: _identity(bad, version=name)


def _config_edit(old: str, new: str) -> Callable[[Path], None]:
    def build(bad: Path) -> None:
        assert old in IDENTITY_CONFIG
        _identity(bad, config=IDENTITY_CONFIG.replace(old, new))
    return build


def _config_extra(extra: str, drop_dynamic_batching: bool = False) -> Callable[[Path], None]:
    def build(bad: Path) -> None:
        config = IDENTITY_CONFIG
        if drop_dynamic_batching:
            config = config.replace("dynamic_batching { max_queue_delay_microseconds: 100 }\n", "")
        _identity(bad, config=config + extra)
    return build


def _sparse_declared(bad: Path) -> None:
    _external_add(bad, 4, 1 << 30)  # 16 bytes of tensor, 1 GiB declared, a 1 GiB sparse file behind it


def _filename(name: str) -> Callable[[Path], None]:
    def build(bad: Path) -> None:
        _identity(bad, config=IDENTITY_CONFIG + f'default_model_filename: "{name}"\n')
    return build


def _symlink_out(bad: Path) -> None:
    (bad / "1").mkdir(parents=True)
    (bad / "config.pbtxt").write_text(IDENTITY_CONFIG)
    (bad / "1" / "model.onnx").symlink_to(bad.parent / "good" / "1" / "model.onnx")


def _unblock_fifos(repo: Path) -> None:
    """Release a reader blocked opening a FIFO (today's bug), and remove the FIFO so no later open blocks."""
    for path in repo.rglob("*"):
        if path.is_fifo():
            try:
                writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody is blocked on it
                writer = None
            path.unlink()
            if writer is not None:
                os.close(writer)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _serve(repo: Path, **settings) -> Iterator[tuple[pb_grpc.GRPCInferenceServiceStub, _Records]]:
    """The real server over `repo`, started in a thread that must finish within STARTUP_BOUND_S."""
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    server = BackgroundServer(ServerSettings(model_repository=str(repo), grpc_port=0, metrics_port=-1,
                                             exit_on_error="false", **settings))
    failure: list[BaseException] = []

    def start() -> None:
        try:
            server.__enter__()
        except BaseException as exc:  # reported by the test, not lost in the thread
            failure.append(exc)

    logs = _Records()
    logger = logging.getLogger("lstm_onnx.server")
    logger.addHandler(logs)
    starter = threading.Thread(target=start, name="start-server", daemon=True)
    starter.start()
    starter.join(STARTUP_BOUND_S)
    blocked = starter.is_alive()
    try:
        assert not blocked, f"start-up still running after {STARTUP_BOUND_S} s: it blocked on one entry"
        assert not failure, f"start-up ended instead of failing one model: {failure[0]!r}"
        with grpc.insecure_channel(server.url) as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel), logs
    finally:
        if blocked:
            _unblock_fifos(repo)
            starter.join(STARTUP_BOUND_S)
        logger.removeHandler(logs)
        server.__exit__(None, None, None)


def _assert_fails_alone(tmp_path: Path, build: Callable[[Path], None], words: list[str], folder: bytes = b"bad",
                        name: str = "bad", **settings) -> None:
    """Start the server on `good` and the model `name` in `folder` (built by `build`): good answers; the other is
    not ready, and its reason, in the log, in ModelMetadata's error and in RepositoryIndex, names all `words`."""
    repo = tmp_path / "repo"
    _identity(repo / "good", config=None)
    bad = Path(os.fsdecode(os.fsencode(repo) + b"/" + folder))
    bad.mkdir()
    build(bad)
    with _serve(repo, **settings) as (stub, logs):
        x = np.arange(3, dtype=np.float32).reshape(1, 3)
        request = pb.ModelInferRequest(model_name="good")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
        request.raw_input_contents.append(x.tobytes())
        response = stub.ModelInfer(request, timeout=30)
        assert np.array_equal(np.frombuffer(response.raw_output_contents[0], np.float32), x.reshape(-1))
        assert not stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10).ready
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        details = caught.value.details()
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        reasons = [m.reason for m in index.models if m.name == name]
        logged = [str((getattr(r, "fields", None) or {}).get("reason", "")) for r in logs.records
                  if (getattr(r, "fields", None) or {}).get("model") == name]
    for where, text in (("ModelMetadata", details), ("RepositoryIndex", " ".join(reasons)),
                        ("log", " ".join(logged))):
        missing = [w for w in words if w not in text]
        assert not missing, f"{where}: {text!r} does not say {missing}"
    assert all("\n" not in r for r in reasons), reasons


def test_unaltered_entry_serves(tmp_path):
    """The control: the entry each fault below alters loads READY as it is."""
    repo = tmp_path / "repo"
    _identity(repo / "good", config=None)
    _identity(repo / "bad")
    with _serve(repo) as (stub, _):
        assert stub.ModelReady(pb.ModelReadyRequest(name="bad"), timeout=10).ready


# Finding 1: only regular files are opened, so a FIFO never blocks start-up.

@pytest.mark.parametrize("build, words", [
    (_fifo_model, ["model.onnx", "a FIFO", "expected a regular file"]),
    (_fifo_external, ["w.bin", "a FIFO", "expected a regular file"]),
    (_fifo_config, ["config.pbtxt", "a FIFO", "expected a regular file"]),
], ids=["model", "external-data", "config"])
def test_fifo_entry_fails_alone_without_blocking_startup(tmp_path, build, words):
    _assert_fails_alone(tmp_path, build, words)


# Finding 2: undecodable config text, a config that is a folder, version folders that are not ASCII numbers.

@pytest.mark.parametrize("build, words", [
    (_config_bytes(b'name: "bad"\nmax_batch_size: 8 # caf\xe9\n'), ["config.pbtxt", "UTF-8", "0xe9", "offset 35"]),
    (_config_directory, ["config.pbtxt", "a directory", "expected a regular file"]),
    (_version_folder("\u00b2"), ["'\u00b2'", "ASCII digits"]),  # superscript two: str.isdigit() yes, int() no
    (_version_folder("\u0661"), ["'\u0661'", "ASCII digits"]),  # Arabic-Indic one: int() reads it as 1
    (_version_folder("9" * 20), ["'" + "9" * 20 + "'", "9223372036854775807"]),  # past int64
], ids=["config-not-utf8", "config-directory", "version-superscript", "version-arabic-indic", "version-past-int64"])
def test_unreadable_config_or_version_folder_fails_alone(tmp_path, build, words):
    _assert_fails_alone(tmp_path, build, words)


def test_model_folder_name_not_utf8_fails_alone(tmp_path):
    # The protocol carries names as UTF-8: the model is listed under its name with the bad byte escaped.
    _assert_fails_alone(tmp_path, _identity, ["caf\\xe9", "not UTF-8"], folder=b"caf\xe9", name="caf\\xe9")


# Finding 3: declared external lengths are checked against the tensor, the file and a cap, before any read.

def test_external_length_beyond_the_tensor_is_refused_before_reading(tmp_path):
    from lstm_onnx.server.model_file import ModelFileError, check_model_file

    path = _external_add(tmp_path / "m", 4, 1 << 30)
    with pytest.raises(ModelFileError) as caught:  # today's check passes it: the sparse file is 1 GiB long
        check_model_file(path)
    assert "declares 1073741824 bytes" in str(caught.value) and "expected 16" in str(caught.value)


@pytest.mark.parametrize("build, words, settings", [
    (_sparse_declared, ["'w'", "declares 1073741824 bytes", "expected 16"], {}),
    (lambda bad: _external_add(bad, MIB // 2, 2 * MIB), ["2097152", "max_model_bytes", "1048576"],
     {"max_model_bytes": MIB}),
    (lambda bad: os.truncate(_identity(bad), 2 * MIB), ["2097152 bytes", "max_model_bytes", "1048576"],
     {"max_model_bytes": MIB}),
], ids=["declared-past-tensor", "external-past-cap", "model-file-past-cap"])
def test_oversized_model_data_fails_alone(tmp_path, build, words, settings):
    _assert_fails_alone(tmp_path, build, words, **settings)


# Finding 4: every config value the server reads is range-checked, with the range in the message.

@pytest.mark.parametrize("build, words", [
    (_config_edit("max_queue_delay_microseconds: 100", "max_queue_delay_microseconds: 18446744073709551615"),
     ["dynamic_batching.max_queue_delay_microseconds", "18446744073709551615", "0..10000000"]),
    (_config_extra("sequence_batching { oldest { max_queue_delay_microseconds: 18446744073709551615 } }\n",
                   drop_dynamic_batching=True),
     ["sequence_batching.oldest.max_queue_delay_microseconds", "18446744073709551615", "0..10000000"]),
    (_config_extra("sequence_batching { max_sequence_idle_microseconds: 18446744073709551615 }\n",
                   drop_dynamic_batching=True),
     ["max_sequence_idle_microseconds", "18446744073709551615", "0..86400000000"]),
    (_config_edit("max_batch_size: 8", "max_batch_size: 2147483647"), ["max_batch_size", "2147483647", "0..65536"]),
    (_config_edit("max_batch_size: 8", "max_batch_size: -1"), ["max_batch_size", "-1", "0..65536"]),
    (_config_edit('name: "x" data_type: TYPE_FP32 dims: [ 3 ]', 'name: "x" data_type: TYPE_FP32 dims: [ -5 ]'),
     ["input 'x'", "[-5]", "-1", "at least 1"]),
    (_config_edit('name: "y" data_type: TYPE_FP32 dims: [ 3 ]', 'name: "y" data_type: TYPE_FP32 dims: [ 0 ]'),
     ["output 'y'", "[0]", "-1", "at least 1"]),
    (_config_extra('platform: "tensorflow_savedmodel"\n'), ["platform", "tensorflow_savedmodel", "onnxruntime_onnx"]),
], ids=["queue-delay", "sequence-queue-delay", "sequence-idle", "max-batch-size-huge", "max-batch-size-negative",
        "input-dims-negative", "output-dims-zero", "platform"])
def test_out_of_range_config_value_fails_alone(tmp_path, build, words):
    _assert_fails_alone(tmp_path, build, words)


# Finding 5: the model file stays inside its model's folder, as external data does.

@pytest.mark.parametrize("build, words", [
    (_filename("../../good/1/model.onnx"), ["default_model_filename", "'../../good/1/model.onnx'",
                                             "expected a file name"]),
    (lambda bad: _filename(str(bad.parent / "good" / "1" / "model.onnx"))(bad),
     ["default_model_filename", "good/1/model.onnx", "expected a file name"]),
    (_symlink_out, ["model.onnx", "symlink", "outside the model folder"]),
], ids=["parent", "absolute", "symlink"])
def test_model_file_outside_its_folder_fails_alone(tmp_path, build, words):
    _assert_fails_alone(tmp_path, build, words)
