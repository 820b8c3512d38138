"""StackedRNN: shapes, explicit batch-major state, GRU, bidirectional, refused configurations."""
from __future__ import annotations

import pytest
import torch

from lstm_onnx.model.config import ConfigError, ModelConfig
from lstm_onnx.model.network import StackedRNN, expected_shapes


def _net(**overrides) -> StackedRNN:
    torch.manual_seed(0)
    config = dict(cell="lstm", input_size=3, hidden_size=8, num_layers=2, num_outputs=4)
    config.update(overrides)
    return StackedRNN(ModelConfig(**config)).eval()


@pytest.mark.parametrize("cell,bidirectional", [("lstm", False), ("lstm", True), ("gru", False), ("gru", True)])
def test_forward_returns_output_and_batch_major_state(cell, bidirectional):
    net = _net(cell=cell, bidirectional=bidirectional)
    d = 2 if bidirectional else 1
    out, *state = net(torch.randn(5, 7, 3))
    assert out.shape == (5, 4)
    assert len(state) == (2 if cell == "lstm" else 1)  # GRU has no cell state
    for s in state:
        assert s.shape == (5, 2 * d, 8)  # (B, L*D, H)


@pytest.mark.parametrize("cell,bidirectional,layers", [("lstm", False, 2), ("gru", True, 3), ("lstm", True, 1)])
def test_state_dict_matches_expected_shapes(cell, bidirectional, layers):
    net = _net(cell=cell, bidirectional=bidirectional, num_layers=layers)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == expected_shapes(net.config)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_feeding_in_chunks_with_state_equals_whole_sequence(cell):
    net = _net(cell=cell)
    x = torch.randn(3, 12, 3)
    with torch.no_grad():
        whole, *whole_state = net(x)
        _, *state = net(x[:, :5])
        _, *state = net(x[:, 5:9], *state)
        chunked, *chunked_state = net(x[:, 9:], *state)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    for a, b in zip(chunked_state, whole_state):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_explicit_zero_state_equals_default_state():
    net = _net()
    x = torch.randn(2, 6, 3)
    with torch.no_grad():
        implicit = net(x)
        explicit = net(x, *net.initial_state(2))
    for a, b in zip(implicit, explicit):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_nonzero_initial_state_changes_the_output():
    net = _net()
    x = torch.randn(2, 6, 3)
    with torch.no_grad():
        zero = net(x)[0]
        other = net(x, *(torch.full_like(s, 0.5) for s in net.initial_state(2)))[0]
    assert not torch.allclose(zero, other)


def test_head_reads_final_hidden_state_of_last_layer():
    net = _net()
    with torch.no_grad():
        out, hn, _ = net(torch.randn(4, 9, 3))
        expected = net.head(hn[:, -1])  # last layer, forward direction
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_bidirectional_head_reads_forward_then_reverse_final_states():
    net = _net(bidirectional=True)
    assert net.head.weight.shape == (4, 16)  # (num_outputs, D*H)
    with torch.no_grad():
        out, hn, _ = net(torch.randn(4, 9, 3))
        expected = net.head(torch.cat([hn[:, -2], hn[:, -1]], dim=1))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_regression_head_has_k_outputs():
    net = _net(task="regression", num_outputs=3)
    assert net(torch.randn(2, 4, 3))[0].shape == (2, 3)


def test_proj_size_is_refused_with_a_reason():
    with pytest.raises(ConfigError, match="proj_size: got 4.*ONNX's LSTM operator has no projection"):
        ModelConfig(proj_size=4).validate()


@pytest.mark.parametrize("field,value,expected", [
    ("num_layers", 0, "num_layers: got 0, expected an integer from 1 to 8"),
    ("num_layers", 9, "num_layers: got 9"),
    ("cell", "rnn", "cell: got 'rnn'"),
    ("dropout", 1.0, "dropout: got 1.0"),
    ("hidden_size", 0, "hidden_size: got 0"),
])
def test_out_of_range_config_is_refused(field, value, expected):
    with pytest.raises(ConfigError, match=expected):
        StackedRNN(ModelConfig(**{field: value}))
