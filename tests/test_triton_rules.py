"""Every config.pbtxt export can write passes Triton's load rules (tests/triton_rules.py); broken ones do not."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from triton_rules import load_errors, parse_config, serving_errors

from lstm_onnx.contract import read_contract
from lstm_onnx.export.onnx_export import ExportError
from lstm_onnx.export.repository import BatchingOptions, check_state_pairing, export_to_repository

DATA = Path(__file__).resolve().parent / "data"
# Every model export can build (the network always has its linear head: there is no headless variant).
MODELS = [dict(cell=cell, num_layers=layers, bidirectional=bi)
          for cell in ("lstm", "gru") for layers in (1, 2, 3) for bi in (False, True)]
STYLES = [None, "implicit-state", "stateless"]


def _id(model: dict) -> str:
    return f"{'bi' if model['bidirectional'] else ''}{model['cell']}{model['num_layers']}"


def _export(make_run_dir, folder: Path, model: dict, style: str | None, **batching) -> tuple[str, onnx.ModelProto]:
    export_to_repository(make_run_dir(**model), folder, name="m", config_style=style,
                         batching=BatchingOptions(**batching) if batching else None)
    return (folder / "m" / "config.pbtxt").read_text(), onnx.load(folder / "m" / "1" / "model.onnx")


@pytest.mark.parametrize("style", STYLES, ids=lambda s: s or "default")
@pytest.mark.parametrize("model", MODELS, ids=_id)
def test_every_exported_config_loads_in_triton_and_feeds_state_back(make_run_dir, tmp_path, model, style):
    if style == "implicit-state" and model["bidirectional"]:
        with pytest.raises(ExportError, match="bidirectional.*expected --config-style stateless"):
            _export(make_run_dir, tmp_path, model, style)
        return
    text, graph = _export(make_run_dir, tmp_path, model, style)
    assert load_errors(text, graph) == []
    assert serving_errors(text, graph) == []
    config = parse_config(text)
    contract, _ = read_contract(graph)
    pairs = [(s["input"], s["output"]) for s in contract["state"]]
    assert [o.name for o in config.output] == ["output"] + [o for _, o in pairs]  # clients can still read hn/cn
    implicit = style == "implicit-state" or (style is None and not model["bidirectional"])
    if implicit:
        assert config.WhichOneof("scheduling_choice") == "sequence_batching"
        assert [(s.input_name, s.output_name) for s in config.sequence_batching.state] == pairs
        assert [i.name for i in config.input] == ["input"]
    else:
        assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
        assert [(i.name, i.optional) for i in config.input] == [("input", False)] + [(i, False) for i, _ in pairs]


def test_export_flags_reach_the_sequence_batcher(make_run_dir, tmp_path):
    text, graph = _export(make_run_dir, tmp_path, dict(), None, max_batch_size=16, max_queue_delay_us=250,
                          preferred_batch_size=(4, 8), max_candidate_sequences=32, max_sequence_idle_us=2_500_000)
    assert load_errors(text, graph) == []
    seq = parse_config(text).sequence_batching
    assert parse_config(text).max_batch_size == 16
    assert seq.max_sequence_idle_microseconds == 2_500_000
    assert (seq.oldest.max_candidate_sequences, list(seq.oldest.preferred_batch_size),
            seq.oldest.max_queue_delay_microseconds) == (32, [4, 8], 250)
    for state in seq.state:
        initial = state.initial_state[0]
        assert initial.zero_data and initial.name and list(initial.dims) == list(state.dims) == [2, 8]


def test_export_cli_writes_the_chosen_style(tiny_gru_run_dir, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "lstm_onnx", "export", str(tiny_gru_run_dir), "--repository",
                             str(tmp_path), "--name", "g", "--config-style", "stateless", "--max-batch-size", "8",
                             "--preferred-batch-size", "2", "4"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "config.pbtxt: stateless" in result.stdout
    config = parse_config((tmp_path / "g" / "config.pbtxt").read_text())
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4] and config.max_batch_size == 8
    result = subprocess.run([sys.executable, "-m", "lstm_onnx", "export", str(tiny_gru_run_dir), "--repository",
                             str(tmp_path), "--name", "h", "--preferred-batch-size", "65"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "preferred_batch_size: got 65, expected 1..64" in result.stderr


def test_config_written_before_issue_10_fails_the_rules(tiny_run_dir, tmp_path):
    # tests/data/config_before_issue10.pbtxt is what export wrote for this model at commit 18541b4.
    export_to_repository(tiny_run_dir, tmp_path, name="m")
    graph = onnx.load(tmp_path / "m" / "1" / "model.onnx")
    old = (DATA / "config_before_issue10.pbtxt").read_text()
    assert load_errors(old, graph) == ["configuration expects 1 inputs, model provides 3"]
    # With the count made to match, the next rule of onnxruntime.cc ModelInstanceState::ValidateInputs fires.
    counted = old.replace("dynamic_batching", 'batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "n" '
                          'data_type: TYPE_FP32 source_input: "input" }, { kind: BATCH_ELEMENT_COUNT target_name: '
                          '"m" data_type: TYPE_FP32 source_input: "input" } ]\ndynamic_batching')
    errors = load_errors(counted, graph)
    assert errors[0] == "optional input 'h0' is not supported for models that support batching", errors


# (what to break in the exported implicit-state LSTM config, the error Triton would give)
BROKEN = [
    ("state also under input",
     ('{ name: "input" data_type: TYPE_FP32 dims: [ -1, 1 ] }',
      '{ name: "input" data_type: TYPE_FP32 dims: [ -1, 1 ] }, { name: "h0" data_type: TYPE_FP32 dims: [ 2, 8 ] }'),
     "configuration expects 4 inputs, model provides 3"),
    ("initial_state without name", (' name: "h0_zero"', ""), "Field 'name' must be set"),
    ("initial_state with -1", ("dims: [ 2, 8 ] zero_data: true name: \"h0_zero\"",
                               "dims: [ -1, 8 ] zero_data: true name: \"h0_zero\""), "contains variable dimensions"),
    ("initial_state of other rank", ("dims: [ 2, 8 ] zero_data: true name: \"c0_zero\"",
                                     "dims: [ 16 ] zero_data: true name: \"c0_zero\""), "Number of dimensions"),
    ("initial_state of other datatype",
     ("initial_state { data_type: TYPE_FP32", "initial_state { data_type: TYPE_FP16"),
     "does not match the state data type"),
    ("initial_state without data", (" zero_data: true name: \"h0_zero\"", " name: \"h0_zero\""),
     "to have state_data set"),
    ("dynamic and sequence batching", ("sequence_batching {", "dynamic_batching { }\nsequence_batching {"),
     "does not parse"),
    ("reshape on a state", ('output_name: "hn"', 'output_name: "hn" reshape { shape: [ 16 ] }'), "does not parse"),
    ("output dims", ('{ name: "hn" data_type: TYPE_FP32 dims: [ 2, 8 ] }',
                     '{ name: "hn" data_type: TYPE_FP32 dims: [ 2, 9 ] }'), "tensor 'hn': the model expects 3"),
    ("input datatype", ('name: "input" data_type: TYPE_FP32', 'name: "input" data_type: TYPE_FP16'),
     "configuration expects datatype TYPE_FP16 for input 'input'"),
    ("control without graph input", ("  state [", '  control_input [ { name: "START" control [ { kind: '
                                     'CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] } ]\n  state ['),
     "configuration specified sequence control 'START', but model does not provide that input"),
    ("preferred above max", ("preferred_batch_size: [ 64 ]", "preferred_batch_size: [ 65 ]"),
     "sequence batching preferred batch size must be <= max batch size (got 65 > 64)"),
]
# (what to break, the wrong serving Triton would not notice at load)
MISFED = [
    ("pairs against sort order", ('input_name: "h0" output_name: "hn"', 'input_name: "h0" output_name: "cn"'),
     "state output 'cn' is fed back into 'c0'"),
    ("state name not in graph", ('input_name: "c0"', 'input_name: "c_0"'), "state input 'c_0': not a graph input"),
    ("state dims", ('output_name: "hn" data_type: TYPE_FP32 dims: [ 2, 8 ]\n      initial_state { data_type: '
                    'TYPE_FP32 dims: [ 2, 8 ]', 'output_name: "hn" data_type: TYPE_FP32 dims: [ 2, 9 ]\n      '
                    'initial_state { data_type: TYPE_FP32 dims: [ 2, 9 ]'), "state input tensor 'h0'"),
]


@pytest.fixture(scope="module")
def exported(tiny_run_dir, tmp_path_factory) -> tuple[str, onnx.ModelProto]:
    folder = tmp_path_factory.mktemp("rules")
    export_to_repository(tiny_run_dir, folder, name="m")
    return (folder / "m" / "config.pbtxt").read_text(), onnx.load(folder / "m" / "1" / "model.onnx")


@pytest.mark.parametrize("change, expected", [(c, e) for _, c, e in BROKEN], ids=[b[0] for b in BROKEN])
def test_rules_refuse_a_broken_config(exported, change, expected):
    text, graph = exported
    assert change[0] in text, f"the exported config no longer contains {change[0]!r}: update this case"
    errors = load_errors(text.replace(change[0], change[1], 1), graph)
    assert any(expected in e for e in errors), f"expected an error with {expected!r}, got {errors}"


@pytest.mark.parametrize("change, expected", [(c, e) for _, c, e in MISFED], ids=[m[0] for m in MISFED])
def test_rules_flag_a_config_triton_loads_but_serves_wrongly(exported, change, expected):
    text, graph = exported
    assert change[0] in text, f"the exported config no longer contains {change[0]!r}: update this case"
    broken = text.replace(change[0], change[1], 1)
    assert load_errors(broken, graph) == []  # Triton itself would not notice
    errors = serving_errors(broken, graph)
    assert any(expected in e for e in errors), f"expected an error with {expected!r}, got {errors}"


def test_state_names_pair_the_same_way_sorted():
    check_state_pairing([("h0", "hn"), ("c0", "cn")])
    check_state_pairing([("h0", "hn")])
    # server issue 8586's own example: the two sort orders disagree.
    with pytest.raises(ExportError, match="Triton pairs output 'cache_last_channel_next' with input "
                                          "'cache_last_channel_len'"):
        check_state_pairing([("cache_last_channel", "cache_last_channel_next"),
                             ("cache_last_channel_len", "cache_last_channel_len_next")])


@pytest.mark.parametrize("field, value, message", [
    ("max_batch_size", 1 << 17, "expected 1..65536"),
    ("max_queue_delay_us", 2 ** 64 - 1, "expected 0..10000000"),
    ("max_sequence_idle_us", 86_400_000_001, "expected 1..86400000000"),
    ("max_candidate_sequences", 1 << 17, "expected 0..65536"),
])
def test_export_refuses_the_config_values_the_server_refuses(field, value, message):
    """One range for both sides (lstm_onnx.contract): export never writes a config.pbtxt the server fails to load,
    and the server's own check refuses that value too."""
    from lstm_onnx.protos import model_config_pb2 as mc
    from lstm_onnx.server.config_rules import ConfigError, check_ranges

    with pytest.raises(ExportError, match=message):
        BatchingOptions(**{field: value}).check()
    if field == "max_candidate_sequences":
        return  # read and not used by the server (docs/contract.md): only export bounds it
    config = mc.ModelConfig(name="m", max_batch_size=8)
    if field == "max_batch_size":
        config.max_batch_size = value
    elif field == "max_queue_delay_us":
        config.dynamic_batching.max_queue_delay_microseconds = value
    else:
        config.sequence_batching.max_sequence_idle_microseconds = value
    with pytest.raises(ConfigError, match=field.replace("_us", "_microseconds")):
        check_ranges(config)
