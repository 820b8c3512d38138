"""The stacked recurrent network: one nn.LSTM/nn.GRU over all layers, and a head on the final hidden state."""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig


class StackedRNN(nn.Module):
    """Stacked LSTM or GRU with a linear head.

    The recurrent state is passed in and returned explicitly, batch-major (`[B, L*D, H]`), so that the
    exported ONNX graph can be batched by a server and a sequence can be fed in chunks.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        rnn_cls = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(
            input_size=config.input_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            bidirectional=config.bidirectional,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(config.hidden_size * config.num_directions, config.num_outputs)

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h0", "c0") if self.config.cell == "lstm" else ("h0",)

    def initial_state(self, batch: int, like: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Zero state for `batch` sequences, on the weights' dtype and device."""
        ref = like if like is not None else self.head.weight
        c = self.config
        shape = (batch, c.num_layers * c.num_directions, c.hidden_size)  # (B, L*D, H)
        return tuple(torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in self.state_names)

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: (B, T, F); state: h0 (and c0 for LSTM), each (B, L*D, H), or nothing for zeros.

        Returns (output, hn[, cn]) with hn/cn batch-major like h0/c0.
        """
        c = self.config
        batch = x.shape[0]
        if not state:
            state = self.initial_state(batch, like=x)
        layer_major = tuple(s.transpose(0, 1).contiguous() for s in state)  # (L*D, B, H)
        if c.cell == "lstm":
            _, (hn, cn) = self.rnn(x, layer_major)
            new_state = (hn, cn)
        else:
            _, hn = self.rnn(x, layer_major[0])
            new_state = (hn,)
        # The head reads the final hidden state of the last layer, not y[:, -1]: for the reverse
        # direction that is the state after reading the whole sequence, and it stays right once
        # sequence_lens makes the last time step a padded one.
        last = hn[-c.num_directions :]  # (D, B, H)
        features = last.transpose(0, 1).reshape(batch, c.num_directions * c.hidden_size)  # (B, D*H)
        out = self.head(features)  # (B, num_outputs)
        return (out,) + tuple(s.transpose(0, 1) for s in new_state)  # hn/cn: (B, L*D, H)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes a network of this config has (to check a checkpoint before loading)."""
    c = config
    g, h = c.num_gates, c.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(c.num_layers):
        in_size = c.input_size if k == 0 else h * c.num_directions
        for suffix in ("", "_reverse")[: c.num_directions]:
            shapes[f"rnn.weight_ih_l{k}{suffix}"] = (g * h, in_size)
            shapes[f"rnn.weight_hh_l{k}{suffix}"] = (g * h, h)
            shapes[f"rnn.bias_ih_l{k}{suffix}"] = (g * h,)
            shapes[f"rnn.bias_hh_l{k}{suffix}"] = (g * h,)
    shapes["head.weight"] = (c.num_outputs, h * c.num_directions)
    shapes["head.bias"] = (c.num_outputs,)
    return shapes
