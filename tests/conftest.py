"""Shared fixtures: tiny trained run directories and an exported model repository, built once per session."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_NUM_THREADS", "1")


def missing_tool(reason: str) -> None:
    """A tool this test needs is not installed: skip, saying why, except in CI (CI=true), where .ci/run installs
    every such tool and a skip would hide that the test never ran, so the test fails instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: .ci/run installs it, so this is a failure, not a skip)")
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, reason: str):
    """The module `name`, imported; when it cannot be, missing_tool(reason): a skip, or a failure in CI, where
    `make test` installs the extras that bring it (pytest.importorskip would skip there too)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing_tool(f"{reason}: cannot import {name} ({exc})")


def pytest_terminal_summary(terminalreporter, config):
    """pytest-randomly shuffles the order (the test extra); its seed goes in the header, which -q (make test)
    hides, so it is repeated at the end, beside any failure it may explain."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"pytest-randomly: --randomly-seed={seed} reruns this order "
                                    "(-p no:randomly: file order)")


def _train_tiny(out: Path, **model_overrides) -> Path:
    """Train a tiny network for a few steps on the default task (seconds on 2 cores)."""
    from lstm_onnx.model.config import ModelConfig, RunConfig, TrainConfig
    from lstm_onnx.model.train import train_run

    model = dict(cell="lstm", input_size=1, hidden_size=8, num_layers=2, num_outputs=4)
    model.update(model_overrides)
    config = RunConfig(model=ModelConfig(**model), training=TrainConfig(epochs=1, dry_run=True, seed=0), seed=0)
    train_run(config, out, data_path=None, progress=False)
    return out


@pytest.fixture(scope="session")
def make_run_dir(tmp_path_factory):
    """Factory: make_run_dir(cell="gru", num_layers=3, bidirectional=True, ...) -> a trained run directory."""
    cache: dict[tuple, Path] = {}

    def make(**overrides) -> Path:
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            name = "run-" + "-".join(f"{k}{v}" for k, v in key) if key else "run-default"
            cache[key] = _train_tiny(tmp_path_factory.mktemp(name), **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_run_dir(make_run_dir) -> Path:
    """Two-layer, hidden-8 LSTM trained for a few steps."""
    return make_run_dir()


@pytest.fixture(scope="session")
def tiny_gru_run_dir(make_run_dir) -> Path:
    return make_run_dir(cell="gru")


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory, tiny_run_dir, tiny_gru_run_dir) -> Path:
    """A Triton-layout model repository with `tiny_lstm` and `tiny_gru` (version 1 each)."""
    from lstm_onnx.export.repository import export_to_repository

    repo = tmp_path_factory.mktemp("repository")
    export_to_repository(tiny_run_dir, repo, name="tiny_lstm", version=1)
    export_to_repository(tiny_gru_run_dir, repo, name="tiny_gru", version=1)
    return repo


@pytest.fixture(scope="module")
def triton(server):
    """tritonclient's gRPC client on the test module's own `server` fixture (the real server on port 0)."""
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(server.url)
    yield client
    client.close()


@pytest.fixture
def redis_server():
    """A fresh redis-server on a free loopback port, stopped after the test (skips without the binary, not in CI)."""
    from redis_server import RedisServer, require_redis_server

    server = RedisServer(require_redis_server()).start()
    yield server
    server.stop()
