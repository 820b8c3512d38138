"""config.pbtxt: read without trusting it, every value this server uses range-checked, and checked against the graph
(the tensors it names, and a sequence_batching this server and Triton both honour)."""
from __future__ import annotations

import os
from pathlib import Path

from google.protobuf import text_format

from lstm_onnx.contract import MAX_BATCH_SIZE, MAX_QUEUE_DELAY_US, MAX_SEQUENCE_IDLE_US
from lstm_onnx.protocol import datatypes
from lstm_onnx.protos import model_config_pb2 as mc

from .model_file import read_regular_file
from .runtime import ModelRuntime, StatePair, describe_pairs

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
DEFAULT_MODEL_FILENAME = "model.onnx"
# Ranges of the values this server acts on; Triton has none, but past these a config is a mistake, not a choice.
MAX_CONFIG_BYTES = 1 << 20  # Triton's configs are a few KiB


class ConfigError(ValueError):
    """A config.pbtxt that cannot be used: unreadable, or a value out of its range."""


def read_config(path: Path) -> mc.ModelConfig:
    """The model's config.pbtxt, empty when there is none; ConfigError naming the file when it cannot be used."""
    config = mc.ModelConfig()
    if not os.path.lexists(path):
        return config
    data = read_regular_file(path, MAX_CONFIG_BYTES, "the config.pbtxt limit")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}), expected "
                          "protobuf text format in UTF-8") from None
    try:
        text_format.Parse(text, config)
    except (text_format.ParseError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: {exc}".splitlines()[0]) from None
    return config


def model_filename(config: mc.ModelConfig) -> str:
    """The model file's name in each version folder: a plain file name, so the model stays in its folder."""
    name = config.default_model_filename or DEFAULT_MODEL_FILENAME
    if name in (".", "..") or any(c in name for c in "/\\\0") or len(name.encode()) > 255:
        raise ConfigError(f"config.pbtxt default_model_filename: got {name!r}, expected a file name in the version "
                          "folder such as 'model.onnx' (no '/', '\\' or '..', at most 255 bytes)")
    return name


def check_ranges(config: mc.ModelConfig) -> None:
    """Raise ConfigError naming the first value this server reads that is out of its range, with the range."""
    where = "config.pbtxt"
    for field, allowed in (("platform", PLATFORM), ("backend", BACKEND)):
        value = getattr(config, field)
        if value not in ("", allowed):
            raise ConfigError(f"{where} {field}: got {value!r}, expected {allowed!r} (or none): this server runs "
                              "ONNX models with onnxruntime only")
    if not 0 <= config.max_batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(f"{where} max_batch_size: got {config.max_batch_size}, expected 0..{MAX_BATCH_SIZE} "
                          "(0: the model does not batch)")
    tensors = [("input", t.name, t) for t in config.input] + [("output", t.name, t) for t in config.output]
    tensors += [("sequence_batching.state", t.input_name, t) for t in config.sequence_batching.state]
    for kind, name, tensor in tensors:
        if any(d < 1 and d != -1 for d in tensor.dims):
            raise ConfigError(f"{where} {kind} '{name}' dims: got {list(tensor.dims)}, expected each -1 (any size) "
                              "or at least 1")
        if tensor.data_type not in mc.DataType.values():
            raise ConfigError(f"{where} {kind} '{name}' data_type: got {tensor.data_type}, expected one of "
                              f"{', '.join(mc.DataType.keys())}")
    seq = config.sequence_batching
    delays = [("dynamic_batching", config.dynamic_batching.max_queue_delay_microseconds),
              ("sequence_batching.oldest", seq.oldest.max_queue_delay_microseconds),
              ("sequence_batching.direct", seq.direct.max_queue_delay_microseconds)]
    for owner, delay in delays:
        if delay > MAX_QUEUE_DELAY_US:
            raise ConfigError(f"{where} {owner}.max_queue_delay_microseconds: got {delay}, expected "
                              f"0..{MAX_QUEUE_DELAY_US} ({MAX_QUEUE_DELAY_US // 1_000_000} s)")
    if seq.max_sequence_idle_microseconds > MAX_SEQUENCE_IDLE_US:
        raise ConfigError(f"{where} sequence_batching.max_sequence_idle_microseconds: got "
                          f"{seq.max_sequence_idle_microseconds}, expected 0..{MAX_SEQUENCE_IDLE_US} (1 day; 0: "
                          "Triton's default of 1 s)")


def check_config(config: mc.ModelConfig, runtime: ModelRuntime) -> None:
    """config.pbtxt must name tensors the graph has, with the same datatypes."""
    for declared, actual, kind in ((config.input, runtime.inputs, "input"), (config.output, runtime.outputs, "output")):
        specs = {s.name: s for s in actual}
        for tensor in declared:
            if tensor.name not in specs:
                raise ValueError(f"config.pbtxt {kind} '{tensor.name}': not in the model, expected one of "
                                 f"{sorted(specs)}")
            want = datatypes.datatype_of_config(mc.DataType.Name(tensor.data_type))
            if tensor.data_type and want != specs[tensor.name].datatype:
                raise ValueError(f"config.pbtxt {kind} '{tensor.name}': datatype {want}, but the model has "
                                 f"{specs[tensor.name].datatype}")
            graph = specs[tensor.name].shape[1 if config.max_batch_size > 0 else 0:]  # config dims omit batch
            dims = list(tensor.dims)
            if dims and (len(dims) != len(graph) or any(c >= 0 and g >= 0 and c != g for c, g in zip(dims, graph))):
                raise ValueError(f"config.pbtxt {kind} '{tensor.name}': dims {dims}, but the model has "
                                 f"{['?' if g < 0 else g for g in graph]}")


def check_sequence_batching(config: mc.ModelConfig, runtime: ModelRuntime) -> None:
    """sequence_batching must describe what this server does with the graph, and what Triton would do."""
    if config.WhichOneof("scheduling_choice") != "sequence_batching":
        return
    seq = config.sequence_batching
    where = "config.pbtxt sequence_batching"
    if seq.control_input:
        raise ValueError(f"{where}.control_input: got {[c.name for c in seq.control_input]}, expected none: this "
                         "server feeds no control tensors (sequence_start/end are request parameters)")
    if seq.state and runtime.bidirectional:
        raise ValueError(f"{where}.state: got {len(seq.state)} entries for a bidirectional model, expected none: "
                         "its state cannot be carried from one chunk to the next (export --config-style stateless)")
    for size in seq.oldest.preferred_batch_size:
        if not 1 <= size <= config.max_batch_size:
            raise ValueError(f"{where}.oldest.preferred_batch_size: got {size}, expected 1..{config.max_batch_size}")
    specs = {"input": {s.name: s for s in runtime.inputs}, "output": {s.name: s for s in runtime.outputs}}
    listed = {t.name for t in config.input}
    skip = 1 if config.max_batch_size > 0 else 0
    for state in seq.state:
        want = datatypes.datatype_of_config(mc.DataType.Name(state.data_type))
        for kind, name in (("input", state.input_name), ("output", state.output_name)):
            spec = specs[kind][name]  # runtime.load checked the names
            graph = list(spec.shape[skip:])
            if want != spec.datatype or list(state.dims) != graph:
                raise ValueError(f"{where}.state '{name}': datatype {want}, dims {list(state.dims)}, but the model "
                                 f"has {spec.datatype}, {graph}")
        if state.input_name in listed:
            # Triton's onnxruntime backend would count it twice against the graph's inputs and refuse the model.
            raise ValueError(f"{where}.state '{state.input_name}': also listed under input, expected only here")
        if [i.WhichOneof("state_data") for i in state.initial_state] != ["zero_data"]:
            # Without initial_state Triton starts a sequence from uninitialised memory; data_file is not read here.
            raise ValueError(f"{where}.state '{state.input_name}': expected one initial_state with zero_data, got "
                             f"{[i.WhichOneof('state_data') for i in state.initial_state]}")
    pairs = [StatePair(s.input_name, s.output_name) for s in seq.state]
    inputs, outputs = sorted(p.input for p in pairs), sorted(p.output for p in pairs)
    if any(inputs.index(p.input) != outputs.index(p.output) for p in pairs):
        # core sequence_state.cc SequenceStates::OutputState pairs them by sorted name (server issue 8586): this
        # server would carry the state right where Triton, serving the same file, would not.
        raise ValueError(f"{where}.state pairs {describe_pairs(pairs)}: the sort orders of input and output names "
                         f"differ ({inputs} vs {outputs}), so Triton would feed outputs into the wrong inputs")
