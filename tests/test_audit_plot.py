"""`audit --plot`: one panel per layer, direction and gate (W | R | b), the change from init with --checkpoint, and
one colour scale per kind of panel. Expected values come from the ONNX initializers and the run's safetensors
files directly, not through the audit."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from audit_models import contract_model, random_layers, run_cli, save
from onnx import helper, numpy_helper

from lstm_onnx.export.audit import audit_model
from lstm_onnx.export.audit.plot import plot_figure

# Row blocks of each gate, written out here rather than taken from the audit: ONNX i, o, f, c / z, r, h.
ONNX_BLOCK = {"input": 0, "output": 1, "forget": 2, "cell": 3, "update": 0, "reset": 1, "hidden": 2}
LSTM_TITLES = ("input (i)", "forget (f)", "cell (c)", "output (o)")
GRU_TITLES = ("update (z)", "reset (r)", "hidden (h)")


def _panels(fig) -> dict[str, object]:
    """Title -> axes of every heatmap panel (the colourbars have no title)."""
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert len(panels) == sum(1 for ax in fig.axes if ax.get_title()), "panel titles must be unique"
    return panels


def _images(ax) -> dict[str, np.ndarray]:
    """Block name (W, R, b, P) -> the data drawn for it in one panel."""
    return {im.get_label(): np.ma.getdata(im.get_array()) for im in ax.images}


def _colourbars(fig) -> dict[str, tuple[float, float]]:
    """Colourbar label -> its limits."""
    return {ax.get_xlabel(): ax.get_xlim() for ax in fig.axes if not ax.get_title() and ax.get_xlabel()}


def _onnx_limit(path) -> float:
    """max |W|, |R|, |bW + bR| over every recurrent node of a float model, from its initializers."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    lim = 0.0
    for node in model.graph.node:
        if node.op_type in ("LSTM", "GRU"):
            w, r, b = (inits[n] for n in node.input[1:4])
            half = b.shape[1] // 2
            lim = max(lim, np.abs(w).max(), np.abs(r).max(), np.abs(b[:, :half] + b[:, half:]).max())
    return float(lim)


def _tensors(path):
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}


@pytest.fixture(scope="module")
def lstm_model(tiny_repository):
    return tiny_repository / "tiny_lstm" / "1" / "model.onnx"


def test_plot_of_lstm_with_checkpoint_draws_each_gate_and_its_change_from_init(lstm_model, tiny_run_dir):
    fig = plot_figure(audit_model(lstm_model, checkpoint=tiny_run_dir))
    panels = _panels(fig)
    # 2 layers x 1 direction x 4 gates, each drawn as values and as trained - init.
    assert len(panels) == 16
    for k in (0, 1):
        for gate, rows in zip(LSTM_TITLES, ("0:8", "16:24", "24:32", "8:16")):
            values = panels[f"layer{k} forward · {gate}\nONNX W, R [0, {rows}, :]"]
            change = panels[f"layer{k} forward · {gate}\ntrained - init"]
            assert set(_images(values)) == set(_images(change)) == {"W", "R", "b"}
    ticks = [t.get_text() for t in panels["layer0 forward · cell (c)\nONNX W, R [0, 24:32, :]"].get_xticklabels()]
    assert ticks == ["W\n8×1", "R\n8×8", "b\n8"]  # hidden 8, input 1
    ticks = [t.get_text() for t in panels["layer1 forward · cell (c)\ntrained - init"].get_xticklabels()]
    assert ticks == ["W\n8×8", "R\n8×8", "b\n8"]
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_title()].count("hidden unit") == 4  # first column of each row

    # The change of layer1's forget gate is model.safetensors - init.safetensors on PyTorch's rows 8:16 (i, f, g, o).
    trained, init = _tensors(tiny_run_dir / "model.safetensors"), _tensors(tiny_run_dir / "init.safetensors")
    drawn = _images(panels["layer1 forward · forget (f)\ntrained - init"])
    moved = {name: trained[name][8:16] - init[name][8:16] for name in trained if name.endswith("_l1")}
    np.testing.assert_array_equal(drawn["W"], moved["rnn.weight_ih_l1"])
    np.testing.assert_array_equal(drawn["R"], moved["rnn.weight_hh_l1"])
    np.testing.assert_allclose(drawn["b"][:, 0], moved["rnn.bias_ih_l1"] + moved["rnn.bias_hh_l1"], rtol=1e-12)
    assert np.abs(drawn["R"]).max() > 1e-4  # training did move it: the comparison above is not of zeros

    title = fig.get_suptitle()
    assert "W [hidden × input] | R [hidden × hidden] | b = bW + bR" in title
    assert f"init.safetensors in {tiny_run_dir}" in title


