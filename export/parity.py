"""Numerical parity between PyTorch eager and onnxruntime, over batch sizes, lengths, inputs, state and chunking."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("lstm_onnx.parity")

DEFAULT_ATOL = 1e-5
# An element passes when its absolute error is within atol OR its relative error within rtol (Polygraphy's
# rule). The cell state of a trained LSTM grows with the sequence (|c| ~ 10 after 64 steps), where two
# correct FP32 implementations differ by ~2e-5 absolute (~1e-6 relative): rtol keeps that from failing
# while atol still guards the values near zero. --rtol 0 gives a purely absolute check.
DEFAULT_RTOL = 1e-5
# A trained network can amplify rounding: on 64 steps of noise input, PyTorch's own FP32 result was
# measured 6e-5 away from the same network in FP64, and onnxruntime (other summation order, MLAS's
# sigmoid/tanh) 3.5e-4 away from PyTorch. No fixed atol separates that from a bug on every model. So a
# case also passes when onnxruntime's error stays within FLOOR_FACTOR times FP32's own error on that
# case (the "floor"). A wrong gate order or weight gives errors of order 1, far above any such bound;
# --floor-factor 0 turns the rule off.
DEFAULT_FLOOR_FACTOR = 10.0
BATCHES = (1, 3, 16)
LENGTHS = (1, 7, 64)
INPUT_KINDS = ("random", "zero", "large")
LARGE_SCALE = 100.0  # saturates every gate: catches a sigmoid/tanh mismatch that small inputs hide
CHUNK = 7

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ParityError(Exception):
    """The comparison could not be run (unknown provider, unloadable model)."""


@dataclass
class OutputError:
    max_abs: float
    max_rel: float
    atol_needed: float = 0.0  # smallest atol that passes every element, with the run's rtol

    def to_dict(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "atol_needed": self.atol_needed}


@dataclass
class Case:
    provider: str
    name: str
    batch: int
    time: int
    outputs: dict[str, OutputError] = field(default_factory=dict)
    # How far PyTorch's own FP32 result is from the same network in FP64: the accuracy FP32 itself has
    # on this case, against which a parity tolerance can be judged.
    fp32_floor: dict[str, float] = field(default_factory=dict)
    passed: bool = True
    by_floor: bool = False  # passed only through the FP32-floor rule

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider, "case": self.name, "batch": self.batch, "time": self.time,
            "passed": self.passed, "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "fp32_floor": self.fp32_floor, "passed_by_floor": self.by_floor,
        }


def compare_outputs(expected: np.ndarray, got: np.ndarray, rtol: float = DEFAULT_RTOL) -> OutputError:
    """Max absolute and relative error (relative to max(|expected|, 1e-6) elementwise), and the atol that
    would pass every element given rtol. NaN anywhere it does not belong counts as an infinite error."""
    if expected.shape != got.shape:
        raise ParityError(f"output shape: got {list(got.shape)}, expected {list(expected.shape)}")
    if expected.size == 0:
        return OutputError(0.0, 0.0, 0.0)
    e, g = expected.astype(np.float64), got.astype(np.float64)
    diff = np.abs(e - g)
    diff[np.isnan(e) != np.isnan(g)] = np.inf
    diff[np.isnan(e) & np.isnan(g)] = 0.0
    rel = diff / np.maximum(np.abs(e), 1e-6)
    beyond_rtol = diff[~(diff <= rtol * np.abs(e))]
    return OutputError(float(diff.max()), float(np.nanmax(rel)), float(beyond_rtol.max()) if beyond_rtol.size else 0.0)


def resolve_providers(choice: str) -> list[str]:
    """Map cpu|cuda|all to the onnxruntime providers to compare; cuda must really be present."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if choice == "all":
        return [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider") if p in available]
    if choice not in PROVIDERS:
        raise ParityError(f"provider: got {choice!r}, expected cpu, cuda or all")
    provider = PROVIDERS[choice]
    if provider not in available:
        raise ParityError(f"provider {choice}: {provider} is not available in this onnxruntime (available: {', '.join(available)})")
    return [provider]


def open_session(model_path: str | Path | bytes, provider: str, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model_path if isinstance(model_path, bytes) else str(model_path)
    # TF32 would make CUDA's FP32 matrix products round to 10-bit mantissas (errors near 1e-2 on an
    # LSTM): parity is about FP32, so ask for true FP32.
    entry = (provider, {"use_tf32": "0"}) if provider == "CUDAExecutionProvider" else provider
    session = ort.InferenceSession(source, sess_options=options, providers=[entry])
    if session.get_providers()[0] != provider:
        raise ParityError(f"onnxruntime fell back to {session.get_providers()[0]} when asked for {provider}")
    return session


def _make_input(kind: str, batch: int, time: int, features: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "zero":
        return np.zeros((batch, time, features), np.float32)
    x = rng.standard_normal((batch, time, features)).astype(np.float32)
    return x * LARGE_SCALE if kind == "large" else x


def _torch_run(net: Any, x: np.ndarray, state: list[np.ndarray] | None, dtype: Any = None) -> list[np.ndarray]:
    import torch

    dtype = dtype or torch.float32
    with torch.no_grad():
        args = [torch.from_numpy(x)] + ([torch.from_numpy(s) for s in state] if state is not None else [])
        return [t.numpy() for t in net(*[a.to(dtype) for a in args])]


def _floor(net64: Any, x: np.ndarray, state: list[np.ndarray] | None, expected: list[np.ndarray], names: list[str]) -> dict[str, float]:
    import torch

    exact = _torch_run(net64, x, state, torch.float64)
    return {n: float(np.abs(e.astype(np.float64) - r).max()) if e.size else 0.0 for n, e, r in zip(names, expected, exact)}


def _ort_run(session: Any, names: list[str], x: np.ndarray, state: list[np.ndarray]) -> list[np.ndarray]:
    feed = dict(zip(names, [x, *state]))
    return session.run(None, feed)


def run_parity(net: Any, model_path: str | Path | bytes, providers: list[str], atol: float = DEFAULT_ATOL,
               rtol: float = DEFAULT_RTOL, seed: int = 0, floor_factor: float = DEFAULT_FLOOR_FACTOR,
               atol_by_kind: dict[str, float] | None = None) -> dict[str, Any]:
    """Run the whole comparison matrix; returns a JSON-ready report with per-output errors.

    An element passes when |error| <= atol or |error| <= rtol * |expected|; a case also passes when each
    output's error is within floor_factor x (PyTorch FP32 vs FP64 on that case). The tolerance that would
    have passed is the smallest atol that passes every case with the same rtol and no floor rule.
    `atol_by_kind` ({"large": ...}) replaces atol for the cases of one input kind (an int8 budget).
    """
    import copy

    cfg = net.config
    net.eval()
    net64 = copy.deepcopy(net).double()
    in_names = ["input", "h0", "c0"][: 1 + len(net.state_names)]
    out_names = ["output", "hn", "cn"][: 1 + len(net.state_names)]
    state_shape = (cfg.num_layers * cfg.num_directions, cfg.hidden_size)
    cases: list[Case] = []
    for provider in providers:
        session = open_session(model_path, provider)
        rng = np.random.default_rng(seed)
        for batch, time, kind, given in itertools.product(BATCHES, LENGTHS, INPUT_KINDS, (True, False)):
            x = _make_input(kind, batch, time, cfg.input_size, rng)
            if given:
                state = [rng.standard_normal((batch, *state_shape)).astype(np.float32) * 0.5 for _ in net.state_names]
                expected = _torch_run(net, x, state)
                floor = _floor(net64, x, state, expected, out_names)
            else:
                # Omitted state: PyTorch builds zeros itself; onnxruntime gets the zeros a server supplies.
                state = [np.zeros((batch, *state_shape), np.float32) for _ in net.state_names]
                expected = _torch_run(net, x, None)
                floor = _floor(net64, x, None, expected, out_names)
            got = _ort_run(session, in_names, x, state)
            case = Case(provider, f"{kind}-{'state' if given else 'nostate'}", batch, time, fp32_floor=floor)
            for name, e, g in zip(out_names, expected, got):
                case.outputs[name] = compare_outputs(e, g, rtol)
            cases.append(case)
        # A sequence fed in chunks, carrying hn/cn back as h0/c0, against the same sequence whole.
        for batch in (1, 3):
            time = max(LENGTHS)
            x = _make_input("random", batch, time, cfg.input_size, rng)
            expected = _torch_run(net, x, None)
            floor = _floor(net64, x, None, expected, out_names)
            state = [np.zeros((batch, *state_shape), np.float32) for _ in net.state_names]
            if cfg.bidirectional:
                # The reverse direction reads the sequence from its end: chunking changes the maths, so
                # a bidirectional model is compared whole only (the server refuses chunked sequences for it).
                continue
            for start in range(0, time, CHUNK):
                got = _ort_run(session, in_names, x[:, start : start + CHUNK], state)
                state = got[1:]
            case = Case(provider, f"chunked-{CHUNK}", batch, time, fp32_floor=floor)
            for name, e, g in zip(out_names, expected, got):
                case.outputs[name] = compare_outputs(e, g, rtol)
            cases.append(case)
    worst: dict[str, float] = {}
    needed: dict[str, float] = {}
    floors: dict[str, float] = {}
    for case in cases:
        for name, value in case.fp32_floor.items():
            floors[name] = max(floors.get(name, 0.0), value)
        case_atol = (atol_by_kind or {}).get(case.name.split("-")[0], atol)
        case.passed = all(err.atol_needed <= max(case_atol, floor_factor * case.fp32_floor.get(name, 0.0))
                          for name, err in case.outputs.items())
        case.by_floor = case.passed and not all(err.atol_needed <= case_atol for err in case.outputs.values())
        for name, err in case.outputs.items():
            worst[name] = max(worst.get(name, 0.0), err.max_abs)
            needed[name] = max(needed.get(name, 0.0), err.atol_needed)
    failed = [c for c in cases if not c.passed]
    return {
        "passed": not failed,
        "atol": atol,
        "rtol": rtol,
        **({"atol_by_kind": atol_by_kind} if atol_by_kind else {}),
        "providers": providers,
        "cases_run": len(cases),
        "cases_failed": len(failed),
        "worst_abs_error": worst,
        "atol_needed": needed,
        "fp32_floor": floors,
        "floor_factor": floor_factor,
        "cases_passed_by_floor": sum(c.by_floor for c in cases),
        "tolerance_that_would_pass": max(needed.values()) if needed else 0.0,
        "failures": [c.to_dict() for c in failed[:20]],
        "cases": [c.to_dict() for c in cases],
    }


def make_sample(net: Any, batch: int = 2, time: int = 5, seed: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A small input/output pair recorded in the model so a server can self-test at load."""
    cfg = net.config
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, time, cfg.input_size)).astype(np.float32)
    state_shape = (batch, cfg.num_layers * cfg.num_directions, cfg.hidden_size)
    state = [rng.standard_normal(state_shape).astype(np.float32) * 0.5 for _ in net.state_names]
    outputs = _torch_run(net, x, state)
    in_names = ["input", "h0", "c0"][: 1 + len(state)]
    out_names = ["output", "hn", "cn"][: 1 + len(state)]
    return dict(zip(in_names, [x, *state])), dict(zip(out_names, outputs))
