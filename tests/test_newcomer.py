"""Newcomer mistakes end in one clear line and exit 1 or 2, never a traceback; the protocol surface says only what is true."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 180):
    return subprocess.run([sys.executable, "-m", "lstm_onnx", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env=env or dict(os.environ))


def assert_one_line(proc, code: int, *needles: str) -> str:
    """Exit `code`, no traceback, and the last stderr line (the error) names every needle."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("lstm-onnx")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _quiet(**extra: str) -> dict:
    return dict(os.environ, LSTM_ONNX_LOG_LEVEL="ERROR", **extra)


@pytest.fixture()
def held_port():
    """A port some other process holds (listening), as Triton on 8001 would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_busy_grpc_port_is_one_line(tiny_repository, held_port):
    proc = run_cli("serve", "--model-repository", str(tiny_repository), "--grpc-port", str(held_port), "--http-port", "-1",
                   "--metrics-port", "-1", env=_quiet())
    assert_one_line(proc, 1, f"gRPC port 127.0.0.1:{held_port}", "--grpc-port")


def test_busy_metrics_port_is_one_line_without_loop_noise(tiny_repository, held_port):
    proc = run_cli("serve", "--model-repository", str(tiny_repository), "--grpc-port", "0", "--http-port", "-1",
                   "--metrics-port", str(held_port), env=_quiet())
    assert_one_line(proc, 1, f"metrics port 127.0.0.1:{held_port}", "--metrics-port")


def test_empty_repository_exits_unless_told_otherwise(tmp_path):
    (tmp_path / "repo").mkdir()
    proc = run_cli("serve", "--model-repository", str(tmp_path / "repo"), "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1",
                   env=_quiet())
    assert_one_line(proc, 1, "no model directories", "--exit-on-error false")


def test_a_model_that_fails_to_load_exits_with_its_reason(tiny_repository, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo, ignore=shutil.ignore_patterns(".*"))
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    proc = run_cli("serve", "--model-repository", str(repo), "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1", env=_quiet())
    assert_one_line(proc, 1, "model 'broken'", "not a readable ONNX model")


def test_exit_on_error_false_serves_the_models_that_loaded_and_strict_readiness_reports_them(tiny_repository,
                                                                                             tmp_path):
    import shutil

    import tritonclient.grpc as tc

    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo, ignore=shutil.ignore_patterns(".*"))
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    for strict, ready in (("true", False), ("false", True)):
        settings = ServerSettings(model_repository=str(repo), grpc_port=0, http_port=-1, metrics_port=-1, exit_on_error="false",
                                  strict_readiness=strict)
        with BackgroundServer(settings) as srv:
            client = tc.InferenceServerClient(srv.url)
            assert client.is_server_ready() is ready
            assert client.is_model_ready("tiny_lstm") and not client.is_model_ready("broken")
            client.close()


def test_provider_cuda_without_cuda_exits_with_the_reason(tiny_repository):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and Path("/dev/nvidiactl").exists():
        pytest.skip("this machine has a usable CUDA: the refusal cannot happen here")
    proc = run_cli("serve", "--model-repository", str(tiny_repository), "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1",
                   "--provider", "cuda", env=_quiet())
    assert_one_line(proc, 1, "provider cuda", "--provider auto or cpu")


def test_verify_against_another_architecture_is_one_line(tiny_repository, tiny_gru_run_dir):
    proc = run_cli("verify", str(tiny_repository / "tiny_lstm" / "1" / "model.onnx"), "--checkpoint",
                   str(tiny_gru_run_dir))
    line = assert_one_line(proc, 1, "architecture")
    assert "the model is a 2-layer LSTM hidden 8" in line and "the checkpoint is a 2-layer GRU hidden 8" in line


def test_export_of_an_incomplete_run_names_what_is_missing(tiny_run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run_dir / "config.json", run / "config.json")
    proc = run_cli("export", str(run), "--repository", str(tmp_path / "repo"))
    assert_one_line(proc, 2, "is incomplete", "missing model.safetensors")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_integer_regression_labels_get_the_task_hint(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(20, 5, 1)).astype(np.float32), y=rng.integers(-21, 14, size=20))
    proc = run_cli("train", "--output", str(tmp_path / "run"), "--data", str(tmp_path / "d.npz"), "--dry-run",
                   "--no-progress")
    assert_one_line(proc, 1, "class labels range over", "--task regression")
    assert not (tmp_path / "run").exists()


def test_csv_missing_a_column_names_it(tmp_path):
    (tmp_path / "d.csv").write_text("y,t0_f0,t2_f0\n1,0.1,0.2\n0,0.3,0.1\n")
    proc = run_cli("train", "--output", str(tmp_path / "run"), "--data", str(tmp_path / "d.csv"), "--dry-run",
                   "--no-progress")
    assert_one_line(proc, 1, "missing column t1_f0")


@pytest.mark.parametrize("module,extra,command", [
    ("grpc", "serve", ["serve", "--model-repository", "."]),
    ("grpc", "serve", ["infer", "--model", "m", "--random", "1,2"]),
    ("torch", "train", ["export", "run", "--repository", "repo"]),
])
def test_a_missing_extra_names_the_extra(tmp_path, module, extra, command):
    blocker = tmp_path / "blocked" / module
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n")
    proc = run_cli(*command, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(blocker.parent)))
    assert_one_line(proc, 1, f"needs '{module}'", f"pip install 'lstm-onnx[{extra}]'")


def test_output_piped_to_head_ends_quietly(tmp_path):
    """`lstm-onnx train ... | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "lstm_onnx", "train", "--output", str(tmp_path / "run"),
                             "--dry-run", "--no-progress", "--hidden-size", "4", "--num-layers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    proc.stdout.readline()
    proc.stdout.close()  # like head after its first line
    err = proc.stderr.read()
    assert proc.wait(timeout=180) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


# Each subcommand with arguments a newcomer might give: wrong types, missing files, nonsense values.
BAD_ARGUMENTS: dict[str, list[list[str]]] = {
    "train": [["--output", "{tmp}/r", "--epochs", "-1"], ["--output", "{tmp}/r", "--data", "{tmp}/nope.npz"],
              ["--output", "{tmp}/r", "--hidden-size", "zero"], ["--output", "{tmp}/r", "--num-layers", "99"],
              ["--output", "{tmp}/r", "--data", "{tmp}/garbage.npz"], ["--output", "{tmp}/r", "--lr", "nan"]],
    "export": [["{tmp}/nope", "--repository", "{tmp}/repo"], ["{tmp}/garbage.npz", "--repository", "{tmp}/repo"],
               ["{tmp}", "--repository", "{tmp}/repo", "--opset", "3"]],
    "verify": [["{tmp}/nope.onnx", "--checkpoint", "{tmp}"], ["{tmp}/garbage.npz", "--checkpoint", "{tmp}"]],
    "audit": [["{tmp}/nope.onnx"], ["{tmp}/garbage.npz"], ["{tmp}/garbage.npz", "--checkpoint", "{tmp}/nope"]],
    "serve": [["--model-repository", "{tmp}/nope"], ["--model-repository", "{tmp}", "--grpc-port", "70000"],
              ["--model-repository", "{tmp}", "--workers", "0"], ["--model-repository", "{tmp}", "--max-sequences",
                                                                   "-3"]],
    "infer": [["--url", "127.0.0.1:1", "--model", "m", "--random", "1,2"], ["--model", "m", "--random", "x"],
              ["--url", "127.0.0.1:1", "--model", "m", "--input", "{tmp}/nope.npy"]],
    "stream": [["--url", "127.0.0.1:1", "--model", "m", "--input", "{tmp}/nope.npy", "--chunk", "2"],
               ["--url", "127.0.0.1:1", "--model", "m", "--input", "{tmp}/garbage.npz", "--chunk", "0"]],
    "bench": [["--url", "127.0.0.1:1", "--model", "m", "--concurrency", "a,b"],
              ["--url", "127.0.0.1:1", "--model", "m", "--requests", "-1"]],
}


def test_every_subcommand_refuses_bad_arguments_without_a_traceback(tmp_path):
    (tmp_path / "garbage.npz").write_bytes(random.Random(0).randbytes(64))
    from lstm_onnx.cli import COMMANDS

    assert set(BAD_ARGUMENTS) == set(COMMANDS), "every subcommand gets bad arguments"
    for command, cases in BAD_ARGUMENTS.items():
        for case in cases:
            args = [a.format(tmp=tmp_path) for a in case]
            proc = run_cli(command, *args, cwd=tmp_path, env=_quiet(), timeout=120)
            assert proc.returncode in (1, 2), (command, args, proc.returncode, proc.stderr[-1500:])
            assert "Traceback" not in proc.stderr, (command, args, proc.stderr[-1500:])
            assert proc.stderr.strip(), (command, args)


# --- the protocol surface says only what is true -----------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_repository):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    with BackgroundServer(ServerSettings(model_repository=str(tiny_repository), grpc_port=0, http_port=-1, metrics_port=-1)) as srv:
        yield srv


def test_server_metadata_does_not_advertise_model_control(triton):
    extensions = set(triton.get_server_metadata().extensions)
    assert "model_repository" not in extensions  # RepositoryModelLoad/Unload are not implemented
    assert {"model_configuration", "statistics", "sequence", "streaming"} <= extensions


def test_model_ready_for_an_unknown_model_is_false_as_in_triton(triton):
    assert triton.is_model_ready("nope") is False
    assert triton.is_model_ready("tiny_lstm", "99") is False
    assert triton.is_model_ready("tiny_lstm") is True


def test_reflection_v1_and_v1alpha_both_list_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(server.url) as channel:
        for package in ("grpc.reflection.v1", "grpc.reflection.v1alpha"):
            call = channel.stream_stream(f"/{package}.ServerReflection/ServerReflectionInfo",
                                         request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                         response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            (answer,) = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            names = {s.name for s in answer.list_services_response.service}
            assert {"inference.GRPCInferenceService", "grpc.reflection.v1.ServerReflection"} <= names, package


def test_stream_to_an_unknown_model_says_not_found_like_unary(server):
    from lstm_onnx.client.client import ClientError, InferenceClient

    x = np.zeros((1, 2, 1), np.float32)
    with InferenceClient(server.url) as client:
        with pytest.raises(ClientError) as unary:
            client.infer("nope", {"input": x})
        with pytest.raises(ClientError) as streamed:
            list(client.stream_sequence("nope", [{"input": x}], 1))
    assert unary.value.code == streamed.value.code == grpc.StatusCode.NOT_FOUND
    assert str(unary.value) == str(streamed.value)


def test_stream_with_triton_grpc_error_header_ends_with_the_real_status(server):
    from lstm_onnx.protocol.codec import encode_request
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    request = encode_request("nope", {"input": np.zeros((1, 2, 1), np.float32)})
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ModelStreamInfer(iter([request]), metadata=(("triton_grpc_error", "true"),), timeout=10))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "model 'nope' not found" in info.value.details()


def test_int_contents_for_fp32_names_both_fields(server):
    from lstm_onnx.protos import grpc_service_pb2 as pb
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name="tiny_lstm")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 2, 1])
    tensor.contents.int_contents.extend([1, 2])
    with grpc.insecure_channel(server.url) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contents.int_contents" in info.value.details() and "contents.fp32_contents" in info.value.details()
