"""Bench models: random-weight run directories exported to a Triton-layout repository (no training)."""
from __future__ import annotations

from pathlib import Path

# The default bench model: 3 layers, hidden 64, 8 features, FP32.
DEFAULT_MODEL = dict(cell="lstm", input_size=8, hidden_size=64, num_layers=3, num_outputs=4)
DEFAULT_TIME = 50


def make_run(out: Path, seed: int = 0, **model) -> Path:
    """A run directory with random (untrained) weights: enough for timing, parity and serving."""
    import torch

    from lstm_onnx.model.checkpoint import save_weights, write_json
    from lstm_onnx.model.config import ModelConfig, RunConfig
    from lstm_onnx.model.network import StackedRNN

    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(**model)
    torch.manual_seed(seed)
    net = StackedRNN(cfg)
    write_json(out / "config.json", RunConfig(model=cfg).to_dict())
    save_weights(net, out / "init.safetensors")
    save_weights(net, out / "model.safetensors")
    return out


def build_repository(work: Path, models: dict[str, dict], max_batch_size: int = 64) -> Path:
    """Export each named model config into work/repo (version 1) and return the repository path."""
    from lstm_onnx.export.repository import export_to_repository

    repo = work / "repo"
    for name, model in models.items():
        if (repo / name / "1" / "model.onnx").exists():
            continue
        run = make_run(work / "runs" / name, **model)
        export_to_repository(run, repo, name=name, max_batch_size=max_batch_size)
    return repo
