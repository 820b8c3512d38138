"""The audit on what other tools really write: onnxruntime's quantize_dynamic (per tensor and per channel), the
TorchScript exporter without constant folding, torch's dynamo exporter (including its broken proj_size export),
hand-built Cast/Reshape/Transpose/Unsqueeze/Concat/Slice weight paths, fp16; plus --against and its goldens.

Every gate is compared with the source framework's own tensors: exactly for float, within scale/2 for int8.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from audit_models import codes, run_cli, save
from conftest import require_module
from onnx import TensorProto, helper, numpy_helper

from lstm_onnx.export.audit import audit_model
from lstm_onnx.export.audit.gates import pytorch_source
from lstm_onnx.export.audit.report import format_text

DATA = Path(__file__).parent / "data"
UPDATE = bool(os.environ.get("LSTM_ONNX_UPDATE_GOLDEN"))
RNG = np.random.default_rng(16)
vi = helper.make_tensor_value_info
ONNX_ROWS = {"input": 0, "output": 1, "forget": 2, "cell": 3}


def _u(*shape: int, rng: np.random.Generator = RNG) -> np.ndarray:
    return rng.uniform(-0.5, 0.5, shape).astype(np.float32)


def float_lstm(path: Path, hidden: int = 4, features: int = 3, directions: int = 2, seed: int = 0):
    """A runnable float LSTM + MatMul head, as onnx.helper builds it; returns the path and its float tensors."""
    rng = np.random.default_rng(seed)
    w, r, b = _u(directions, 4 * hidden, features, rng=rng), _u(directions, 4 * hidden, hidden, rng=rng), _u(directions, 8 * hidden, rng=rng)
    head = _u(directions * hidden, 2, rng=rng)
    nodes = [
        helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Y_h"], hidden_size=hidden,
                         direction="bidirectional" if directions == 2 else "forward", name="lstm"),
        helper.make_node("Transpose", ["Y_h"], ["h_bdh"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["h_bdh", "flat"], ["h"]),
        helper.make_node("MatMul", ["h", "head"], ["out"], name="head_matmul"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"), (head, "head"))]
    inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat"))
    graph = helper.make_graph(nodes, "float_lstm", [vi("X", TensorProto.FLOAT, [5, "batch", features])],
                              [vi("out", TensorProto.FLOAT, ["batch", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hand-built")
    onnx.checker.check_model(model, full_check=True)
    save(model, path)
    return path, {"W": w, "R": r, "B": b, "head": head}


def quantize(src: Path, dst: Path, per_channel: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8)
    return dst


@pytest.mark.parametrize("per_channel", [False, True])
def test_audit_dequantizes_quantize_dynamic_lstm_within_half_a_scale(tmp_path, per_channel):
    src, t = float_lstm(tmp_path / "float.onnx")
    path = quantize(src, tmp_path / "int8.onnx", per_channel)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("DynamicQuantizeLSTM") == 1  # the real tool's op
    audit = audit_model(path)
    assert not audit.errors, audit.findings
    assert "NO_RECURRENT_OP" not in codes(audit)
    (layer,) = audit.layers
    assert (layer.op, layer.op_type, layer.direction) == ("LSTM", "DynamicQuantizeLSTM", "bidirectional")
    h = 4
    for g in layer.gates:
        d = ("forward", "reverse").index(g.direction)
        rows = slice(ONNX_ROWS[g.gate] * h, (ONNX_ROWS[g.gate] + 1) * h)
        if g.kind in ("W", "R"):
            source = t[g.kind][d, rows]
            q = g.quant
            assert q is not None and q.dtype == "int8" and q.per_channel is per_channel
            assert -128 <= q.q_range[0] <= q.q_range[1] <= 127
            if not per_channel:
                assert np.unique(q.scale).size == 1  # one scale per direction
            err = np.abs(g.array.astype(np.float64) - source)
            assert (err <= q.bound(err.shape) * (1 + 1e-3)).all(), (g.key, float(err.max()))
            assert err.max() > 0  # really rounded: an int8 gate is not the float one
        else:  # the bias stays float in DynamicQuantizeLSTM
            offset = 0 if g.kind == "bW" else 4 * h
            np.testing.assert_array_equal(g.array, t["B"][d, offset + rows.start:offset + rows.stop])
    (head,) = audit.head
    assert head.name == "head_quantized" and head.quant is not None
    assert (np.abs(head.array - t["head"]) <= head.quant.bound(head.quant.q.shape).T * (1 + 1e-3)).all()
    # Scales and zero points are part of their integer tensors, not parameters of their own.
    assert audit.total_params == sum(a.size for a in t.values())
    text = format_text(audit)
    assert "DynamicQuantizeLSTM" in text and "int8 " in text and "zero point" in text


def test_audit_against_float_reports_quantization_error_per_gate(tmp_path):
    src, t = float_lstm(tmp_path / "float.onnx", directions=1)
    path = quantize(src, tmp_path / "int8.onnx", per_channel=True)
    audit = audit_model(path, against=src, fail_on_change=True)
    assert not audit.errors, audit.findings
    statuses = {k: e["status"] for k, e in audit.against.items()}
    assert {statuses[k] for k in statuses if k.endswith((".W", ".R"))} == {"quantized"}
    assert {statuses[k] for k in statuses if k.endswith((".bW", ".bR"))} == {"identical"}
    err = audit.quant_errors["layer0.forward.forget.R"]
    gate = next(g for g in audit.layers[0].gates if g.key == "layer0.forward.forget.R")
    expected = np.abs(gate.array.astype(np.float64) - t["R"][0, 8:12]).max()
    assert err["max_abs"] == pytest.approx(expected) and 0 < err["bound_share"] <= 1.001
    assert "UNCHANGED" in codes(audit)
    assert "quant err" in format_text(audit)
    proc = run_cli("audit", str(path), "--against", str(src), "--fail-on-change", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["against"]["tensors"]["layer0.forward.forget.R"]["status"] == "quantized"
    assert report["quantization_errors"]["layer0.forward.forget.R"]["max_abs"] == pytest.approx(expected)
    gate = next(g for g in report["layers"][0]["gates"] if g["key"] == "layer0.forward.forget.R")
    assert gate["quantization"]["dtype"] == "int8" and gate["quantization"]["per_channel"] is True


def test_audit_against_flags_changed_gates_and_fails_on_change(tmp_path):
    old, _ = float_lstm(tmp_path / "old.onnx", directions=1, seed=1)
    model = onnx.load(str(old))
    r = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "R")).copy()
    r[0, 8:12] += 0.01  # retrain only the forget gate's recurrent weights
    for i, init in enumerate(model.graph.initializer):
        if init.name == "R":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(r, "R"))
    new = save(model, tmp_path / "new.onnx")
    audit = audit_model(new, against=old)
    changed = {k for k, e in audit.against.items() if e["status"] == "changed"}
    assert changed == {"layer0.forward.forget.R"}
    assert audit.against["layer0.forward.forget.R"]["max_abs"] == pytest.approx(0.01, rel=1e-3)
    assert [f.severity for f in audit.findings if f.code == "CHANGED_GATES"] == ["info"]
    proc = run_cli("audit", str(new), "--against", str(old), "--fail-on-change")
    assert proc.returncode == 1 and "CHANGED_GATES" in proc.stderr and "forget.R" in proc.stdout
    assert run_cli("audit", str(new), "--against", str(old)).returncode == 0
    assert run_cli("audit", str(old), "--against", str(old), "--fail-on-change").returncode == 0


def test_audit_against_reports_structural_differences(tmp_path):
    old, _ = float_lstm(tmp_path / "old.onnx", hidden=4, directions=1)
    new, _ = float_lstm(tmp_path / "new.onnx", hidden=3, directions=2)
    audit = audit_model(new, against=old, fail_on_change=True)
    text = "; ".join(audit.structure)
    assert "layer0 hidden size: 4 -> 3" in text and "layer0 direction: forward -> bidirectional" in text
    assert "head tensor head: shape [4, 2] -> [6, 2]" in text
    assert "CHANGED_GATES" in {f.code for f in audit.errors}


def test_fail_on_change_without_against_is_a_usage_error(tmp_path):
    path, _ = float_lstm(tmp_path / "m.onnx")
    proc = run_cli("audit", str(path), "--fail-on-change")
    assert proc.returncode == 2 and "--against" in proc.stderr


# --- goldens: a quantized model, and --against its float original ---------------------------------------


def _golden(name: str, text: str) -> None:
    path = DATA / name
    if UPDATE:  # LSTM_ONNX_UPDATE_GOLDEN=1: write, and compare nothing in this run
        path.write_text(text)
        pytest.skip(f"updated {path}")
    assert text == path.read_text(), f"{name} differs; rerun with LSTM_ONNX_UPDATE_GOLDEN=1 if the change is intended"


def test_audit_text_report_of_quantized_model_matches_golden(tmp_path):
    src, _ = float_lstm(tmp_path / "float.onnx", hidden=2, features=1, directions=1, seed=5)
    path = quantize(src, tmp_path / "int8.onnx", per_channel=True)
    text = format_text(audit_model(path)).replace(str(path), "INT8")
    _golden("audit_quantized_golden.txt", text)


def test_audit_against_report_matches_golden(tmp_path):
    src, _ = float_lstm(tmp_path / "float.onnx", hidden=2, features=1, directions=1, seed=5)
    path = quantize(src, tmp_path / "int8.onnx", per_channel=False)
    text = format_text(audit_model(path, against=src)).replace(str(path), "INT8").replace(str(src), "FLOAT")
    _golden("audit_against_golden.txt", text)


# --- weights computed from constants ---------------------------------------------------------------------


def _torch_lstm(**kw):
    import torch

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(2, 4, batch_first=True, **kw)
            out = kw.get("proj_size") or 4
            self.head = torch.nn.Linear(out * (2 if kw.get("bidirectional") else 1), 2)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y[:, -1])

    return Net().eval()


def _assert_gates_equal_torch(audit, net) -> None:
    params = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    checked = 0
    for layer in audit.layers:
        for g in layer.gates:
            name, rows = pytorch_source("LSTM", g.layer, g.direction, g.gate, g.kind, layer.hidden_size)
            np.testing.assert_array_equal(g.array, params[name][rows], err_msg=g.key)
            checked += 1
    assert checked == sum(len(x.gates) for x in audit.layers) > 0


def test_audit_folds_torchscript_export_without_constant_folding(tmp_path):
    import torch

    net = _torch_lstm(num_layers=2, bidirectional=True)
    path = tmp_path / "unfolded.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 5, 2),), str(path), dynamo=False, do_constant_folding=False, opset_version=17)
    audit = audit_model(path)
    assert not audit.errors, audit.findings
    _assert_gates_equal_torch(audit, net)  # bit for bit, after folding the Slice/Concat/Unsqueeze chains
    paths = audit.layers[1].paths
    assert set(paths) == {"W", "R", "B"}
    assert "rnn.weight_ih_l1" in paths["W"] and "Slice" in paths["W"] and "Concat" in paths["W"]
    assert "folded W: " in format_text(audit)
    assert audit.total_params == sum(p.numel() for p in net.parameters())


def test_audit_folds_cast_reshape_transpose_unsqueeze_concat_slice(tmp_path):
    h, f = 3, 2
    w_t = _u(f, 4 * h).astype(np.float16)  # stored transposed, in fp16
    r_flat = _u(4 * h * h)
    b_big = _u(1, 8 * h + 5)  # B is a Slice of a larger tensor
    p = _u(3 * h)
    nodes = [
        helper.make_node("Cast", ["w_t"], ["w_t32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["w_t32"], ["w_2d"], perm=[1, 0]),
        helper.make_node("Unsqueeze", ["w_2d", "axis0"], ["W"]),
        helper.make_node("Reshape", ["r_flat", "r_shape"], ["R"]),
        helper.make_node("Slice", ["b_big", "start", "end", "axis1"], ["b_part"]),
        helper.make_node("Identity", ["b_part"], ["B"]),
        helper.make_node("Unsqueeze", ["p", "axis0"], ["p1"]),
        helper.make_node("Concat", ["p1"], ["P"], axis=0),
        helper.make_node("LSTM", ["X", "W", "R", "B", "", "", "", "P"], ["Y"], hidden_size=h, name="lstm"),
    ]
    inits = [numpy_helper.from_array(w_t, "w_t"), numpy_helper.from_array(r_flat, "r_flat"),
             numpy_helper.from_array(b_big, "b_big"), numpy_helper.from_array(p, "p"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array([1, 4 * h, h], np.int64), "r_shape"),
             numpy_helper.from_array(np.array([0], np.int64), "start"),
             numpy_helper.from_array(np.array([8 * h], np.int64), "end")]
    graph = helper.make_graph(nodes, "paths", [vi("X", TensorProto.FLOAT, [4, 1, f])],
                              [vi("Y", TensorProto.FLOAT, [4, 1, 1, h])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    audit = audit_model(save(model, tmp_path / "paths.onnx"))
    assert not audit.errors, audit.findings
    gates = {g.key: g.array for g in audit.layers[0].gates}
    w = w_t.astype(np.float32).T[None]
    np.testing.assert_array_equal(gates["layer0.forward.forget.W"], w[0, 2 * h:3 * h])
    np.testing.assert_array_equal(gates["layer0.forward.cell.R"], r_flat.reshape(1, 4 * h, h)[0, 3 * h:])
    np.testing.assert_array_equal(gates["layer0.forward.output.bR"], b_big[0, 4 * h + h:4 * h + 2 * h])
    np.testing.assert_array_equal(gates["layer0.forward.forget.P"], p[2 * h:])
    paths = audit.layers[0].paths
    assert paths["W"] == "w_t -> Cast -> Transpose -> Unsqueeze"
    assert paths["R"] == "r_flat -> Reshape" and paths["B"] == "b_big -> Slice -> Identity"
    assert paths["P"] == "p -> Unsqueeze -> Concat"
    # The raw tensors belong to the recurrent node: none of them is counted again as a head parameter.
    assert audit.head == [] and audit.recurrent_params == 4 * h * f + 4 * h * h + 8 * h + 3 * h


def _one_lstm_with_w(w_nodes, extra_inits=(), extra_inputs=()):
    h = 3
    r, b = _u(1, 4 * h, h), _u(1, 8 * h)
    nodes = list(w_nodes) + [helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y"], hidden_size=h, name="lstm")]
    graph = helper.make_graph(nodes, "m", [vi("X", TensorProto.FLOAT, [4, 1, 2]), *extra_inputs],
                              [vi("Y", TensorProto.FLOAT, [4, 1, 1, h])],
                              [numpy_helper.from_array(r, "R"), numpy_helper.from_array(b, "B"), *extra_inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), r


def test_audit_keeps_the_gates_it_can_read_when_one_weight_is_computed(tmp_path):
    model, r = _one_lstm_with_w([helper.make_node("Mul", ["W_in", "W_in"], ["W"])],
                                extra_inputs=[vi("W_in", TensorProto.FLOAT, [1, 12, 2])])
    audit = audit_model(save(model, tmp_path / "partial.onnx"))
    assert [f.code for f in audit.errors] == ["UNRESOLVED_WEIGHT"]
    kinds = {g.kind for g in audit.layers[0].gates}
    assert kinds == {"R", "bW", "bR"}  # W is missing, the rest is still there
    np.testing.assert_array_equal(next(g.array for g in audit.layers[0].gates if g.key == "layer0.forward.cell.R"),
                                  r[0, 9:12])
    assert " W_i " not in format_text(audit) and " R_i " in format_text(audit)


def test_audit_refuses_to_fold_ops_off_the_list_or_too_large(tmp_path):
    random = helper.make_node("RandomNormal", [], ["W"], shape=[1, 12, 2])
    audit = audit_model(save(_one_lstm_with_w([random])[0], tmp_path / "random.onnx"))
    (err,) = audit.errors
    assert err.code == "UNRESOLVED_WEIGHT" and "RandomNormal" in err.message and "foldable" in err.message
    huge = [helper.make_node("ConstantOfShape", ["shape"], ["big"]), helper.make_node("Slice", ["big", "s", "e"], ["W"])]
    inits = [numpy_helper.from_array(np.array([1, 1 << 20, 1 << 20], np.int64), "shape"),
             numpy_helper.from_array(np.array([0], np.int64), "s"), numpy_helper.from_array(np.array([12], np.int64), "e")]
    audit = audit_model(save(_one_lstm_with_w(huge, inits)[0], tmp_path / "huge.onnx"))
    (err,) = audit.errors
    assert err.code == "UNRESOLVED_WEIGHT" and "elements" in err.message


# --- torch's dynamo exporter -----------------------------------------------------------------------------


def _dynamo(net, path: Path) -> Path:
    import torch

    require_module("onnxscript", "torch's dynamo exporter needs onnxscript (the test extra installs it)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 5, 2),), str(path), dynamo=True)
    return path


def test_audit_counts_dynamo_export_like_pytorch(tmp_path):
    net = _torch_lstm(num_layers=2)
    audit = audit_model(_dynamo(net, tmp_path / "dynamo.onnx"))
    assert not audit.errors, audit.findings
    _assert_gates_equal_torch(audit, net)
    # The zero initial state dynamo writes as an initializer is not a parameter.
    assert audit.total_params == sum(p.numel() for p in net.parameters())
    assert any("initial state" in why for _, why in audit.not_counted)
    assert {t.name for t in audit.head} == {"head.weight", "head.bias"}


def test_audit_flags_dynamo_export_of_lstm_with_proj_size(tmp_path):
    import onnxruntime as ort

    net = _torch_lstm(proj_size=3)
    path = _dynamo(net, tmp_path / "proj.onnx")
    with pytest.raises(Exception):  # the claim the finding makes: onnxruntime cannot run this node
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 5, 2), np.float32)})
    audit = audit_model(path)
    malformed = [f for f in audit.errors if f.code == "MALFORMED_NODE"]
    assert len(malformed) == 1
    assert "initial_c" in malformed[0].message and "got shape [1, 1, 4], expected [1, batch, 3]" in malformed[0].message
    assert audit.total_params < sum(p.numel() for p in net.parameters())  # the projection was dropped
    proc = run_cli("audit", str(path))
    assert proc.returncode == 1 and "MALFORMED_NODE" in proc.stderr


# --- hostile or broken files: a finding, never a traceback ------------------------------------------------


def _quantized_lstm(w_q, w_scale, w_zp):
    h = 2
    r_q = np.zeros((1, h, 4 * h), np.int8)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w_q, "Wq"), (r_q, "Rq"), (w_scale, "Ws"), (w_zp, "Wz"),
                                                        (np.ones(1, np.float32), "Rs"), (np.zeros(1, np.int8), "Rz"))]
    node = helper.make_node("DynamicQuantizeLSTM", ["X", "Wq", "Rq", "", "", "", "", "", "Ws", "Wz", "Rs", "Rz"], ["Y"],
                            hidden_size=h, domain="com.microsoft", name="qlstm")
    graph = helper.make_graph([node], "q", [vi("X", TensorProto.FLOAT, [3, 1, 1])], [vi("Y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("case,expected", [
    ("float_weight", "expected int8 or uint8"),
    ("scale_shape", "expected [1] (per tensor) or [1, 8] (per channel)"),
    ("zero_point_shape", "like its scale"),
])
def test_malformed_quantized_lstm_is_a_finding_not_a_traceback(tmp_path, case, expected):
    w_q, w_scale, w_zp = np.ones((1, 1, 8), np.int8), np.ones(1, np.float32), np.zeros(1, np.int8)
    if case == "float_weight":
        w_q = w_q.astype(np.float32)
    elif case == "scale_shape":
        w_scale = np.ones((1, 3), np.float32)
    else:
        w_zp = np.zeros((1, 8), np.int8)
    path = save(_quantized_lstm(w_q, w_scale, w_zp), tmp_path / f"{case}.onnx")
    proc = run_cli("audit", str(path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "MALFORMED_NODE" in proc.stdout and expected in proc.stdout


def test_folding_bounds_what_a_hostile_graph_can_allocate(tmp_path):
    """Elementwise broadcasting, Concat and Gather could each make a huge tensor from small constants."""
    big = np.zeros((1 << 13, 1), np.float32)
    cases = {
        "broadcast": ([helper.make_node("Add", ["col", "row"], ["W"])],
                      [numpy_helper.from_array(np.zeros((1 << 14, 1), np.float32), "col"),
                       numpy_helper.from_array(big.reshape(1, -1), "row")]),  # 2^27 elements from 24k
        "gather": ([helper.make_node("Gather", ["vec", "idx"], ["W"], axis=0)],
                   [numpy_helper.from_array(np.zeros((2, 1 << 14), np.float32), "vec"),
                    numpy_helper.from_array(np.zeros(1 << 13, np.int64), "idx")]),
    }
    for name, (nodes, inits) in cases.items():
        path = save(_one_lstm_with_w(nodes, inits)[0], tmp_path / f"{name}.onnx")
        proc = run_cli("audit", str(path))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (name, proc.stderr[-500:])
        assert "UNRESOLVED_WEIGHT" in proc.stdout and "elements" in proc.stdout, name


def test_a_cycle_among_constants_is_a_finding(tmp_path):
    nodes = [helper.make_node("Identity", ["b"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Identity", ["a"], ["W"])]
    model = _one_lstm_with_w(nodes)[0]
    path = tmp_path / "cycle.onnx"
    path.write_bytes(model.SerializeToString())  # onnx.checker would refuse it; a hostile file need not pass it
    proc = run_cli("audit", str(path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "UNRESOLVED_WEIGHT" in proc.stdout


def test_audit_reads_fp16_weights_exactly(tmp_path):
    """A float16 model (as fp16 converters write it: fp16 initializers, Cast at the float32 input)."""
    h, f = 3, 2
    w, r, b = (_u(1, 4 * h, f).astype(np.float16), _u(1, 4 * h, h).astype(np.float16), _u(1, 8 * h).astype(np.float16))
    nodes = [helper.make_node("Cast", ["X"], ["X16"], to=TensorProto.FLOAT16),
             helper.make_node("LSTM", ["X16", "W", "R", "B"], ["Y"], hidden_size=h, name="lstm16")]
    graph = helper.make_graph(nodes, "fp16", [vi("X", TensorProto.FLOAT, [4, 1, f])],
                              [vi("Y", TensorProto.FLOAT16, [4, 1, 1, h])],
                              [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    audit = audit_model(save(model, tmp_path / "fp16.onnx"))
    assert not audit.errors, audit.findings
    gates = {g.key: g.array for g in audit.layers[0].gates}
    assert gates["layer0.forward.cell.W"].dtype == np.float16
    np.testing.assert_array_equal(gates["layer0.forward.cell.W"], w[0, 3 * h:])
    np.testing.assert_array_equal(gates["layer0.forward.output.bR"], b[0, 4 * h + h:4 * h + 2 * h])
    assert audit.recurrent_params == w.size + r.size + b.size
