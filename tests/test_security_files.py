"""Hostile or broken files: each gets a clear error, the other models keep serving, nothing in a model file runs."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lstm_onnx.protos import grpc_service_pb2 as pb
from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

SECRET = np.array([1e6, 2e6, 3e6, 4e6], np.float32)  # bytes outside every model folder


class _Payload:
    """Unpickling this creates `marker`: proof that a loader ran code from the file, if the marker appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _add_model(external_location: str | None = None) -> onnx.ModelProto:
    """y = x + w with w [4] inline or in external data at `external_location` (no config.pbtxt needed)."""
    w = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    if external_location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external_location), ("offset", "0"), ("length", "16")):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "add",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _write(repo: Path, name: str, model_bytes: bytes, config: str | None = None) -> Path:
    version = repo / name / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(model_bytes)
    if config is not None:
        (repo / name / "config.pbtxt").write_text(config)
    return version


@pytest.fixture(scope="module")
def hostile_repository(tmp_path_factory, tiny_repository):
    """tiny_lstm and a plain Add model that must serve, next to one broken model per kind of fault."""
    root = tmp_path_factory.mktemp("hostile")
    repo = root / "repo"
    shutil.copytree(tiny_repository / "tiny_lstm", repo / "tiny_lstm")
    good = (tiny_repository / "tiny_lstm" / "1" / "model.onnx").read_bytes()
    lstm_config = (tiny_repository / "tiny_lstm" / "config.pbtxt").read_text()
    (root / "secret.bin").write_bytes(SECRET.tobytes())
    marker = root / "pickle-ran"

    _write(repo, "plain_add", _add_model().SerializeToString())
    _write(repo, "corrupt", os.urandom(4096))
    _write(repo, "truncated", good[: len(good) // 2], lstm_config.replace("tiny_lstm", "truncated"))
    _write(repo, "pickled", pickle.dumps(_Payload(marker)))
    _write(repo, "pickled_v0", pickle.dumps(_Payload(marker), protocol=0))
    _write(repo, "ext_parent", _add_model("../../../secret.bin").SerializeToString())
    _write(repo, "ext_absolute", _add_model(str(root / "secret.bin")).SerializeToString())
    version = _write(repo, "ext_symlink", _add_model("w.bin").SerializeToString())
    os.symlink(root / "secret.bin", version / "w.bin")
    # A symlinked folder in the middle of the location: every part of the path is checked, not the last only.
    (root / "outside").mkdir()
    (root / "outside" / "w.bin").write_bytes(SECRET.tobytes())
    version = _write(repo, "ext_symlink_dir", _add_model("data/w.bin").SerializeToString())
    os.symlink(root / "outside", version / "data")
    version = _write(repo, "ext_hardlink", _add_model("w.bin").SerializeToString())
    os.link(root / "secret.bin", version / "w.bin")
    version = _write(repo, "ext_short", _add_model("w.bin").SerializeToString())
    (version / "w.bin").write_bytes(b"\0" * 8)  # 8 bytes where 16 are declared
    _write(repo, "config_unparsable", good, "name: \"config_unparsable\" input [ { name: ")
    _write(repo, "config_unknown_input", good, lstm_config.replace("tiny_lstm", "config_unknown_input")
           .replace('name: "input"', 'name: "features"'))
    _write(repo, "config_wrong_datatype", good, lstm_config.replace("tiny_lstm", "config_wrong_datatype")
           .replace("TYPE_FP32", "TYPE_FP64", 1))
    _write(repo, "config_wrong_dims", good, lstm_config.replace("tiny_lstm", "config_wrong_dims")
           .replace("dims: [ -1, 1 ]", "dims: [ -1, 3 ]"))
    _write(repo, "config_other_name", good, lstm_config)  # says name "tiny_lstm" in folder config_other_name
    return repo, marker


BROKEN = ["corrupt", "truncated", "pickled", "pickled_v0", "ext_parent", "ext_absolute", "ext_symlink",
          "ext_symlink_dir", "ext_hardlink", "ext_short", "config_unparsable", "config_unknown_input", "config_wrong_datatype",
          "config_wrong_dims", "config_other_name"]


@pytest.fixture(scope="module")
def hostile_server(hostile_repository):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    repo, _ = hostile_repository
    with BackgroundServer(ServerSettings(model_repository=str(repo), grpc_port=0, metrics_port=-1, http_port=-1,
                                         exit_on_error="false")) as srv:
        channel = grpc.insecure_channel(srv.url)
        yield pb_grpc.GRPCInferenceServiceStub(channel)
        channel.close()


def test_good_models_serve_next_to_broken_ones(hostile_server, tiny_repository):
    x = np.arange(4, dtype=np.float32)
    request = pb.ModelInferRequest(model_name="plain_add")
    request.inputs.add(name="x", datatype="FP32", shape=[4])
    request.raw_input_contents.append(x.tobytes())
    response = hostile_server.ModelInfer(request, timeout=30)
    assert np.array_equal(np.frombuffer(response.raw_output_contents[0], np.float32), x)
    assert hostile_server.ModelReady(pb.ModelReadyRequest(name="tiny_lstm"), timeout=10).ready


@pytest.mark.parametrize("name", BROKEN)
def test_broken_model_is_not_ready_with_a_one_line_reason(hostile_server, name):
    assert not hostile_server.ModelReady(pb.ModelReadyRequest(name=name), timeout=10).ready, f"{name} is ready"
    index = hostile_server.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    rows = [m for m in index.models if m.name == name]
    assert rows and all(m.state == "UNAVAILABLE" for m in rows), f"{name}: {rows}"
    assert all(m.reason.strip() and "\n" not in m.reason for m in rows), f"{name}: reasons {[m.reason for m in rows]}"
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="x", datatype="FP32", shape=[4])
    request.raw_input_contents.append(np.zeros(4, np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as caught:
        hostile_server.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert name in caught.value.details()


@pytest.mark.parametrize("name, words", [("ext_parent", "leaves"), ("ext_absolute", "bsolute"),
                                          ("ext_symlink", "symlink"), ("ext_symlink_dir", "symlink ('data')"),
                                          ("ext_hardlink", "hard link"),
                                          ("ext_short", "w.bin"), ("config_unknown_input", "features"),
                                          ("config_wrong_datatype", "FP64"), ("config_wrong_dims", "3"),
                                          ("config_unparsable", "config.pbtxt")])
def test_broken_model_reason_says_what_is_wrong(hostile_server, name, words):
    index = hostile_server.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    reasons = " ".join(m.reason for m in index.models if m.name == name)
    assert words in reasons, f"{name}: reason {reasons!r} does not mention {words!r}"


def test_nothing_in_a_model_file_was_executed(hostile_server, hostile_repository):
    _, marker = hostile_repository
    hostile_server.ServerLive(pb.ServerLiveRequest(), timeout=10)  # the repository has been loaded
    assert not marker.exists(), "a pickled model file ran code while loading"


def test_model_file_check_refuses_external_data_outside_the_folder(hostile_repository):
    from lstm_onnx.server.model_file import ModelFileError, check_model_file

    repo, _ = hostile_repository
    check_model_file(repo / "plain_add" / "1" / "model.onnx")
    for name in ("ext_parent", "ext_absolute", "ext_symlink", "ext_symlink_dir", "ext_hardlink", "ext_short",
                 "corrupt"):
        with pytest.raises(ModelFileError) as caught:
            check_model_file(repo / name / "1" / "model.onnx")
        assert str(repo / name) in str(caught.value) and "\n" not in str(caught.value)


# The run directory: what `export` trusts least after the network itself, and where pickles usually hide.

def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("fault, words", [
    ("pickle", "pickle"), ("pickle_v0", "safetensors"), ("missing", "missing"),
    ("missing_tensor", "missing"), ("wrong_shape", "shape"), ("config_not_json", "JSON"),
])
def test_export_refuses_a_broken_run_directory_and_writes_nothing(tmp_path, tiny_run_dir, fault, words):
    from safetensors.numpy import load_file, save_file

    from lstm_onnx.export.repository import export_to_repository
    from lstm_onnx.model.checkpoint import CheckpointError

    run = _copy_run(tiny_run_dir, tmp_path / "run")
    weights = run / "model.safetensors"
    marker = tmp_path / "pickle-ran"
    if fault == "pickle":
        weights.write_bytes(pickle.dumps(_Payload(marker)))
    elif fault == "pickle_v0":
        weights.write_bytes(pickle.dumps(_Payload(marker), protocol=0))
    elif fault == "missing":
        weights.unlink()
    elif fault in ("missing_tensor", "wrong_shape"):
        tensors = load_file(str(weights))
        key = sorted(tensors)[0]
        if fault == "missing_tensor":
            del tensors[key]
        else:
            tensors[key] = np.zeros((3, 3), np.float32)
        save_file(tensors, str(weights))
    elif fault == "config_not_json":
        (run / "config.json").write_text("{ not json")
    repo = tmp_path / "repo"
    with pytest.raises(CheckpointError) as caught:
        export_to_repository(run, repo, name="m", version=1)
    message = str(caught.value)
    assert words in message and "\n" not in message, message
    assert not marker.exists(), "a pickled weights file ran code"
    assert not (repo / "m").exists(), "a failed export left a model in the repository"
