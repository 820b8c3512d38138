"""The audit on ONNX files other tools write: tf2onnx-style Keras layers, single-node spec models, Loop/Scan graphs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from audit_models import codes, run_cli, save
from onnx import TensorProto, helper, numpy_helper

from lstm_onnx.export.audit import audit_model
from lstm_onnx.export.audit.report import format_text

RNG = np.random.default_rng(3)


def _u(*shape: int) -> np.ndarray:
    return RNG.uniform(-0.5, 0.5, shape).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset: int = 14) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "foreign", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tf2onnx")
    onnx.checker.check_model(model)
    return model


def keras_like(op: str, hidden: int = 3, features: int = 2, bidirectional: bool = False):
    """What tf2onnx writes for Sequential([LSTM|GRU (maybe Bidirectional), Dense]): odd names, Identity in
    front of the weights, LSTM bias folded into bW with bR zero, a MatMul+Add head."""
    g, d = (4 if op == "LSTM" else 3), (2 if bidirectional else 1)
    w, r = _u(d, g * hidden, features), _u(d, g * hidden, hidden)
    b = np.concatenate([_u(d, g * hidden), np.zeros((d, g * hidden), np.float32) if op == "LSTM" else _u(d, g * hidden)], 1)
    kernel, bias = _u(d * hidden, 2), _u(2)
    inits = [numpy_helper.from_array(w, "W__31"), numpy_helper.from_array(r, "R__32"), numpy_helper.from_array(b, "B__33"),
             numpy_helper.from_array(kernel, "sequential/dense/MatMul/ReadVariableOp:0"),
             numpy_helper.from_array(bias, "sequential/dense/BiasAdd/ReadVariableOp:0"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "const_shape")]
    attrs = {"linear_before_reset": 1} if op == "GRU" else {}
    nodes = [
        helper.make_node("Identity", ["W__31"], ["W_id"]),
        helper.make_node("Identity", ["W_id"], ["W_id2"]),  # chains of Identity happen after graph surgery
        helper.make_node("Transpose", ["input_1"], ["x_tbf"], perm=[1, 0, 2]),
        helper.make_node(op, ["x_tbf", "W_id2", "R__32", "B__33"], ["Y", "Y_h"], hidden_size=hidden,
                         direction="bidirectional" if bidirectional else "forward", name=f"sequential/{op.lower()}", **attrs),
        helper.make_node("Transpose", ["Y_h"], ["h_bdh"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["h_bdh", "const_shape"], ["h_flat"]),
        helper.make_node("MatMul", ["h_flat", "sequential/dense/MatMul/ReadVariableOp:0"], ["mm"]),
        helper.make_node("Add", ["mm", "sequential/dense/BiasAdd/ReadVariableOp:0"], ["dense"]),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["N", 5, features])],
                   [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["N", 2])], inits)
    return model, (w, r, b, kernel, bias)


@pytest.mark.parametrize("op,bidirectional", [("LSTM", False), ("GRU", False), ("LSTM", True)])
def test_audit_reads_tf2onnx_keras_layers(tmp_path, op, bidirectional):
    model, (w, r, b, kernel, bias) = keras_like(op, bidirectional=bidirectional)
    audit = audit_model(save(model, tmp_path / "keras.onnx"))
    assert not audit.errors, audit.findings
    (layer,) = audit.layers
    assert layer.sources["W"] == "W__31"  # resolved through both Identity nodes
    assert audit.total_params == w.size + r.size + b.size + kernel.size + bias.size
    assert {t.name for t in audit.head} == {"sequential/dense/MatMul/ReadVariableOp:0", "sequential/dense/BiasAdd/ReadVariableOp:0"}
    gates = {g.key: g.array for g in layer.gates}
    if op == "LSTM":
        assert "BIAS_FOLDED" in codes(audit)
        assert "NO_CONTRACT" in codes(audit)
        np.testing.assert_array_equal(gates["layer0.forward.forget.bW"], b[0, 6:9])
        if bidirectional:
            np.testing.assert_array_equal(gates["layer0.reverse.cell.R"], r[1, 9:12])
    else:
        np.testing.assert_array_equal(gates["layer0.forward.reset.W"], w[0, 3:6])  # z, r, h
        assert "BIAS_FOLDED" not in codes(audit)


def test_audit_reads_spec_lstm_with_peepholes_bias_sequence_lens(tmp_path):
    hidden, features = 3, 2
    w, r, b, p = _u(2, 12, features), _u(2, 12, hidden), _u(2, 24), _u(2, 9)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"), (p, "P"))]
    node = helper.make_node("LSTM", ["X", "W", "R", "B", "seq", "h0", "c0", "P"], ["Y", "Y_h", "Y_c"],
                            hidden_size=hidden, direction="bidirectional")
    vi = helper.make_tensor_value_info
    model = _model([node], [vi("X", TensorProto.FLOAT, [4, 1, features]), vi("seq", TensorProto.INT32, [1]),
                            vi("h0", TensorProto.FLOAT, [2, 1, hidden]), vi("c0", TensorProto.FLOAT, [2, 1, hidden])],
                   [vi("Y", TensorProto.FLOAT, [4, 2, 1, hidden])], inits)
    path = save(model, tmp_path / "spec.onnx")
    audit = audit_model(path)
    assert not audit.errors, audit.findings
    gates = {g.key: g.array for g in audit.layers[0].gates}
    # P holds i, o, f blocks; the cell candidate has no peephole.
    np.testing.assert_array_equal(gates["layer0.reverse.forget.P"], p[1, 6:9])
    np.testing.assert_array_equal(gates["layer0.forward.output.P"], p[0, 3:6])
    assert "layer0.forward.cell.P" not in gates
    assert audit.layers[0].sources["sequence_lens"] == "seq"
    assert audit.total_params == w.size + r.size + b.size + p.size
    assert "P [2, 9] (peepholes, optional): 3-wide blocks for i, o, f" in format_text(audit)

    import onnxruntime as ort  # the hand-built model is a real, runnable one

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    zeros = np.zeros((2, 1, hidden), np.float32)
    (y,) = sess.run(["Y"], {"X": _u(4, 1, features), "seq": np.array([3], np.int32), "h0": zeros, "c0": zeros})
    assert y.shape == (4, 2, 1, hidden)


@pytest.mark.parametrize("linear_before_reset", [0, 1])
def test_audit_reads_spec_gru_either_reset_placement(tmp_path, linear_before_reset):
    w, r = _u(1, 9, 2), _u(1, 9, 3)
    node = helper.make_node("GRU", ["X", "W", "R"], ["Y"], hidden_size=3, linear_before_reset=linear_before_reset)
    vi = helper.make_tensor_value_info
    model = _model([node], [vi("X", TensorProto.FLOAT, [4, 1, 2])], [vi("Y", TensorProto.FLOAT, [4, 1, 1, 3])],
                   [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")])
    audit = audit_model(save(model, tmp_path / "gru.onnx"))
    assert not audit.errors
    assert audit.layers[0].attributes["linear_before_reset"] == linear_before_reset
    assert f"linear_before_reset={linear_before_reset}" in format_text(audit)
    assert "NO_BIAS" in codes(audit)
    np.testing.assert_array_equal({g.key: g.array for g in audit.layers[0].gates}["layer0.forward.hidden.R"], r[0, 6:9])


def test_audit_resolves_weights_in_constant_nodes(tmp_path):
    w, r = _u(1, 12, 2), _u(1, 12, 3)
    nodes = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w)),
             helper.make_node("Constant", [], ["Rc"], value=numpy_helper.from_array(r)),
             helper.make_node("LSTM", ["X", "Wc", "Rc"], ["Y"], hidden_size=3, direction="reverse")]
    vi = helper.make_tensor_value_info
    model = _model(nodes, [vi("X", TensorProto.FLOAT, [4, 1, 2])], [vi("Y", TensorProto.FLOAT, [4, 1, 1, 3])], [])
    audit = audit_model(save(model, tmp_path / "const.onnx"))
    assert not audit.errors
    assert {g.direction for g in audit.layers[0].gates} == {"reverse"}
    assert audit.recurrent_params == w.size + r.size


def test_audit_refuses_weights_computed_at_run_time(tmp_path):
    w, r = _u(1, 12, 2), _u(1, 12, 3)
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Mul", ["W_in", "W_in"], ["W_sq"]), helper.make_node("LSTM", ["X", "W_sq", "R"], ["Y"], hidden_size=3)]
    model = _model(nodes, [vi("X", TensorProto.FLOAT, [4, 1, 2]), vi("W_in", TensorProto.FLOAT, list(w.shape))],
                   [vi("Y", TensorProto.FLOAT, [4, 1, 1, 3])], [numpy_helper.from_array(r, "R")])
    audit = audit_model(save(model, tmp_path / "computed.onnx"))
    assert [f.code for f in audit.errors] == ["UNRESOLVED_WEIGHT"]
    assert "'W_sq'" in audit.errors[0].message


def _scan_rnn_model() -> onnx.ModelProto:
    """h_t = tanh(x_t W + h_{t-1} R) written as a Scan: a recurrence with no LSTM/GRU op."""
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "Wt"], ["xw"]), helper.make_node("MatMul", ["h_prev", "Rt"], ["hr"]),
         helper.make_node("Add", ["xw", "hr"], ["pre"]), helper.make_node("Tanh", ["pre"], ["h_next"]),
         helper.make_node("Identity", ["h_next"], ["y_t"])],
        "body", [vi("h_prev", TensorProto.FLOAT, [1, 3]), vi("x_t", TensorProto.FLOAT, [1, 2])],
        [vi("h_next", TensorProto.FLOAT, [1, 3]), vi("y_t", TensorProto.FLOAT, [1, 3])])
    scan = helper.make_node("Scan", ["h0", "X"], ["h_last", "Y"], body=body, num_scan_inputs=1, name="rnn_scan")
    return _model([scan], [vi("h0", TensorProto.FLOAT, [1, 3]), vi("X", TensorProto.FLOAT, [5, 1, 2])],
                  [vi("Y", TensorProto.FLOAT, [5, 1, 3])],
                  [numpy_helper.from_array(_u(2, 3), "Wt"), numpy_helper.from_array(_u(3, 3), "Rt")])


def test_audit_explains_scan_recurrence_has_no_op_to_audit(tmp_path):
    path = save(_scan_rnn_model(), tmp_path / "scan.onnx")
    audit = audit_model(path)
    assert [f.code for f in audit.errors] == ["NO_RECURRENT_OP"]
    assert "Scan 'rnn_scan'" in audit.errors[0].message and "no explicit recurrent op" in audit.errors[0].message
    proc = run_cli("audit", str(path))
    assert proc.returncode == 1 and "NO_RECURRENT_OP" in proc.stderr


def test_audit_numbers_layers_in_topological_order(tmp_path):
    """A graph whose file order is not topological: the layer index follows the data, not the file."""
    vi = helper.make_tensor_value_info
    w0, r0, w1, r1 = _u(1, 12, 2), _u(1, 12, 3), _u(1, 12, 3), _u(1, 12, 3)
    second = helper.make_node("LSTM", ["x1", "W1", "R1"], ["Y1"], hidden_size=3, name="second")
    squeeze = helper.make_node("Squeeze", ["Y0", "axis1"], ["x1"])
    first = helper.make_node("LSTM", ["X", "W0", "R0"], ["Y0"], hidden_size=3, name="first")
    graph = helper.make_graph([second, squeeze, first], "unsorted", [vi("X", TensorProto.FLOAT, [4, 1, 2])],
                              [vi("Y1", TensorProto.FLOAT, [4, 1, 1, 3])],
                              [numpy_helper.from_array(a, n) for a, n in ((w0, "W0"), (r0, "R0"), (w1, "W1"), (r1, "R1"))]
                              + [numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    audit = audit_model(save(model, tmp_path / "unsorted.onnx"))
    assert [x.node for x in audit.layers] == ["first", "second"]
    assert audit.layers[1].reads == ["Squeeze", "layer0 output Y"]
    assert not audit.errors
