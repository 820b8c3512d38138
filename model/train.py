"""Training loop and run directory: seeded, early-stopped, interruptible, written to a staging dir then published."""
from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from lstm_onnx.contract import CONFIG_FILE, INIT_FILE, METRICS_FILE, PLOT_FILE, WEIGHTS_FILE

from . import checkpoint
from .config import ModelConfig, RunConfig
from .data import DEFAULT_TASK_PARAMS, DataError, Dataset, load_data, make_default_task, split_dataset
from .network import StackedRNN
from .report import weight_change_rows

DRY_RUN_STEPS = 3  # optimiser steps in --dry-run: enough to move every weight, seconds on a CPU
DRY_RUN_VAL = 128  # validation sequences in --dry-run
EVAL_BATCH = 1024


class OutputError(ValueError):
    """The output path cannot hold a run directory (a file, or a directory that is not a run)."""


class DivergedError(RuntimeError):
    """The loss became NaN or infinite; the weights are useless and nothing is written."""


@dataclass
class _Fit:
    """What the loop hands to the writer."""

    init: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    interrupted: bool = False
    steps: int = 0
    sequences: int = 0
    seconds: float = 0.0


def check_output(output: Path) -> None:
    """Refuse an output path that is a file, or a non-empty directory that is not a run directory."""
    if output.exists():
        if not output.is_dir():
            raise OutputError(f"output {output}: is a file, expected a directory path for the run")
        if any(output.iterdir()) and not (output / CONFIG_FILE).is_file():
            raise OutputError(f"output {output}: a non-empty directory that is not a run directory; "
                              "expected a new path or an earlier run to replace")


def prepare_data(config: RunConfig, data_path: Path | None) -> Dataset:
    """Load the user's file or generate the default task, and check it fits the model config."""
    m = config.model
    if data_path is not None:
        data = load_data(data_path, task=m.task, num_classes=m.num_outputs if m.task == "classification" else None)
    else:
        spec = config.dataset if config.dataset.get("kind") == "default" else {}
        params = {k: v for k, v in spec.items() if k in DEFAULT_TASK_PARAMS}
        data = make_default_task(int(spec.get("seed", config.seed)), **params)
    check_data_fits(config.model, data)
    return data


def check_data_fits(model: ModelConfig, data: Dataset) -> None:
    """Raise DataError when the data's task, feature count or outputs differ from the model config."""
    source = f"data file {data.spec['path']}" if data.spec.get("kind") == "file" else f"default task {data.spec.get('name')!r}"
    if model.task != data.task:
        raise DataError(f"{source}: holds a {data.task} task, but the model is configured for {model.task}")
    if model.input_size != data.input_size:
        raise DataError(f"{source}: sequences have {data.input_size} features, model input_size is {model.input_size}")
    if data.task == "classification" and model.num_outputs < data.num_outputs:
        raise DataError(f"{source}: labels need {data.num_outputs} classes, model num_outputs is {model.num_outputs}")
    if data.task == "regression" and model.num_outputs != data.num_outputs:
        raise DataError(f"{source}: has {data.num_outputs} regression values, model num_outputs is {model.num_outputs}")


def train_run(config: RunConfig, output: Path, data_path: Path | None = None, progress: bool = True,
              *, data: Dataset | None = None) -> dict[str, Any]:
    """Train a network and write the run directory at `output`; return the metrics (as in metrics.json).

    Everything is checked before anything is written: the config, the output path, the data. The run
    seed (`config.seed`) drives data generation, the validation split, initialisation, dropout and
    shuffling, so the same seed and thread count give bit-identical weights on CPU; config.json records
    it as the training seed too. Ctrl-C stops training and still writes the best weights so far, with
    metrics.json "interrupted": true. `data` lets a caller pass data it already loaded from `data_path`.
    """
    output = Path(output)
    config.model.validate()
    check_output(output)
    if data is None:
        data = prepare_data(config, Path(data_path) if data_path is not None else None)
    else:
        check_data_fits(config.model, data)
    run_config = dataclasses.replace(
        config, training=dataclasses.replace(config.training, seed=config.seed), dataset=data.spec)
    train_set, val_set = split_dataset(data, run_config.training.val_fraction, run_config.seed)
    with _deterministic(run_config.training.threads):
        fit = _fit(run_config, train_set, val_set, progress)
    metrics = _metrics(run_config, fit, val_set, len(train_set))
    _write_run(output, run_config, fit, metrics)
    return metrics


@contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Deterministic kernels, a private RNG stream and optional thread count, all restored afterwards."""
    previous_det = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.use_deterministic_algorithms(True)
        if threads > 0:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous_det)
            torch.set_num_threads(previous_threads)


def _tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(ds.x)), torch.from_numpy(np.ascontiguousarray(ds.y))


def _loss_fn(task: str) -> nn.Module:
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


@torch.no_grad()
def evaluate(net: StackedRNN, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean loss, metric) over (x, y): accuracy for classification, RMSE for regression."""
    was_training = net.training
    net.eval()
    task = net.config.task
    loss_fn = _loss_fn(task)
    total_loss, total_metric = 0.0, 0.0
    for i in range(0, x.shape[0], EVAL_BATCH):
        xb, yb = x[i:i + EVAL_BATCH], y[i:i + EVAL_BATCH]
        out = net(xb)[0]  # (B, num_outputs)
        total_loss += float(loss_fn(out, yb)) * xb.shape[0]
        if task == "classification":
            total_metric += float((out.argmax(dim=1) == yb).sum())
        else:
            total_metric += float(((out - yb) ** 2).mean(dim=1).sum())
    net.train(was_training)
    n = x.shape[0]
    metric = total_metric / n if task == "classification" else math.sqrt(total_metric / n)
    return total_loss / n, metric


