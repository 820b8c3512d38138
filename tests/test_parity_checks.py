"""export/parity.py on its own: small untrained networks exported in the test (no training run, no CLI), the error
measures on hand-made arrays, and the report's verdicts when the ONNX model is moved away from the network."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lstm_onnx.export import parity
from lstm_onnx.export.onnx_export import trace_to_onnx
from lstm_onnx.export.parity import (
    BATCHES,
    CHUNK,
    INPUT_KINDS,
    LENGTHS,
    ParityError,
    compare_outputs,
    make_sample,
    open_session,
    resolve_providers,
    run_parity,
)
from lstm_onnx.model.config import ModelConfig
from lstm_onnx.model.network import StackedRNN

CPU = ["CPUExecutionProvider"]
torch.set_num_threads(1)  # tiny networks: threads only contend (on a 2-core machine, with ORT beside)


def _net(**config) -> StackedRNN:
    torch.manual_seed(0)
    net = StackedRNN(ModelConfig(**{"input_size": 2, "hidden_size": 8, "num_layers": 2, "num_outputs": 3,
                                    **config}))
    return net.eval()


@pytest.fixture(scope="module")
def lstm():
    net = _net()
    return net, trace_to_onnx(net).SerializeToString()


def _moved(model: bytes, delta: float) -> bytes:
    """The model with head.bias[0] moved by `delta`: output moves by exactly that, the states not at all."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model_from_string(model)
    for init in proto.graph.initializer:
        if init.name == "head.bias":
            values = numpy_helper.to_array(init).copy()
            values[0] += delta
            init.CopyFrom(numpy_helper.from_array(values, init.name))
            return proto.SerializeToString()
    raise AssertionError("no head.bias initializer")


# compare_outputs


def test_compare_outputs_measures_absolute_relative_and_needed_atol():
    e = np.array([1.0, -2.0, 0.0, 100.0], np.float32)
    g = np.array([1.5, -2.0, 1e-7, 100.001], np.float32)
    err = compare_outputs(e, g, rtol=1e-4)
    assert err.max_abs == pytest.approx(0.5)
    # relative: 0.5 / 1; 1e-7 / max(0, 1e-6) = 0.1; 0.001 / 100
    assert err.max_rel == pytest.approx(0.5)
    # within rtol * |e| = 0.01 at 100 (0.001 passes); 1e-7 at 0 needs atol; 0.5 at 1 needs atol
    assert err.atol_needed == pytest.approx(0.5)
    err = compare_outputs(e[1:], g[1:], rtol=1e-4)
    assert err.atol_needed == pytest.approx(1e-7, rel=1e-3)
    assert err.max_rel == pytest.approx(0.1, rel=1e-3)
    assert compare_outputs(e[3:], g[3:], rtol=1e-4).atol_needed == 0.0
    assert compare_outputs(e[3:], g[3:], rtol=0).atol_needed == pytest.approx(0.001, rel=1e-2)
    # An element exactly at rtol * |e| passes by rtol.
    assert compare_outputs(np.array([4.0]), np.array([5.0]), rtol=0.25).atol_needed == 0.0
    assert compare_outputs(np.array([4.0]), np.array([5.0]), rtol=0.24).atol_needed == 1.0
    assert compare_outputs(e[3:], g[3:], rtol=0).to_dict() == {"max_abs": pytest.approx(0.001, rel=1e-2),
                                                                "max_rel": pytest.approx(1e-5, rel=1e-2),
                                                                "atol_needed": pytest.approx(0.001, rel=1e-2)}


def test_compare_outputs_default_rtol_is_1e_5():
    assert compare_outputs(np.array([1.0]), np.array([1.0 + 0.5e-5])).atol_needed == 0.0
    assert compare_outputs(np.array([1.0]), np.array([1.0 + 2e-5])).atol_needed == pytest.approx(2e-5)


def test_compare_outputs_treats_a_lone_nan_as_infinite_and_shared_nans_as_equal():
    err = compare_outputs(np.array([1.0, np.nan]), np.array([1.0, np.nan]))
    assert (err.max_abs, err.max_rel, err.atol_needed) == (0.0, 0.0, 0.0)
    for e, g in (([1.0, 2.0], [1.0, np.nan]), ([1.0, np.nan], [1.0, 2.0])):
        err = compare_outputs(np.array(e), np.array(g))
        assert err.max_abs == np.inf and err.atol_needed == np.inf


