"""Configuration of a stacked recurrent network and of a training run, stored in config.json."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lstm_onnx.contract import RUN_FORMAT

CELLS = ("lstm", "gru")
TASKS = ("classification", "regression")
MAX_LAYERS = 8


class ConfigError(ValueError):
    """A configuration value is out of range or of the wrong kind."""


@dataclass
class ModelConfig:
    cell: str = "lstm"
    input_size: int = 1
    hidden_size: int = 32
    num_layers: int = 2  # 1..8; each layer is one explicit LSTM/GRU node in ONNX
    bidirectional: bool = False
    dropout: float = 0.0  # between layers only (PyTorch semantics); export is always eval mode
    task: str = "classification"
    num_outputs: int = 4  # classes for classification, K values for regression
    proj_size: int = 0  # accepted only to refuse it clearly: ONNX's LSTM has no projection

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def num_gates(self) -> int:
        return 4 if self.cell == "lstm" else 3

    def validate(self) -> "ModelConfig":
        if self.cell not in CELLS:
            raise ConfigError(f"cell: got {self.cell!r}, expected one of {', '.join(CELLS)}")
        if self.task not in TASKS:
            raise ConfigError(f"task: got {self.task!r}, expected one of {', '.join(TASKS)}")
        for name in ("input_size", "hidden_size", "num_outputs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: got {value!r}, expected a positive integer")
        if not isinstance(self.num_layers, int) or not 1 <= self.num_layers <= MAX_LAYERS:
            raise ConfigError(f"num_layers: got {self.num_layers!r}, expected an integer from 1 to {MAX_LAYERS}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout: got {self.dropout!r}, expected a value in [0, 1)")
        if self.proj_size:
            raise ConfigError(
                f"proj_size: got {self.proj_size}, expected 0: ONNX's LSTM operator has no projection, "
                "so a projected LSTM cannot be exported as explicit LSTM nodes"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("proj_size")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"model config: got {type(data).__name__}, expected an object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config: unknown keys {unknown}, expected only {sorted(known - {'proj_size'})}")
        return cls(**data).validate()


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3  # 3e-3 learns the default task faster but collapsed to chance on 2 of 10 seeds
    weight_decay: float = 0.0
    clip_grad_norm: float = 1.0  # LSTMs on long sequences can spike; clipping keeps one bad batch from undoing an epoch
    patience: int = 5  # epochs without validation improvement before stopping
    val_fraction: float = 0.2
    seed: int = 0  # train_run records RunConfig.seed here: the run's one seed drives data, split, init and shuffling
    dry_run: bool = False  # a few steps only: lets CI smoke-test a configuration in seconds
    # Intra-op threads. The CPU kernels split their sums by thread count, so weights are bit-identical only for
    # the same count: 1 makes a seed reproduce on any machine, and these small matmuls gain little from more
    # (about 25% on 2 idle cores) while 2 threads on shared, busy cores can be several times slower. 0: torch's default.
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunConfig:
    model: ModelConfig
    training: TrainConfig = field(default_factory=TrainConfig)
    dataset: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    format: str = RUN_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "model": self.model.to_dict(),
            "training": self.training.to_dict(),
            "dataset": self.dataset,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ConfigError(f"config.json: format is {got!r}, expected {RUN_FORMAT!r}")
        training = data.get("training", {})
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return cls(
            model=ModelConfig.from_dict(data.get("model")),
            training=TrainConfig(**{k: v for k, v in training.items() if k in known}),
            dataset=data.get("dataset", {}),
            seed=int(data.get("seed", 0)),
        )
