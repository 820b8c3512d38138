"""Training: run directory contents, determinism, interruption, checked loading, weight report, the CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lstm_onnx.model.checkpoint import CheckpointError, load_run, read_weights
from lstm_onnx.model.config import ModelConfig, RunConfig, TrainConfig
from lstm_onnx.model.data import DataError
from lstm_onnx.model.network import expected_shapes
from lstm_onnx.model.report import format_weight_table
from lstm_onnx.model.train import OutputError, train_run

ROOT = Path(__file__).resolve().parent.parent
RUN_FILES = {"config.json", "model.safetensors", "init.safetensors", "metrics.json", "loss.png"}
# A small default task keeps non-dry-run trainings to a fraction of a second.
SMALL_TASK = {"kind": "default", "num_sequences": 96, "seq_len": 12}


def _tiny(seed: int = 0, dry_run: bool = True, epochs: int = 1, dataset: dict | None = None, **model) -> RunConfig:
    """The conftest's tiny configuration; with `dataset`, batches of 32 so SMALL_TASK has 3 steps per epoch."""
    m = dict(cell="lstm", input_size=1, hidden_size=8, num_layers=2, num_outputs=4)
    m.update(model)
    training = TrainConfig(epochs=epochs, dry_run=dry_run, seed=seed, batch_size=32 if dataset else 64)
    return RunConfig(model=ModelConfig(**m), training=training, dataset=dict(dataset or {}), seed=seed)


