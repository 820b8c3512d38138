"""Gate splitting on its own: every shape error names the tensor, PyTorch sources and digests map row for row."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

from lstm_onnx.export.audit.gates import (
    GateShapeError,
    cell_of,
    describe_layout,
    gate_digest,
    gate_digests,
    pytorch_source,
    split_gates,
)

SOURCES = {"W": "w_init", "R": "r_init", "B": "b_init", "P": "p_init"}


def _lstm(h: int = 2, d: int = 1, features: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W": rng.standard_normal((d, 4 * h, features)).astype(np.float32),
            "R": rng.standard_normal((d, 4 * h, h)).astype(np.float32),
            "B": rng.standard_normal((d, 8 * h)).astype(np.float32),
            "P": rng.standard_normal((d, 3 * h)).astype(np.float32)}


@pytest.mark.parametrize("name, shape, message", [
    ("W", (1, 7, 3), "layer0 LSTM W 'w_init': got shape [1, 7, 3], expected [1, 8, input]"),
    ("W", (1, 8), "layer0 LSTM W 'w_init': got shape [1, 8], expected [1, 8, input]"),
    ("R", (1, 8, 3), "layer0 LSTM R 'r_init': got shape [1, 8, 3], expected [1, 8, 2]"),
    ("B", (1, 8), "layer0 LSTM B 'b_init': got shape [1, 8], expected [1, 16]"),
    ("P", (1, 5), "layer0 LSTM P 'p_init': got shape [1, 5], expected [1, 6]"),
])
def test_split_gates_refuses_each_misshapen_tensor_naming_it(name, shape, message):
    tensors = _lstm()
    tensors[name] = np.zeros(shape, np.float32)
    with pytest.raises(GateShapeError) as caught:
        split_gates("LSTM", 0, 2, "forward", tensors, SOURCES)
    assert str(caught.value) == message


def test_split_gates_refuses_peepholes_on_a_gru():
    rng = np.random.default_rng(1)
    tensors = {"W": rng.standard_normal((1, 6, 3)), "R": rng.standard_normal((1, 6, 2)), "P": np.zeros((1, 6))}
    with pytest.raises(GateShapeError) as caught:
        split_gates("GRU", 3, 2, "forward", tensors, SOURCES)
    assert str(caught.value) == "layer3 GRU: has a peephole input P, but only LSTM has peepholes"


def test_split_gates_keeps_going_past_an_unresolved_tensor():
    tensors = _lstm()
    tensors["W"] = None  # not resolved: R, B and P are still split
    gates = split_gates("LSTM", 0, 2, "forward", tensors, SOURCES)
    assert [g.kind for g in gates] == ["R"] * 4 + ["bW", "bR"] * 4 + ["P"] * 3
    tensors = _lstm()
    tensors["R"] = None
    gates = split_gates("LSTM", 0, 2, "forward", tensors, SOURCES)
    assert [g.kind for g in gates] == ["W"] * 4 + ["bW", "bR"] * 4 + ["P"] * 3


def test_split_gates_peepholes_come_in_i_o_f_blocks_with_their_source():
    tensors = _lstm(h=2)
    peep = [g for g in split_gates("LSTM", 0, 2, "forward", tensors, SOURCES) if g.kind == "P"]
    assert [(g.gate, g.source, g.index) for g in peep] == [
        ("input", "p_init", "[0, 0:2]"), ("output", "p_init", "[0, 2:4]"), ("forget", "p_init", "[0, 4:6]")]
    np.testing.assert_array_equal(peep[1].array, tensors["P"][0, 2:4])


def test_cell_of_names_onnx_and_onnxruntime_quantized_ops_only():
    def node(op, domain=""):
        return SimpleNamespace(op_type=op, domain=domain)

    assert cell_of(node("LSTM")) == "LSTM" and cell_of(node("GRU", "ai.onnx")) == "GRU"
    assert cell_of(node("DynamicQuantizeLSTM", "com.microsoft")) == "LSTM"
    assert cell_of(node("LSTM", "com.microsoft")) is None  # the quantized names only, in that domain
    assert cell_of(node("DynamicQuantizeLSTM")) is None and cell_of(node("RNN")) is None


def test_gate_digest_is_of_little_endian_float32_bytes_whatever_the_input_dtype():
    a = np.arange(6, dtype=np.float64).reshape(2, 3)[:, ::2]  # float64 and not contiguous
    want = "sha256:" + hashlib.sha256(np.array([[0, 2], [3, 5]], "<f4").tobytes()).hexdigest()
    assert gate_digest(a) == want and gate_digest(a.astype(">f4")) == want


@pytest.mark.parametrize("op, direction, gate, kind, want", [
    ("LSTM", "forward", "input", "W", ("rnn.weight_ih_l1", slice(0, 3))),
    ("LSTM", "forward", "forget", "R", ("rnn.weight_hh_l1", slice(3, 6))),
    ("LSTM", "reverse", "cell", "bW", ("rnn.bias_ih_l1_reverse", slice(6, 9))),
    ("LSTM", "forward", "output", "bR", ("rnn.bias_hh_l1", slice(9, 12))),
    ("GRU", "forward", "reset", "W", ("rnn.weight_ih_l1", slice(0, 3))),
    ("GRU", "reverse", "update", "R", ("rnn.weight_hh_l1_reverse", slice(3, 6))),
    ("GRU", "forward", "hidden", "bR", ("rnn.bias_hh_l1", slice(6, 9))),
    ("LSTM", "forward", "input", "P", None),
])
def test_pytorch_source_maps_each_onnx_gate_to_its_rows_in_pytorch_order(op, direction, gate, kind, want):
    assert pytorch_source(op, 1, direction, gate, kind, 3) == want


@pytest.mark.parametrize("cell, gates", [("lstm", 4), ("gru", 3)])
def test_gate_digests_key_every_slice_as_the_audit_does(cell, gates):
    rng = np.random.default_rng(2)
    h = 2
    layers = [(rng.standard_normal((2, gates * h, 3)), rng.standard_normal((2, gates * h, h)),
               rng.standard_normal((2, 2 * gates * h))),
              (rng.standard_normal((1, gates * h, 4)), rng.standard_normal((1, gates * h, h)), None)]
    digests = gate_digests(cell, layers)
    order = {"lstm": ("input", "output", "forget", "cell"), "gru": ("update", "reset", "hidden")}[cell]
    assert len(digests) == 2 * gates * 4 + gates * 2
    assert digests[f"layer0.reverse.{order[1]}.bR"] == gate_digest(layers[0][2][1, 3 * h + h:3 * h + 2 * h]
                                                                    if gates == 3 else
                                                                    layers[0][2][1, 4 * h + h:4 * h + 2 * h])
    assert digests[f"layer1.forward.{order[-1]}.R"] == gate_digest(layers[1][1][0, (gates - 1) * h:gates * h])
    assert not any(key.startswith("layer1.reverse") for key in digests)


def test_describe_layout_names_rows_in_both_orders():
    lines = describe_layout("LSTM", 2, 2, 3, peepholes=True)
    assert lines[0] == "ONNX stores LSTM gates in the order i, o, f, c; PyTorch in i, f, g, o."
    assert lines[1] == ("  W [2, 8, 3] and R [2, 8, 2]: rows 0:2 input, 2:4 output, 4:6 forget, 6:8 cell "
                        "(first axis = direction: 0 forward, 1 reverse).")
    assert lines[2] == "  B [2, 16]: bW = columns 0:8 in the same gate order, bR = columns 8:16."
    assert lines[3] == "  P [2, 6] (peepholes, optional): 2-wide blocks for i, o, f."
    assert lines[4] == ("  PyTorch weight_ih_l{k}/weight_hh_l{k}/bias_*_l{k}: rows 0:2 input(i), 2:4 forget(f), "
                        "4:6 cell(g), 6:8 output(o).")
    assert len(describe_layout("LSTM", 2, 1, 3)) == 4 and len(describe_layout("GRU", 2, 1, 3, peepholes=True)) == 4