def _load_net(model: ModelConfig, tensors: dict[str, torch.Tensor]) -> StackedRNN:
    """A network holding `tensors`; its throwaway random init must not advance the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        net = StackedRNN(model)
    net.load_state_dict(tensors)
    return net


def _clone(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _fit(config: RunConfig, train_set: Dataset, val_set: Dataset, progress: bool) -> _Fit:
    from tqdm import tqdm  # imported here: the CLI module must stay light

    t = config.training
    torch.manual_seed(config.seed)
    net = StackedRNN(config.model)
    init = _clone(net)  # before the first optimiser step
    optimiser = torch.optim.Adam(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    loss_fn = _loss_fn(config.model.task)
    shuffle = torch.Generator().manual_seed(config.seed)
    x, y = _tensors(train_set)
    xv, yv = _tensors(val_set)
    if t.dry_run:
        xv, yv = xv[:DRY_RUN_VAL], yv[:DRY_RUN_VAL]
    epochs = 1 if t.dry_run else t.epochs
    batches = math.ceil(x.shape[0] / t.batch_size)
    steps_per_epoch = min(batches, DRY_RUN_STEPS) if t.dry_run else batches
    show = progress and sys.stderr.isatty()
    fit = _Fit(init=init, final=init)
    best_loss, waited = math.inf, 0
    started = time.perf_counter()
    net.train()
    try:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(x.shape[0], generator=shuffle)
            seen, loss_sum = 0, 0.0
            with tqdm(total=min(steps_per_epoch * t.batch_size, x.shape[0]), desc=f"epoch {epoch}/{epochs}", unit="seq",
                      file=sys.stderr, disable=not show, leave=False) as bar:
                for step in range(steps_per_epoch):
                    idx = order[step * t.batch_size:(step + 1) * t.batch_size]
                    out = net(x[idx])[0]  # (B, num_outputs)
                    loss = loss_fn(out, y[idx])
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise DivergedError(f"training diverged: loss is {loss_value} at epoch {epoch}, step {step + 1}; "
                                            f"try a lower --lr (got {t.lr})")
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    if t.clip_grad_norm > 0:
                        nn.utils.clip_grad_norm_(net.parameters(), t.clip_grad_norm)
                    optimiser.step()
                    fit.steps += 1
                    seen += idx.shape[0]
                    fit.sequences += idx.shape[0]
                    loss_sum += loss_value * idx.shape[0]
                    bar.update(idx.shape[0])
                    bar.set_postfix(loss=f"{loss_value:.4f}")
            val_loss, val_metric = evaluate(net, xv, yv)
            fit.history.append({"epoch": epoch, "train_loss": loss_sum / seen, "val_loss": val_loss,
                                "val_metric": val_metric})
            if show:
                tqdm.write(f"epoch {epoch}: train_loss {loss_sum / seen:.4f}  val_loss {val_loss:.4f}  "
                           f"val_{_metric_name(config.model.task)} {val_metric:.4f}", file=sys.stderr)
            if val_loss < best_loss:
                best_loss, waited, fit.best_epoch, fit.final = val_loss, 0, epoch, _clone(net)
            else:
                waited += 1
                if waited >= t.patience and epoch < epochs:
                    fit.stopped_early = True
                    break
    except KeyboardInterrupt:
        fit.interrupted = True
        if fit.best_epoch is None:  # no epoch finished: the last weights are all there is
            fit.final = _clone(net)
    fit.seconds = time.perf_counter() - started
    return fit


def _metric_name(task: str) -> str:
    return "accuracy" if task == "classification" else "rmse"


def _metrics(config: RunConfig, fit: _Fit, val_set: Dataset, train_size: int) -> dict[str, Any]:
    net = _load_net(config.model, fit.final)
    xv, yv = _tensors(val_set)
    if config.training.dry_run:
        xv, yv = xv[:DRY_RUN_VAL], yv[:DRY_RUN_VAL]
    val_loss, val_metric = evaluate(net, xv, yv)
    name = _metric_name(config.model.task)
    final = {
        "val_loss": val_loss, "val_metric": val_metric, f"val_{name}": val_metric,
        "train_loss": fit.history[-1]["train_loss"] if fit.history else None,
        "best_epoch": fit.best_epoch, "epochs_run": len(fit.history), "steps": fit.steps,
        "stopped_early": fit.stopped_early, "interrupted": fit.interrupted,
        "train_sequences": train_size, "seconds": round(fit.seconds, 3),
        "sequences_per_second": round(fit.sequences / fit.seconds, 1) if fit.seconds > 0 else None,
        "val_sequences": int(xv.shape[0]),
    }
    return {"metric": name, "history": fit.history, "final": final, "interrupted": fit.interrupted,
            "weight_change": weight_change_rows(fit.init, fit.final, config.model)}


def plot_history(history: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Loss and validation curves as a PNG (Agg canvas directly: no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_metric = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_metric.plot(epochs, [h["val_metric"] for h in history], marker="o", color="tab:green")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(f"validation {metric}")
    if not history:
        ax_loss.set_title("no epoch finished")
    fig.tight_layout()
    fig.savefig(path, format="png")


def _write_run(output: Path, config: RunConfig, fit: _Fit, metrics: dict[str, Any]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.staging-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a run directory is meant to be shared
    try:
        checkpoint.write_json(staging / CONFIG_FILE, config.to_dict())
        for name, tensors in ((WEIGHTS_FILE, fit.final), (INIT_FILE, fit.init)):
            checkpoint.save_weights(_load_net(config.model, tensors), staging / name)
        checkpoint.write_json(staging / METRICS_FILE, metrics)
        plot_history(fit.history, metrics["metric"], staging / PLOT_FILE)
        for path in staging.iterdir():
            path.chmod(0o644)  # the atomic writers create private temporaries; a run directory is meant to be read
        checkpoint.publish_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def default_model_config(data: Dataset, **overrides: Any) -> ModelConfig:
    """A ModelConfig whose input size, task and outputs come from the data; `overrides` set the rest."""
    return ModelConfig(input_size=data.input_size, task=data.task, num_outputs=data.num_outputs, **overrides)