def test_plot_shares_one_colour_scale_for_values_and_one_for_changes(lstm_model, tiny_run_dir):
    fig = plot_figure(audit_model(lstm_model, checkpoint=tiny_run_dir))
    panels = _panels(fig)
    values = [im for title, ax in panels.items() if "ONNX" in title for im in ax.images]
    changes = [im for title, ax in panels.items() if "trained - init" in title for im in ax.images]
    assert len(values) == len(changes) == 2 * 4 * 3
    lim = _onnx_limit(lstm_model)
    assert {im.get_clim() for im in values} == {(-lim, lim)}
    trained, init = _tensors(tiny_run_dir / "model.safetensors"), _tensors(tiny_run_dir / "init.safetensors")
    moved = {k: trained[k] - init[k] for k in trained if k.startswith("rnn.")}
    drawn = [moved[f"rnn.{kind}_l{k}"] for kind in ("weight_ih", "weight_hh") for k in (0, 1)]
    drawn += [moved[f"rnn.bias_ih_l{k}"] + moved[f"rnn.bias_hh_l{k}"] for k in (0, 1)]  # b = bW + bR
    change_lim = max(float(np.abs(a).max()) for a in drawn)
    assert len({im.get_clim() for im in changes}) == 1
    np.testing.assert_allclose(changes[0].get_clim(), (-change_lim, change_lim), rtol=1e-12)
    assert change_lim < lim / 10  # a few training steps: the change needs its own scale to be seen at all
    bars = _colourbars(fig)
    assert bars == {"weight value (one scale for every W, R, b panel)": (-lim, lim),
                    "trained - init (one scale for every change panel)": pytest.approx(changes[0].get_clim())}


def test_plot_of_gru_through_the_cli(tiny_repository, tiny_gru_run_dir, tmp_path):
    import matplotlib.image

    model = tiny_repository / "tiny_gru" / "1" / "model.onnx"
    out = tmp_path / "gru.png"
    proc = run_cli("audit", str(model), "--checkpoint", str(tiny_gru_run_dir), "--plot", str(out))
    assert proc.returncode == 0, proc.stderr
    pixels = matplotlib.image.imread(str(out))
    assert pixels.shape[0] > 800 and pixels.shape[1] > 800
    panels = _panels(plot_figure(audit_model(model, checkpoint=tiny_gru_run_dir)))
    assert len(panels) == 2 * 3 * 2
    for k in (0, 1):
        for gate, rows in zip(GRU_TITLES, ("0:8", "8:16", "16:24")):
            assert f"layer{k} forward · {gate}\nONNX W, R [0, {rows}, :]" in panels
            assert f"layer{k} forward · {gate}\ntrained - init" in panels


