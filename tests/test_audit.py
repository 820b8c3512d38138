"""The weight audit on our own models: per-gate split, findings, CLI outputs, checkpoint provenance, no torch."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from audit_models import codes, contract_model, random_layers, run_cli, save

from lstm_onnx.export.audit import audit_model

GOLDEN = Path(__file__).parent / "data" / "audit_golden.txt"


def test_audit_splits_fused_tensors_in_onnx_gate_order(tmp_path):
    layers = random_layers("LSTM", 2, hidden=4, input_size=3)
    audit = audit_model(save(contract_model(layers=layers), tmp_path / "m.onnx"))
    assert not audit.errors, audit.findings
    gates = {g.key: g for layer in audit.layers for g in layer.gates}
    w0, r1, b1 = layers[0][0], layers[1][1], layers[1][2]
    # ONNX rows are i, o, f, c: forget is the third block, output the second.
    np.testing.assert_array_equal(gates["layer0.forward.forget.W"].array, w0[0, 8:12])
    np.testing.assert_array_equal(gates["layer0.forward.output.W"].array, w0[0, 4:8])
    np.testing.assert_array_equal(gates["layer1.forward.cell.R"].array, r1[0, 12:16])
    np.testing.assert_array_equal(gates["layer1.forward.input.bR"].array, b1[0, 16:20])
    assert len(gates) == 2 * 4 * 4
    floats = sum(a.size for layer in layers for a in layer) + 2 * 4 + 2
    assert audit.total_params == floats
    assert [x.input_size for x in audit.layers] == [3, 4]


def test_audit_flags_tied_layers(tmp_path):
    layers = random_layers("LSTM", 2, hidden=4, input_size=4)
    layers[1] = tuple(a.copy() for a in layers[0])  # one cell object stacked twice
    path = save(contract_model(layers=layers), tmp_path / "tied.onnx")
    audit = audit_model(path)
    tied = [f for f in audit.findings if f.code == "TIED_WEIGHTS"]
    assert len(tied) == 1 and tied[0].severity == "error"
    assert "layer0.forward and layer1.forward" in tied[0].message
    assert "layer1.forward.forget.R" in tied[0].tensors
    proc = run_cli("audit", str(path))
    assert proc.returncode == 1
    assert "TIED_WEIGHTS" in proc.stderr and "TIED_WEIGHTS" in proc.stdout


def test_audit_flags_gate_copied_across_gates(tmp_path):
    layers = random_layers("GRU", 1, hidden=3, input_size=2)
    w = layers[0][0]
    w[0, 3:6] = w[0, 0:3]  # reset rows copied from update rows
    audit = audit_model(save(contract_model("GRU", layers=layers), tmp_path / "g.onnx"))
    tied = [f for f in audit.findings if f.code == "TIED_WEIGHTS"]
    assert [sorted(f.tensors) for f in tied] == [["layer0.forward.reset.W", "layer0.forward.update.W"]]


def test_audit_flags_nan_and_inf(tmp_path):
    layers = random_layers("LSTM", 2, hidden=4, input_size=3)
    layers[1][1][0, 5, 2] = np.nan
    layers[1][1][0, 6, 0] = np.inf
    audit = audit_model(save(contract_model(layers=layers, digests={}), tmp_path / "nan.onnx"))
    bad = [f for f in audit.findings if f.code == "NONFINITE"]
    assert len(bad) == 1 and bad[0].severity == "error"
    assert "'layer1.R' holds 1 NaN and 1 Inf" in bad[0].message
    assert bad[0].tensors == ["layer1.forward.output.R"]


def test_audit_warns_on_zero_and_constant_gates(tmp_path):
    layers = random_layers("LSTM", 1, hidden=4, input_size=3)
    layers[0][1][0, 8:12] = 0.0  # forget R
    layers[0][0][0, 12:16] = 0.25  # cell W
    path = save(contract_model(layers=layers), tmp_path / "z.onnx")
    audit = audit_model(path)
    found = {(f.code, f.severity, tuple(f.tensors)) for f in audit.findings if f.code in ("ZERO_GATE", "CONSTANT_GATE")}
    assert found == {("ZERO_GATE", "warning", ("layer0.forward.forget.R",)),
                     ("CONSTANT_GATE", "warning", ("layer0.forward.cell.W",))}
    assert run_cli("audit", str(path)).returncode == 0  # warnings do not fail the build


def test_audit_reports_digest_mismatch(tmp_path):
    layers = random_layers("LSTM", 2, hidden=4, input_size=3)
    model = contract_model(layers=layers)
    layers[0][1][0, 0, 0] += 1e-3  # a weight changed after export; the recorded digest still has the old one
    contract = json.loads(model.metadata_props[0].value)
    tampered = contract_model(layers=layers, digests=contract["gate_digests"])
    audit = audit_model(save(tampered, tmp_path / "d.onnx"))
    mism = [f for f in audit.findings if f.code == "DIGEST_MISMATCH"]
    assert len(mism) == 1 and mism[0].tensors == ["layer0.forward.input.R"]
    assert audit.errors


def test_audit_without_checkpoint_says_training_cannot_be_judged(tmp_path):
    audit = audit_model(save(contract_model(), tmp_path / "m.onnx"))
    assert codes(audit) == {"UNTRAINED_UNKNOWN"}
    assert "cannot be determined" in audit.findings[0].message


def test_audit_json_and_npz_carry_every_gate(tmp_path):
    path = save(contract_model(directions=2), tmp_path / "bi.onnx")
    npz = tmp_path / "gates.npz"
    proc = run_cli("audit", str(path), "--json", "--gates-npz", str(npz))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["format"] == "lstm-onnx-audit/1"
    entries = {g["key"]: g for layer in report["layers"] for g in layer["gates"]}
    stored = np.load(npz)
    assert set(stored.files) == set(entries)
    assert "layer1.reverse.forget.bR" in entries
    for key in ("layer0.reverse.cell.W", "layer1.forward.output.R"):
        expected = "sha256:" + hashlib.sha256(np.ascontiguousarray(stored[key], "<f4").tobytes()).hexdigest()
        assert entries[key]["sha256"] == expected
    assert report["totals"]["total"] == report["totals"]["recurrent"] + report["totals"]["head"]
    assert proc.stdout == json.dumps(report, indent=2, sort_keys=True) + "\n"  # stable key order


def test_audit_plot_writes_png(tmp_path):
    path = save(contract_model("GRU"), tmp_path / "g.onnx")
    proc = run_cli("audit", str(path), "--plot", str(tmp_path / "g.png"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_audit_missing_model_is_a_usage_error(tmp_path):
    proc = run_cli("audit", str(tmp_path / "nope.onnx"))
    assert proc.returncode == 2
    assert "nope.onnx: not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_audit_runs_without_torch(tmp_path):
    blocker = tmp_path / "blocked"
    for name in ("torch", "onnxruntime", "safetensors"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked for this test')\n")
    path = save(contract_model(), tmp_path / "m.onnx")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(Path(__file__).resolve().parent.parent)]))
    proc = run_cli("audit", str(path), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True


def test_audit_text_report_matches_golden(tmp_path):
    layers = random_layers("LSTM", 2, hidden=2, input_size=1, seed=7)
    path = save(contract_model(layers=layers, hidden=2, input_size=1, outputs=1, seed=7), tmp_path / "golden.onnx")
    from lstm_onnx.export.audit.report import format_text

    text = format_text(audit_model(path)).replace(str(path), "MODEL")
    if os.environ.get("LSTM_ONNX_UPDATE_GOLDEN"):  # write, and compare nothing in this run
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
        pytest.skip(f"updated {GOLDEN}")
    assert text == GOLDEN.read_text(), "audit_golden.txt differs; rerun with LSTM_ONNX_UPDATE_GOLDEN=1 if intended"


# --- really exported models, with their run directories ---------------------------------------------------


def _state_dict_numel(path: Path) -> int:
    from safetensors.numpy import load_file  # the test uses the real library as an independent reader

    return sum(a.size for a in load_file(str(path)).values())


@pytest.mark.parametrize("name", ["tiny_lstm", "tiny_gru"])
def test_audit_exported_model_matches_its_checkpoint(tiny_repository, tiny_run_dir, tiny_gru_run_dir, name):
    run_dir = tiny_run_dir if name == "tiny_lstm" else tiny_gru_run_dir
    audit = audit_model(tiny_repository / name / "1" / "model.onnx", checkpoint=run_dir)
    assert not audit.errors, audit.findings
    assert audit.total_params == _state_dict_numel(run_dir / "model.safetensors")
    assert audit.checkpoint and all(info["identical"] for info in audit.checkpoint.values())
    assert all(info["change"] > 1e-7 for info in audit.checkpoint.values())
    assert codes(audit) <= {"LOOP_PRESENT"}
    hidden = audit.layers[0].hidden_size
    block = ("forget" if name == "tiny_lstm" else "update", 1)  # PyTorch row block 1: f for LSTM, z for GRU
    assert audit.checkpoint[f"layer1.forward.{block[0]}.R"]["pytorch"] == f"rnn.weight_hh_l1[{hidden}:{2 * hidden}]"


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def test_audit_flags_untrained_gate_against_init(tiny_repository, tiny_run_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    run = _copy_run(tiny_run_dir, tmp_path / "run")
    trained, init = load_file(str(run / "model.safetensors")), load_file(str(run / "init.safetensors"))
    h = trained["rnn.weight_hh_l1"].shape[1]
    init["rnn.weight_hh_l1"][h:2 * h] = trained["rnn.weight_hh_l1"][h:2 * h]  # forget rows never moved
    save_file(init, str(run / "init.safetensors"))
    model = tiny_repository / "tiny_lstm" / "1" / "model.onnx"
    audit = audit_model(model, checkpoint=run)
    untrained = [f for f in audit.findings if f.code == "UNTRAINED_GATE"]
    assert [(f.severity, f.tensors) for f in untrained] == [("error", ["layer1.forward.forget.R"])]
    proc = run_cli("audit", str(model), "--checkpoint", str(run))
    assert proc.returncode == 1 and "UNCHANGED" in proc.stdout


def test_audit_never_trained_checkpoint_is_a_warning(tiny_repository, tiny_run_dir, tmp_path):
    run = _copy_run(tiny_run_dir, tmp_path / "run")
    shutil.copy(run / "model.safetensors", run / "init.safetensors")
    audit = audit_model(tiny_repository / "tiny_lstm" / "1" / "model.onnx", checkpoint=run)
    untrained = [f for f in audit.findings if f.code == "UNTRAINED_GATE"]
    assert [f.severity for f in untrained] == ["warning"] and "training never ran" in untrained[0].message


def test_audit_flags_checkpoint_mismatch(tiny_repository, tiny_run_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    run = _copy_run(tiny_run_dir, tmp_path / "run")
    weights = load_file(str(run / "model.safetensors"))
    weights["rnn.weight_ih_l0"][3, 0] = np.nextafter(weights["rnn.weight_ih_l0"][3, 0], np.float32(1))  # one ulp
    save_file(weights, str(run / "model.safetensors"))
    audit = audit_model(tiny_repository / "tiny_lstm" / "1" / "model.onnx", checkpoint=run)
    mism = [f for f in audit.findings if f.code == "CHECKPOINT_MISMATCH"]
    assert len(mism) == 1 and mism[0].tensors == ["layer0.forward.input.W"]  # PyTorch row 3 is in block i
    assert "checkpoint_digest" in " ".join(f.message for f in audit.findings if f.code == "DIGEST_MISMATCH")


def test_audit_checkpoint_without_init_cannot_judge_training(tiny_repository, tiny_run_dir, tmp_path):
    run = _copy_run(tiny_run_dir, tmp_path / "run")
    (run / "init.safetensors").unlink()
    audit = audit_model(tiny_repository / "tiny_lstm" / "1" / "model.onnx", checkpoint=run)
    assert not audit.errors
    assert any(f.code == "UNTRAINED_UNKNOWN" and "no init.safetensors" in f.message for f in audit.findings)


def test_audit_checkpoint_of_other_shape_is_a_mismatch(tiny_repository, tiny_gru_run_dir):
    audit = audit_model(tiny_repository / "tiny_lstm" / "1" / "model.onnx", checkpoint=tiny_gru_run_dir)
    assert {f.code for f in audit.errors} == {"CHECKPOINT_MISMATCH"}
    # The parameter counts are compared even when the layers cannot be matched (a dropped projection shows here).
    assert any("parameter count: the model holds" in f.message for f in audit.errors)


def test_audit_exported_bidirectional_gru_maps_reverse_rows(make_run_dir, tmp_path):
    from lstm_onnx.export.repository import export_to_repository

    run_dir = make_run_dir(cell="gru", bidirectional=True)
    export_to_repository(run_dir, tmp_path / "repo", name="bi_gru", version=1)
    model = tmp_path / "repo" / "bi_gru" / "1" / "model.onnx"
    proc = run_cli("audit", str(model), "--checkpoint", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    entries = {g["key"]: g for layer in report["layers"] for g in layer["gates"]}
    h = report["layers"][0]["hidden_size"]
    # ONNX z, r, h against PyTorch r, z, n: update comes from PyTorch's second block.
    assert entries["layer1.reverse.update.bR"]["checkpoint"]["pytorch"] == f"rnn.bias_hh_l1_reverse[{h}:{2 * h}]"
    assert all(e["checkpoint"]["identical"] for e in entries.values())
    assert report["totals"]["total"] == report["totals"]["checkpoint"] == _state_dict_numel(run_dir / "model.safetensors")
