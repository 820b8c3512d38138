"""`export --quantize int8`: the int8 model beside the float one, its contract, verify's budget, the audit of it,
and the real server loading it (self-test on the recorded sample and budget) and answering within the budget."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from audit_models import run_cli
from onnx import numpy_helper

from lstm_onnx.contract import read_contract


@pytest.fixture(scope="module")
def int8_repository(tiny_run_dir, tmp_path_factory):
    repo = tmp_path_factory.mktemp("int8") / "repo"
    proc = run_cli("export", str(tiny_run_dir), "--repository", str(repo), "--name", "tiny", "--quantize", "int8",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    return repo, json.loads(proc.stdout)


def _contract(path):
    contract, problem = read_contract(onnx.load(str(path)))
    assert problem is None
    return contract


def test_export_quantize_writes_int8_model_beside_the_float_one(int8_repository):
    repo, report = int8_repository
    float_path, int8_path = repo / "tiny" / "1" / "model.onnx", repo / "tiny_int8" / "1" / "model.onnx"
    assert float_path.is_file() and int8_path.is_file() and (repo / "tiny_int8" / "config.pbtxt").is_file()
    assert 'name: "tiny_int8"' in (repo / "tiny_int8" / "config.pbtxt").read_text()
    ops = [n.op_type for n in onnx.load(str(int8_path)).graph.node]
    assert ops.count("DynamicQuantizeLSTM") == 2 and "LSTM" not in ops
    q = _contract(int8_path)["quantization"]
    assert q["scheme"] == "int8" and q["float_model"] == {"name": "tiny", "version": 1} and q["per_channel"] is True
    # Every W and R gate of both layers has its quantization error recorded, within its scale/2 bound.
    # Every W and R gate of both layers, and the head (quantize_dynamic turns its Gemm into MatMulInteger).
    assert set(q["gate_errors"]) == {f"layer{k}.forward.{g}.{w}" for k in (0, 1) for w in "WR"
                                     for g in ("input", "output", "forget", "cell")} | {"head.weight_Transposed_quantized"}
    assert all(e["bound_share"] <= 1.001 for e in q["gate_errors"].values())
    # Layer 0's W rows hold one weight each (input_size 1): per channel, each is exactly its own scale x 127.
    assert all(e["max_abs"] == 0 for k, e in q["gate_errors"].items() if k.startswith("layer0") and k.endswith(".W"))
    assert all(e["max_abs"] > 0 for k, e in q["gate_errors"].items() if k.endswith(".R"))
    parity = _contract(int8_path)["parity"]
    assert parity["passed"] and parity["against"] == "PyTorch FP32" and parity["atol"] == q["budget"]["atol"]
    assert 0 < parity["tolerance_that_would_pass"]  # int8 is not FP32: the error is there and recorded
    assert report["quantized"]["path"] == str(int8_path.resolve())
    assert "parity_sample" in _contract(int8_path) and _contract(float_path).get("quantization") is None


def test_verify_holds_int8_model_to_its_budget_and_catches_a_wrong_gate(int8_repository, tiny_run_dir, tmp_path):
    repo, _ = int8_repository
    path = repo / "tiny_int8" / "1" / "model.onnx"
    proc = run_cli("verify", str(path), "--checkpoint", str(tiny_run_dir), "--provider", "cpu", "--json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    report = json.loads(proc.stdout)
    assert any(c["check"] == "int8_budget" for c in report["checks"])
    assert report["parity"]["atol"] == _contract(path)["quantization"]["budget"]["atol"]
    # Swap the input and forget gates' integer columns of layer 0's W: the budget must catch it.
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    q = numpy_helper.to_array(init).copy()  # (D, in, 4H)
    h = q.shape[2] // 4
    q[:, :, 0:h], q[:, :, 2 * h:3 * h] = q[:, :, 2 * h:3 * h].copy(), q[:, :, 0:h].copy()
    init.CopyFrom(numpy_helper.from_array(q, init.name))
    bad = tmp_path / "swapped.onnx"
    onnx.save(model, str(bad))
    proc = run_cli("verify", str(bad), "--checkpoint", str(tiny_run_dir), "--provider", "cpu")
    assert proc.returncode == 1 and "parity" in proc.stderr


def test_audit_of_int8_model_against_checkpoint_and_float(int8_repository, tiny_run_dir):
    from lstm_onnx.export.audit import audit_model

    repo, _ = int8_repository
    path = repo / "tiny_int8" / "1" / "model.onnx"
    audit = audit_model(path, checkpoint=tiny_run_dir)
    assert not audit.errors, [f.message for f in audit.errors]  # digests of the dequantized gates, counts, provenance
    gates = [g for layer in audit.layers for g in layer.gates if g.kind in ("W", "R")]
    assert gates and all(audit.checkpoint[g.key]["within_scale_half"] for g in gates)
    assert set(audit.quant_errors) == {g.key for g in gates} | {"head.weight_Transposed_quantized"}
    assert audit.checkpoint_params == audit.total_params
    against = audit_model(path, against=repo / "tiny" / "1" / "model.onnx", fail_on_change=True)
    assert not against.errors and {e["status"] for e in against.against.values()} <= {"identical", "quantized"}


def test_export_quantize_refuses_gru_with_the_reason(tiny_gru_run_dir, tmp_path):
    proc = run_cli("export", str(tiny_gru_run_dir), "--repository", str(tmp_path / "repo"), "--quantize", "int8")
    assert proc.returncode == 1
    assert "expected an LSTM" in proc.stderr and "GRU" in proc.stderr
    assert not (tmp_path / "repo" / "gru_model_int8").exists()


def test_server_loads_int8_model_and_self_tests_with_the_recorded_budget(int8_repository, tmp_path):
    from lstm_onnx.server.repository import Repository
    from lstm_onnx.server.runtime import RuntimeOptions, decode_sample_tensor

    repo, _ = int8_repository
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".*"))
    served = Repository(copy, RuntimeOptions(provider="cpu", intra_op_threads=1), 64, 500)
    served.load_all()
    assert served.ready, {n: [v.reason for v in m.versions.values()] for n, m in served.models.items()}
    runtime = served.resolve("tiny_int8").runtime
    sample = _contract(copy / "tiny_int8" / "1" / "model.onnx")["parity_sample"]
    assert runtime.parity_sample["atol"] == sample["atol"] and sample["rtol"] > 0
    feeds = {k: decode_sample_tensor(v) for k, v in sample["inputs"].items()}
    got = runtime.predict(feeds)
    want = decode_sample_tensor(sample["outputs"]["output"])
    assert 0 < np.abs(got["output"] - want).max() <= sample["atol"] + sample["rtol"] * np.abs(want).max()
    # A budget the int8 model cannot meet makes the self-test fail, naming the output.
    runtime.parity_sample = dict(sample, atol=1e-9, rtol=0.0)
    assert "self-test output" in (runtime.self_test() or "")


def test_audit_explains_a_model_quantized_after_export(tiny_repository, tmp_path):
    """Our float model run through quantize_dynamic by hand keeps the float digests: the audit says why they differ."""
    from lstm_onnx.export.audit import audit_model
    from lstm_onnx.export.quantization import quantize_int8

    float_path = tiny_repository / "tiny_lstm" / "1" / "model.onnx"
    quantize_int8(float_path, tmp_path / "by_hand.onnx")
    audit = audit_model(tmp_path / "by_hand.onnx")
    (mismatch,) = [f for f in audit.errors if f.code == "DIGEST_MISMATCH"]
    assert "quantized after export" in mismatch.message and "--against" in mismatch.message
    against = audit_model(tmp_path / "by_hand.onnx", against=float_path, fail_on_change=True)
    assert not [f for f in against.errors if f.code == "CHANGED_GATES"]