@pytest.mark.parametrize("op, num_layers, directions", [("LSTM", 1, 2), ("LSTM", 3, 1), ("GRU", 3, 2), ("GRU", 1, 1)])
def test_plot_covers_every_layer_direction_and_gate(tmp_path, op, num_layers, directions):
    layers = random_layers(op, num_layers, hidden=4, input_size=3, directions=directions, seed=num_layers)
    path = save(contract_model(op, layers=layers), tmp_path / "m.onnx")
    fig = plot_figure(audit_model(path))
    panels = _panels(fig)
    names = LSTM_TITLES if op == "LSTM" else GRU_TITLES
    assert len(panels) == num_layers * directions * len(names)
    for k, (w, r, b) in enumerate(layers):
        for d, direction in enumerate(("forward", "reverse")[:directions]):
            for gate in names:
                block = ONNX_BLOCK[gate.split(" ")[0]]
                rows = slice(block * 4, (block + 1) * 4)
                drawn = _images(panels[f"layer{k} {direction} · {gate}\nONNX W, R [{d}, {rows.start}:{rows.stop}, :]"])
                np.testing.assert_array_equal(drawn["W"], w[d, rows])
                np.testing.assert_array_equal(drawn["R"], r[d, rows])
                off = len(names) * 4
                np.testing.assert_allclose(drawn["b"][:, 0], b[d, rows].astype(np.float64)
                                           + b[d, off + rows.start:off + rows.stop], rtol=1e-12)
    lim = _onnx_limit(path)
    assert {im.get_clim() for ax in panels.values() for im in ax.images} == {(-lim, lim)}
    assert "no --checkpoint" in fig.get_suptitle()


def test_plot_of_quantized_lstm_draws_dequantized_gates(lstm_model, tiny_run_dir, tmp_path):
    from lstm_onnx.export.quantization import quantize_int8

    int8 = tmp_path / "int8.onnx"
    quantize_int8(lstm_model, int8)
    audit = audit_model(int8, checkpoint=tiny_run_dir)
    fig = plot_figure(audit)
    panels = _panels(fig)
    assert len(panels) == 16 and "DynamicQuantizeLSTM (dequantized)" in fig.get_suptitle()
    # Dequantized, not the float weights: within half an integer step of them, but not equal.
    float_w = _tensors(tiny_run_dir / "model.safetensors")["rnn.weight_hh_l0"][8:16]  # forget: PyTorch rows 8:16
    drawn = _images(panels["layer0 forward · forget (f)\nONNX W, R [0, 16:24, :]"])["R"]
    gate = next(g for g in audit.layers[0].gates if g.key == "layer0.forward.forget.R")
    assert not np.array_equal(drawn, float_w)
    assert np.abs(drawn - float_w).max() <= gate.quant.scale.max() / 2 * (1 + 1e-6)


def test_plot_says_when_the_run_has_no_init_weights(lstm_model, tiny_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    (run / "init.safetensors").unlink()
    fig = plot_figure(audit_model(lstm_model, checkpoint=run))
    panels = _panels(fig)
    assert len(panels) == 8 and not any("trained - init" in t for t in panels)
    assert f"{run} has no init.safetensors" in fig.get_suptitle()
    assert list(_colourbars(fig)) == ["weight value (one scale for every W, R, b panel)"]


def test_plot_marks_gates_training_never_moved(lstm_model, tiny_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    shutil.copy(run / "model.safetensors", run / "init.safetensors")  # as if training never ran
    fig = plot_figure(audit_model(lstm_model, checkpoint=run))
    changes = [t for t in _panels(fig) if "trained - init" in t]
    assert len(changes) == 8 and all(t.endswith("trained - init: UNCHANGED") for t in changes)
    assert "training did not move any of these weights" in fig.get_suptitle()


def test_plot_of_a_model_without_recurrent_gates_is_a_one_line_error(tmp_path):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "none",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "none.onnx")
    with pytest.raises(ValueError, match="no resolved recurrent gates"):
        plot_figure(audit_model(path))
    proc = run_cli("audit", str(path), "--plot", str(tmp_path / "none.png"))
    assert proc.returncode == 2 and "--plot: the model has no resolved recurrent gates" in proc.stderr
    assert not (tmp_path / "none.png").exists()
