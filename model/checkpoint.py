"""Run-directory I/O: config.json and safetensors weights, checked against each other, never pickles."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lstm_onnx.contract import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    RunDirectoryError,
    read_run_config,
)

from .config import ConfigError, RunConfig
from .network import StackedRNN, expected_shapes


class CheckpointError(ValueError):
    """A run directory is missing, malformed, or does not match its config."""


def read_config(run_dir: str | os.PathLike) -> RunConfig:
    """The RunConfig that built a run (config.json read through the torch-free contract reader)."""
    try:
        data = read_run_config(run_dir)
    except RunDirectoryError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        return RunConfig.from_dict(data)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{Path(run_dir) / CONFIG_FILE}: {exc}") from None


def read_weights(path: str | os.PathLike, config: RunConfig) -> dict[str, torch.Tensor]:
    """Load a safetensors file and check its keys, shapes and dtype against the config."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, expected safetensors weights")
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":
        raise CheckpointError(f"{path}: looks like a pickle; only safetensors are accepted (pickles can run code)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    expected = expected_shapes(config.model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        c = config.model
        raise CheckpointError(
            f"{path}: tensors do not match config.json ({c.cell}, {c.num_layers} layers, hidden {c.hidden_size}, "
            f"{'bidirectional' if c.bidirectional else 'unidirectional'}): "
            + (f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}" if extra else "")
        )
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{path}: tensor {name!r}: got shape {list(t.shape)}, expected {list(shape)}")
        if t.dtype != torch.float32:
            raise CheckpointError(f"{path}: tensor {name!r}: got dtype {t.dtype}, expected torch.float32")
    return tensors


def load_run(run_dir: str | os.PathLike, weights: str = WEIGHTS_FILE) -> tuple[StackedRNN, RunConfig]:
    """Rebuild the network from a run directory's config and load its weights, in eval mode."""
    folder = Path(run_dir)
    missing = [name for name in (CONFIG_FILE, weights) if not (folder / name).is_file()]
    if folder.is_dir() and missing:
        present = sorted(p.name for p in folder.iterdir())[:6]
        raise CheckpointError(f"run directory {folder} is incomplete: missing {', '.join(missing)} (it holds "
                              f"{', '.join(present) or 'nothing'}); expected the output of `lstm-onnx train`")
    config = read_config(run_dir)
    tensors = read_weights(Path(run_dir) / weights, config)
    net = StackedRNN(config.model)
    net.load_state_dict(tensors, strict=True)
    net.eval()
    return net, config


def save_weights(net: StackedRNN, path: str | os.PathLike) -> None:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "lstm-onnx-weights/1"})


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename) so a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written staging directory into place, replacing an older one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
