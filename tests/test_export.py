"""Export: explicit recurrent nodes, dynamic axes, readable names, contract, Triton config, atomic writes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from lstm_onnx.contract import file_digest, read_contract
from lstm_onnx.export.onnx_export import ExportError, check_explicit
from lstm_onnx.export.repository import export_to_repository
from lstm_onnx.model.checkpoint import load_run

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lstm_onnx", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(cell="gru"), dict(num_layers=1), dict(bidirectional=True), dict(cell="gru", bidirectional=True, num_layers=3),
     dict(num_layers=8), dict(dropout=0.3, num_layers=3)],
    ids=["lstm2", "gru2", "lstm1", "bilstm2", "bigru3", "lstm8", "dropout"],
)
def test_export_writes_one_explicit_node_per_layer(make_run_dir, tmp_path, overrides):
    run = make_run_dir(**overrides)
    report = export_to_repository(run, tmp_path, name="m")
    model = onnx.load(tmp_path / "m" / "1" / "model.onnx")
    net, config = load_run(run)
    c = config.model
    op = c.cell.upper()
    nodes = [n for n in model.graph.node if n.op_type in ("LSTM", "GRU")]
    assert [n.op_type for n in nodes] == [op] * c.num_layers
    assert [n.name for n in nodes] == [f"layer{k}.{c.cell}" for k in range(c.num_layers)]
    assert all(a.i == 0 for n in nodes for a in n.attribute if a.name == "layout")
    onnx.checker.check_model(model, full_check=True)
    assert report["parity"]["passed"] and report["parity"]["cases_run"] >= 54


def test_exported_model_runs_at_other_batch_and_time(tiny_run_dir, tmp_path):
    export_to_repository(tiny_run_dir, tmp_path, name="m")
    session = _session(tmp_path / "m" / "1" / "model.onnx")
    net, config = load_run(tiny_run_dir)
    rng = np.random.default_rng(3)
    for batch, time in [(1, 1), (5, 13), (2, 200)]:
        x = rng.standard_normal((batch, time, config.model.input_size)).astype(np.float32)
        state = [np.zeros((batch, 2, 8), np.float32)] * 2
        got = session.run(None, {"input": x, "h0": state[0], "c0": state[1]})
        with torch.no_grad():
            want = [t.numpy() for t in net(torch.from_numpy(x))]
        for g, w in zip(got, want):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, atol=1e-5)


def test_chunked_sequence_equals_whole(tiny_run_dir, tmp_path):
    export_to_repository(tiny_run_dir, tmp_path, name="m")
    session = _session(tmp_path / "m" / "1" / "model.onnx")
    x = np.random.default_rng(0).standard_normal((2, 30, 1)).astype(np.float32)
    zeros = np.zeros((2, 2, 8), np.float32)
    whole = session.run(None, {"input": x, "h0": zeros, "c0": zeros})
    h, c = zeros, zeros
    for start in range(0, 30, 4):
        out, h, c = session.run(None, {"input": x[:, start:start + 4], "h0": h, "c0": c})
    np.testing.assert_allclose(out, whole[0], atol=1e-5)
    np.testing.assert_allclose(h, whole[1], atol=1e-5)


def test_initializers_and_contract_are_readable(tiny_run_dir, tmp_path):
    export_to_repository(tiny_run_dir, tmp_path, name="m")
    model = onnx.load(tmp_path / "m" / "1" / "model.onnx")
    names = {i.name for i in model.graph.initializer}
    assert {"layer0.W", "layer0.R", "layer0.B", "layer1.W", "layer1.R", "layer1.B", "head.weight", "head.bias"} <= names
    contract, problem = read_contract(model)
    assert problem is None
    assert contract["cell"] == "lstm" and contract["num_layers"] == 2 and contract["hidden_size"] == 8
    assert contract["state"] == [{"input": "h0", "output": "hn"}, {"input": "c0", "output": "cn"}]
    assert contract["checkpoint_digest"] == file_digest(tiny_run_dir / "model.safetensors")
    # 2 layers x 1 direction x 4 gates x (W, R, bW, bR)
    assert len(contract["gate_digests"]) == 32
    assert "layer1.forward.forget.R" in contract["gate_digests"]
    assert contract["parity"]["passed"] is True
    assert set(contract["parity_sample"]["inputs"]) == {"input", "h0", "c0"}
    batch_inputs = [i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input]
    assert batch_inputs == ["batch", "batch", "batch"]
    assert model.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "time"


def test_config_pbtxt_parses_as_triton_model_config(tiny_gru_run_dir, tmp_path):
    export_to_repository(tiny_gru_run_dir, tmp_path, name="g", version=3, max_batch_size=16)
    text = (tmp_path / "g" / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == "g" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert [(i.name, list(i.dims), i.optional) for i in config.input] == [("input", [-1, 1], False)]
    assert [(o.name, list(o.dims)) for o in config.output] == [("output", [4]), ("hn", [2, 8])]
    # h0 is implicit state, fed back from hn by the sequence batcher (tests/test_triton_rules.py checks the rules).
    states = [(s.input_name, s.output_name, list(s.dims)) for s in config.sequence_batching.state]
    assert states == [("h0", "hn", [2, 8])]
    assert config.sequence_batching.oldest.max_queue_delay_microseconds > 0
    assert list(config.sequence_batching.oldest.preferred_batch_size) == [16]
    assert (tmp_path / "g" / "3" / "model.onnx").is_file()


def test_check_explicit_rejects_missing_fewer_and_looped_recurrence(tiny_run_dir, tmp_path):
    export_to_repository(tiny_run_dir, tmp_path, name="m")
    model = onnx.load(tmp_path / "m" / "1" / "model.onnx")
    check_explicit(model, "lstm", 2)
    with pytest.raises(ExportError, match="2 LSTM nodes, expected 3"):
        check_explicit(model, "lstm", 3)
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    keep = [n for n in stripped.graph.node if n.op_type != "LSTM"]
    del stripped.graph.node[:]
    stripped.graph.node.extend(keep)
    with pytest.raises(ExportError, match="no LSTM node"):
        check_explicit(stripped, "lstm", 2)
    stripped.graph.node.append(onnx.helper.make_node("Loop", ["a", "b"], ["c"]))
    with pytest.raises(ExportError, match="Loop"):
        check_explicit(stripped, "lstm", 2)


def test_export_failure_writes_nothing_and_exits_1(tiny_run_dir, tmp_path):
    repo = tmp_path / "repo"
    report = tmp_path / "report.json"
    result = _cli("export", str(tiny_run_dir), "--repository", str(repo), "--name", "m", "--atol", "1e-12", "--floor-factor", "0", "--report", str(report))
    assert result.returncode == 1, result.stderr
    assert "parity failed" in result.stderr and "nothing was written" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (repo / "m").exists()
    assert not [p for p in repo.iterdir()] if repo.exists() else True
    data = json.loads(report.read_text())
    assert data["passed"] is False and data["parity"]["tolerance_that_would_pass"] > 1e-12


def test_export_cli_user_errors_exit_2(tmp_path, tiny_run_dir):
    result = _cli("export", str(tmp_path / "missing"), "--repository", str(tmp_path / "r"))
    assert result.returncode == 2 and "not found" in result.stderr
    result = _cli("export", str(tiny_run_dir), "--repository", str(tmp_path / "r"), "--name", "../evil")
    assert result.returncode == 1 and "model name" in result.stderr
    assert not (tmp_path / "evil").exists()


def test_reexport_replaces_version_and_keeps_others(tiny_run_dir, tiny_gru_run_dir, tmp_path):
    export_to_repository(tiny_run_dir, tmp_path, name="m", version=1)
    export_to_repository(tiny_run_dir, tmp_path, name="m", version=2)
    export_to_repository(tiny_run_dir, tmp_path, name="m", version=1)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2", "config.pbtxt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_verify_cli_passes_and_reports_tolerance(tiny_run_dir, tmp_path):
    export_to_repository(tiny_run_dir, tmp_path, name="m")
    result = _cli("verify", str(tmp_path / "m" / "1" / "model.onnx"), "--checkpoint", str(tiny_run_dir), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["parity"]["providers"] == ["CPUExecutionProvider"]
    names = {c["case"] for c in report["parity"]["cases"]}
    assert {"random-state", "zero-nostate", "large-state", "chunked-7"} <= names
    assert {(c["batch"], c["time"]) for c in report["parity"]["cases"]} >= {(1, 1), (3, 7), (16, 64)}
    # FP32's own distance from FP64 is measured on the same cases, to judge the tolerance against.
    assert set(report["parity"]["fp32_floor"]) == {"output", "hn", "cn"}
    assert all(0 <= v < 1e-3 for v in report["parity"]["fp32_floor"].values())
    text = _cli("verify", str(tmp_path / "m" / "1" / "model.onnx"), "--checkpoint", str(tiny_run_dir))
    assert "parity passed: onnxruntime (CPU) against PyTorch on " in text.stdout and "PASSED" in text.stdout
    assert "tolerance that would have passed" not in text.stdout  # the table waits for --table
    table = _cli("verify", str(tmp_path / "m" / "1" / "model.onnx"), "--checkpoint", str(tiny_run_dir), "--table")
    assert "tolerance that would have passed" in table.stdout and "CPUExecutionProvider   output" in table.stdout


def test_verify_fails_against_another_checkpoint(tiny_run_dir, make_run_dir, tmp_path):
    other = make_run_dir(hidden_size=8, num_layers=2, dropout=0.1)  # same shapes, other weights
    export_to_repository(tiny_run_dir, tmp_path, name="m")
    result = _cli("verify", str(tmp_path / "m" / "1" / "model.onnx"), "--checkpoint", str(other))
    assert result.returncode == 1
    assert "checkpoint_digest" in result.stderr and "parity" in result.stderr
    assert "FAIL" in result.stdout


def test_verify_rejects_corrupt_model_and_unavailable_provider(tiny_run_dir, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    result = _cli("verify", str(bad), "--checkpoint", str(tiny_run_dir))
    assert result.returncode == 2 and "not a readable ONNX model" in result.stderr
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        export_to_repository(tiny_run_dir, tmp_path, name="m")
        result = _cli("verify", str(tmp_path / "m" / "1" / "model.onnx"), "--checkpoint", str(tiny_run_dir), "--provider", "cuda")
        assert result.returncode == 2 and "CUDAExecutionProvider is not available" in result.stderr


def _move_head_bias(src: Path, dst: Path, delta: float) -> Path:
    """A copy of the exported model with one element of the head bias moved by `delta` (nothing else touched)."""
    from onnx import numpy_helper

    model = onnx.load(str(src))
    (bias,) = [t for t in model.graph.initializer if t.name == "head.bias"]
    moved = numpy_helper.to_array(bias).copy()
    moved[0] += np.float32(delta)
    bias.CopyFrom(numpy_helper.from_array(moved, "head.bias"))
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("delta, passes", [(1e-4, False), (1e-7, True)], ids=["1e-4-fails", "1e-7-passes"])
def test_verify_threshold_catches_a_head_bias_moved_by_1e_4_and_not_by_1e_7(tiny_run_dir, tmp_path, delta, passes):
    """The parity threshold pinned: atol/rtol 1e-5 must see 1e-4 on one output and let FP32 rounding through."""
    export_to_repository(tiny_run_dir, tmp_path, name="m")
    moved = _move_head_bias(tmp_path / "m" / "1" / "model.onnx", tmp_path / "moved.onnx", delta)
    result = _cli("verify", str(moved), "--checkpoint", str(tiny_run_dir), "--provider", "cpu", "--json")
    report = json.loads(result.stdout)
    assert (result.returncode, report["passed"]) == ((0, True) if passes else (1, False)), result.stderr
    needed = report["parity"]["atol_needed"]["output"]
    if passes:
        assert needed < 1e-5, f"a 1e-7 bias move needed atol {needed:.2e}"
    else:
        assert report["parity"]["cases_failed"] == report["parity"]["cases_run"]  # every case reads the head
        assert 0.5e-4 < needed < 2e-4, f"a 1e-4 bias move was measured as {needed:.2e}"