def test_run_directory_holds_the_contract_files(tiny_run_dir):
    assert {p.name for p in tiny_run_dir.iterdir()} == RUN_FILES
    config = json.loads((tiny_run_dir / "config.json").read_text())
    assert config["format"] == "lstm-onnx-run/1" and config["seed"] == 0
    assert config["dataset"]["kind"] == "default" and config["dataset"]["name"] == "sine-frequency"
    assert config["model"]["hidden_size"] == 8 and config["training"]["dry_run"] is True
    metrics = json.loads((tiny_run_dir / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy" and metrics["interrupted"] is False
    assert set(metrics["history"][0]) == {"epoch", "train_loss", "val_loss", "val_metric"}
    assert 0.0 <= metrics["final"]["val_accuracy"] <= 1.0
    assert (tiny_run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    net, run = load_run(tiny_run_dir)
    assert not net.training and run.model.num_layers == 2
    init = read_weights(tiny_run_dir / "init.safetensors", run)
    assert any(not torch.equal(init[k], v) for k, v in net.state_dict().items())


def test_same_seed_gives_bit_identical_weights(tmp_path, tiny_run_dir):
    train_run(_tiny(seed=0), tmp_path / "again", progress=False)
    for name in ("model.safetensors", "init.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_run_dir / name).read_bytes()
    train_run(_tiny(seed=1), tmp_path / "other", progress=False)
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != (tiny_run_dir / "model.safetensors").read_bytes()


def test_training_learns_a_small_task(tmp_path):
    metrics = train_run(_tiny(dry_run=False, epochs=4, dataset=SMALL_TASK), tmp_path / "run", progress=False)
    history = metrics["history"]
    assert len(history) == 4 and [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert metrics["final"]["train_sequences"] + metrics["final"]["val_sequences"] == 96


@pytest.mark.parametrize("cell,bidirectional", [("lstm", False), ("gru", True)])
def test_weight_report_lists_every_tensor_and_gate(make_run_dir, cell, bidirectional):
    run_dir = make_run_dir(cell=cell, bidirectional=bidirectional) if bidirectional else make_run_dir(cell=cell)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = metrics["weight_change"]
    config = load_run(run_dir)[1].model
    assert {r["tensor"] for r in rows} == set(expected_shapes(config))
    gates = ["input", "forget", "cell", "output"] if cell == "lstm" else ["reset", "update", "hidden"]
    d = 2 if bidirectional else 1
    assert len(rows) == 2 * d * 4 * len(gates) + 2  # layers x directions x (W, R, bW, bR) x gates + head
    for layer in range(2):
        for direction in ("forward", "reverse")[:d]:
            for part in ("W", "R", "bW", "bR"):
                got = [r["gate"] for r in rows if (r["layer"], r["direction"], r["part"]) == (layer, direction, part)]
                assert got == gates
    assert all(r["rel_change"] > 0 for r in rows)  # three Adam steps move every weight
    table = format_weight_table(rows)
    assert len(table.splitlines()) == len(rows) + 3 and "every one changed" in table


def test_weight_report_flags_a_tensor_that_did_not_move(tiny_run_dir):
    from lstm_onnx.model.report import weight_change_rows

    net, run = load_run(tiny_run_dir)
    final = {k: v.clone() for k, v in net.state_dict().items()}
    init = {k: v.clone() for k, v in final.items()}
    init["rnn.weight_hh_l1"][8:16] += 0.1  # only the forget gate of layer 1's recurrent weights moved
    rows = weight_change_rows(init, final, run.model)
    moved = [(r["tensor"], r["gate"]) for r in rows if r["abs_change"] > 0]
    assert moved == [("rnn.weight_hh_l1", "forget")]
    assert "UNCHANGED" in format_weight_table(rows) and "33 did not change" in format_weight_table(rows)


def _interrupt_at(monkeypatch, call: int) -> None:
    """Raise KeyboardInterrupt on the `call`-th gradient clipping, as Ctrl-C mid-epoch would."""
    original = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


@pytest.mark.parametrize("call,best_epoch", [(4, 1), (2, None)])  # 3 steps per epoch: after / before epoch 1
def test_ctrl_c_still_writes_a_usable_run_directory(tmp_path, monkeypatch, call, best_epoch):
    _interrupt_at(monkeypatch, call)
    out = tmp_path / "run"
    metrics = train_run(_tiny(dry_run=False, epochs=5, dataset=SMALL_TASK), out, progress=False)
    assert metrics["interrupted"] is True and metrics["final"]["best_epoch"] == best_epoch
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert json.loads((out / "metrics.json").read_text())["interrupted"] is True
    load_run(out)


def test_bad_data_writes_nothing(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 3, 1)), y=np.array([0, 1, 2]))
    out = tmp_path / "out" / "run"
    with pytest.raises(DataError, match="'x' has 4 sequences but 'y' has 3"):
        train_run(_tiny(), out, data_path=bad, progress=False)
    assert not (tmp_path / "out").exists()


def test_data_that_does_not_fit_the_model_is_refused(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 3, 2), dtype=np.float32), y=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match="sequences have 2 features, model input_size is 1"):
        train_run(_tiny(), tmp_path / "run", data_path=data, progress=False)
    assert not (tmp_path / "run").exists()


def test_user_regression_data_trains_and_records_its_digest(tmp_path):
    data = tmp_path / "reg.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(20, 5, 3)).astype(np.float32), y=rng.normal(size=(20, 2)).astype(np.float32))
    config = _tiny(input_size=3, task="regression", num_outputs=2)
    metrics = train_run(config, tmp_path / "run", data_path=data, progress=False)
    assert metrics["metric"] == "rmse" and metrics["final"]["val_rmse"] > 0
    spec = json.loads((tmp_path / "run" / "config.json").read_text())["dataset"]
    assert spec["kind"] == "file" and spec["format"] == "npz" and spec["sha256"].startswith("sha256:")


def test_output_that_is_not_a_run_directory_is_left_alone(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="not a run directory"):
        train_run(_tiny(), tmp_path, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_rerun_replaces_an_earlier_run(tmp_path, tiny_run_dir):
    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir, out)
    (out / "stale.txt").write_text("old")
    train_run(_tiny(seed=1), out, progress=False)
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging or old directories left behind


# --- checked loading: anything that is not these weights for this config is refused ---

def test_loading_refuses_weights_of_another_architecture(tmp_path, tiny_run_dir, make_run_dir):
    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir, out)
    shutil.copy(make_run_dir(cell="gru") / "model.safetensors", out / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'rnn.weight_ih_l0': got shape \\[24, 1\\], expected \\[32, 1\\]"):
        load_run(out)


def test_loading_refuses_a_config_that_does_not_match(tmp_path, tiny_run_dir):
    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["model"]["num_layers"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing \\['rnn.bias_hh_l2'"):
        load_run(out)


def test_loading_refuses_missing_tensors(tmp_path, tiny_run_dir):
    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir, out)
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["head.bias"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors: tensors do not match config.json.*missing \\['head.bias'\\]"):
        load_run(out)


def test_loading_refuses_a_pickle_renamed_to_safetensors(tmp_path, tiny_run_dir):
    out = tmp_path / "run"
    shutil.copytree(tiny_run_dir, out)
    tensors = {k: v.clone() for k, v in load_file(str(out / "init.safetensors")).items()}
    (out / "model.safetensors").unlink()
    torch.save(tensors, out / "model.safetensors", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="looks like a pickle"):
        load_run(out)
    (out / "model.safetensors").unlink()
    torch.save(tensors, out / "model.safetensors")  # today's zip-based torch.save: a pickle inside a zip
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_run(out)


# --- the CLI, end to end in a subprocess ---

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lstm_onnx", "train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_dry_run_writes_a_loadable_run_and_prints_the_report(tmp_path):
    out = tmp_path / "run"
    result = _cli("--output", str(out), "--dry-run", "--hidden-size", "8", "--cell", "gru", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == RUN_FILES
    net, run = load_run(out)
    assert run.model.cell == "gru" and run.model.hidden_size == 8
    assert "validation accuracy:" in result.stdout
    for name in expected_shapes(run.model):
        assert name in result.stdout
    for gate in ("reset", "update", "hidden"):
        assert gate in result.stdout


@pytest.mark.parametrize("args,code,message", [
    (["--proj-size", "4"], 2, "proj_size: got 4, expected 0"),
    (["--num-layers", "9"], 2, "num_layers: got 9, expected an integer from 1 to 8"),
    (["--lr", "0"], 2, "--lr: got 0.0, expected a positive number"),
    (["--data", "{bad}"], 1, "'y' holds NaN or Inf"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, args, code, message):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 2, 1)), y=np.array([0.0, np.nan, 1.0]))
    out = tmp_path / "run"
    result = _cli("--output", str(out), "--dry-run", *[a.replace("{bad}", str(bad)) for a in args])
    assert result.returncode == code
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_user_csv_classification_trains(tmp_path):
    rows = ["y,t0_f0,t0_f1,t1_f0,t1_f1,t2_f0,t2_f1"]
    rng = np.random.default_rng(1)
    for i in range(12):
        rows.append(",".join([str(i % 3)] + [f"{v:.3f}" for v in rng.normal(size=6)]))
    data = tmp_path / "seq.csv"
    data.write_text("\n".join(rows) + "\n")
    metrics = train_run(_tiny(input_size=2, num_outputs=3), tmp_path / "run", data_path=data, progress=False)
    assert metrics["metric"] == "accuracy"
    net, run = load_run(tmp_path / "run")
    assert run.dataset["format"] == "csv" and run.model.input_size == 2 and net.head.out_features == 3


def test_training_leaves_the_callers_thread_count_and_rng_alone(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_run(_tiny(), tmp_path / "run", progress=False)
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(torch.rand(3), expected, atol=0, rtol=0)