def test_compare_outputs_refuses_other_shapes_and_passes_empty_arrays():
    with pytest.raises(ParityError, match=r"^output shape: got \[2, 1\], expected \[2\]$"):
        compare_outputs(np.zeros(2), np.zeros((2, 1)))
    err = compare_outputs(np.zeros((0, 3)), np.zeros((0, 3)))
    assert (err.max_abs, err.max_rel, err.atol_needed) == (0.0, 0.0, 0.0)


# providers and sessions


def test_resolve_providers_maps_names_and_refuses_what_is_missing():
    import onnxruntime as ort

    available = ort.get_available_providers()
    assert resolve_providers("cpu") == CPU
    assert resolve_providers("all") == [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider")
                                        if p in available]
    with pytest.raises(ParityError, match=r"^provider: got 'tpu', expected cpu, cuda or all$"):
        resolve_providers("tpu")
    if "CUDAExecutionProvider" in available:
        assert resolve_providers("cuda") == ["CUDAExecutionProvider"]
    else:
        with pytest.raises(ParityError) as info:
            resolve_providers("cuda")
        assert str(info.value) == ("provider cuda: CUDAExecutionProvider is not available in this onnxruntime "
                                   f"(available: {', '.join(available)})")


def test_resolve_providers_with_cuda_present(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert resolve_providers("all") == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert resolve_providers("cuda") == ["CUDAExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert resolve_providers("all") == CPU


def test_open_session_asks_cuda_for_true_fp32_and_refuses_a_fallback(monkeypatch, lstm):
    # No CUDA onnxruntime here: a stand-in session records what was asked for, and answers with the provider
    # onnxruntime would have chosen.
    import onnxruntime as ort

    asked = []

    class Session:
        def __init__(self, source, sess_options=None, providers=None):
            asked.append((source, providers))
            self.chosen = chosen

        def get_providers(self):
            return self.chosen

    monkeypatch.setattr(ort, "InferenceSession", Session)
    _, model = lstm
    chosen = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert open_session(model, "CUDAExecutionProvider").chosen == chosen
    chosen = ["CPUExecutionProvider"]
    open_session("m.onnx", "CPUExecutionProvider")
    assert asked == [(model, [("CUDAExecutionProvider", {"use_tf32": "0"})]), ("m.onnx", ["CPUExecutionProvider"])]
    with pytest.raises(ParityError) as info:
        open_session(model, "CUDAExecutionProvider")
    assert str(info.value) == "onnxruntime fell back to CPUExecutionProvider when asked for CUDAExecutionProvider"


def test_open_session_takes_a_path_or_bytes_on_one_thread(lstm, tmp_path):
    _, model = lstm
    path = tmp_path / "m.onnx"
    path.write_bytes(model)
    for source in (model, path, str(path)):
        session = open_session(source, "CPUExecutionProvider")
        assert session.get_providers()[0] == "CPUExecutionProvider"
        assert [i.name for i in session.get_inputs()] == ["input", "h0", "c0"]
    options = open_session(model, "CPUExecutionProvider", threads=3).get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level) == (3, 1, 3)
    assert open_session(model, "CPUExecutionProvider").get_session_options().intra_op_num_threads == 1


# run_parity


@pytest.fixture
def small(monkeypatch):
    """A smaller matrix (batches 1 and 4, lengths 1, 3 and 9: 36 cases and 2 chunked) where the test is about the
    verdicts, not the matrix: a run takes a tenth of the time."""
    monkeypatch.setattr(parity, "BATCHES", (1, 4))
    monkeypatch.setattr(parity, "LENGTHS", (1, 3, 9))


def _cases(report):
    return {(c["case"], c["batch"], c["time"]): c for c in report["cases"]}


def test_a_faithful_lstm_passes_every_case_of_the_matrix(lstm):
    net, model = lstm
    report = run_parity(net, model, CPU)
    expected = {(f"{k}-{s}", b, t) for b in BATCHES for t in LENGTHS for k in INPUT_KINDS for s in ("state", "nostate")}
    expected |= {(f"chunked-{CHUNK}", b, max(LENGTHS)) for b in (1, 3)}
    assert set(_cases(report)) == expected and report["cases_run"] == 56 == len(report["cases"])
    assert report["passed"] is True and report["cases_failed"] == 0 and report["failures"] == []
    assert (report["atol"], report["rtol"], report["floor_factor"]) == (1e-5, 1e-5, 10.0)
    assert "atol_by_kind" not in report
    assert report["providers"] == CPU
    assert report["cases_passed_by_floor"] == 0
    for case in report["cases"]:
        assert case["provider"] == "CPUExecutionProvider" and case["passed"] and not case["passed_by_floor"]
        assert set(case["outputs"]) == {"output", "hn", "cn"} == set(case["fp32_floor"])
        assert set(case["outputs"]["output"]) == {"max_abs", "max_rel", "atol_needed"}
    for summary in ("worst_abs_error", "atol_needed", "fp32_floor"):
        assert set(report[summary]) == {"output", "hn", "cn"}
    for name in ("output", "hn", "cn"):
        assert report["worst_abs_error"][name] == max(c["outputs"][name]["max_abs"] for c in report["cases"])
        assert report["atol_needed"][name] == max(c["outputs"][name]["atol_needed"] for c in report["cases"])
        assert report["fp32_floor"][name] == max(c["fp32_floor"][name] for c in report["cases"])
        assert 0 < report["fp32_floor"][name] < 1e-5 and report["worst_abs_error"][name] < 1e-4
    assert report["tolerance_that_would_pass"] == max(report["atol_needed"].values()) > 0
    # That tolerance passes every case exactly at the edge, without the floor rule, and none by the floor.
    edge = report["tolerance_that_would_pass"]
    assert run_parity(net, model, CPU, atol=edge, floor_factor=0.0)["passed"] is True
    assert run_parity(net, model, CPU, atol=edge, floor_factor=1e6)["cases_passed_by_floor"] == 0
    assert run_parity(net, model, CPU, atol=edge * 0.999, floor_factor=0.0)["passed"] is False
    # No provider: nothing run, nothing failed, nothing needed.
    empty = run_parity(net, model, [])
    assert (empty["passed"], empty["cases_run"], empty["tolerance_that_would_pass"]) == (True, 0, 0.0)
    # Zero input with zero state: every output is the same in FP32 and FP64 only by chance; the floor is
    # measured, not assumed. Large inputs saturate the gates: hn is then near +-1.
    large = _cases(report)[("large-nostate", 16, 64)]
    assert large["fp32_floor"]["hn"] < 1e-5


def test_the_report_is_seeded(lstm, small):
    net, model = lstm
    report = run_parity(net, model, CPU)
    assert run_parity(net, model, CPU, seed=0) == report
    assert run_parity(net, model, CPU, seed=5)["worst_abs_error"] != report["worst_abs_error"]


def test_the_inputs_run_are_the_kinds_named(lstm, small, monkeypatch):
    net, model = lstm
    feeds = []
    real = parity._ort_run

    def recording(session, names, x, state):
        feeds.append((x.copy(), [s.copy() for s in state], names))
        return real(session, names, x, state)

    monkeypatch.setattr(parity, "_ort_run", recording)
    run_parity(net, model, CPU)
    assert all(names == ["input", "h0", "c0"] for _, _, names in feeds)
    order = [(b, t, k, g) for b in (1, 4) for t in (1, 3, 9) for k in INPUT_KINDS for g in (True, False)]
    matrix, chunks = feeds[:36], feeds[36:]
    for (batch, time, kind, given), (x, state, _) in zip(order, matrix):
        assert x.shape == (batch, time, 2) and x.dtype == np.float32
        assert [s.shape for s in state] == [(batch, 2, 8)] * 2
        if kind == "zero":
            assert not x.any()
        if not given:
            assert not any(s.any() for s in state)
    big = [(x, state) for (x, state, _), (b, t, k, g) in zip(matrix, order) if b == 4 and t == 9 and g]
    (random_x, random_state), (_, _), (large_x, _) = big
    assert 0.7 < random_x.std() < 1.3 and 70 < large_x.std() < 130
    assert 0.35 < random_state[0].std() < 0.65 and 0.35 < random_state[1].std() < 0.65
    # The chunked cases: 9 steps in chunks of 7 (one of 7, one of 2), batch 1 then 3, from zero state.
    assert [x.shape for x, _, _ in chunks] == [(1, 7, 2), (1, 2, 2), (3, 7, 2), (3, 2, 2)]
    assert not any(s.any() for s in chunks[0][1]) and not any(s.any() for s in chunks[2][1])
    assert all(s.any() for s in chunks[1][1])  # the state carried from the first chunk


def test_a_head_bias_moved_by_1e_4_fails_the_output_of_every_case(lstm, small):
    net, model = lstm
    report = run_parity(net, _moved(model, 1e-4), CPU)
    assert report["passed"] is False and report["cases_failed"] == 38 == report["cases_run"]
    assert len(report["failures"]) == 20 and report["failures"] == report["cases"][:20]
    assert report["atol_needed"]["output"] == pytest.approx(1e-4, rel=0.05)
    assert report["atol_needed"]["hn"] < 1e-5
    assert report["tolerance_that_would_pass"] == report["atol_needed"]["output"]
    # A wider atol lets it through; per kind, only that kind's cases.
    assert run_parity(net, _moved(model, 1e-4), CPU, atol=2e-4)["passed"] is True
    by_kind = run_parity(net, _moved(model, 1e-4), CPU, atol_by_kind={"random": 2e-4, "chunked": 2e-4})
    assert by_kind["atol_by_kind"] == {"random": 2e-4, "chunked": 2e-4}
    assert by_kind["cases_failed"] == 24
    assert {c["case"].split("-")[0] for c in by_kind["failures"]} == {"zero", "large"}
    assert not any(c["passed"] for c in by_kind["cases"] if c["case"].split("-")[0] in ("zero", "large"))
    assert all(c["passed"] for c in by_kind["cases"] if c["case"].split("-")[0] in ("random", "chunked"))


def test_a_case_within_floor_factor_times_the_fp32_error_passes_by_floor(lstm, small):
    net, model = lstm
    # atol 0 and rtol 0: only the floor rule can pass a case. Moved by 1e-7 the output's error is of the order of
    # FP32's own (the floor); a factor of 1e6 passes all, 0 passes none.
    moved = _moved(model, 1e-7)
    wide = run_parity(net, moved, CPU, atol=0.0, rtol=0.0, floor_factor=1e6)
    assert wide["passed"] is True and wide["cases_passed_by_floor"] == 38
    assert all(c["passed_by_floor"] for c in wide["cases"])
    none = run_parity(net, moved, CPU, atol=0.0, rtol=0.0, floor_factor=0.0)
    assert none["cases_failed"] == 38 and none["cases_passed_by_floor"] == 0
    # The rule compares each output with its own floor: a 1e-4 move is far above 1e6 x nothing only when
    # the floor is tiny; at a factor of 1e6 a floor near 1e-8 already passes it.
    far = run_parity(net, _moved(model, 1.0), CPU, atol=0.0, rtol=0.0, floor_factor=10.0)
    assert far["cases_failed"] == 38 and far["cases_passed_by_floor"] == 0
    # A case passing by atol is not "by floor" even when the floor rule would pass it too.
    both = run_parity(net, model, CPU, atol=1.0, floor_factor=1e6)
    assert both["cases_passed_by_floor"] == 0 and both["passed"] is True


def test_a_gru_is_compared_on_its_one_state(tmp_path, small):
    net = _net(cell="gru", num_layers=1)
    path = tmp_path / "gru.onnx"
    path.write_bytes(trace_to_onnx(net).SerializeToString())
    report = run_parity(net, path, CPU)
    assert report["passed"] is True and report["cases_run"] == 38
    assert set(report["atol_needed"]) == {"output", "hn"}


def test_a_bidirectional_model_is_compared_whole_only(small):
    net = _net(bidirectional=True, num_layers=1)
    report = run_parity(net, trace_to_onnx(net).SerializeToString(), CPU)
    assert report["passed"] is True and report["cases_run"] == 36
    assert not any(c["case"].startswith("chunked") for c in report["cases"])


# make_sample


def test_make_sample_records_the_networks_answer_on_seeded_inputs(lstm):
    net, _ = lstm
    inputs, outputs = make_sample(net)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 2)).astype(np.float32)
    h0 = rng.standard_normal((2, 2, 8)).astype(np.float32) * 0.5
    c0 = rng.standard_normal((2, 2, 8)).astype(np.float32) * 0.5
    assert list(inputs) == ["input", "h0", "c0"] and list(outputs) == ["output", "hn", "cn"]
    for got, want in zip(inputs.values(), (x, h0, c0)):
        np.testing.assert_array_equal(got, want)
    with torch.no_grad():
        want = net(torch.from_numpy(x), torch.from_numpy(h0), torch.from_numpy(c0))
    for got, w in zip(outputs.values(), want):
        np.testing.assert_array_equal(got, w.numpy())
    other, _ = make_sample(net, batch=3, time=4, seed=2)
    assert other["input"].shape == (3, 4, 2) and other["h0"].shape == (3, 2, 8)
    np.testing.assert_array_equal(other["input"], np.random.default_rng(2).standard_normal((3, 4, 2)).astype(np.float32))
    gru_inputs, gru_outputs = make_sample(_net(cell="gru", num_layers=1))
    assert list(gru_inputs) == ["input", "h0"] and list(gru_outputs) == ["output", "hn"]
