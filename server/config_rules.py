"""config.pbtxt against the graph: the tensors it names, and a sequence_batching this server and Triton both honour."""
from __future__ import annotations

from lstm_onnx.protocol import datatypes
from lstm_onnx.protos import model_config_pb2 as mc

from .runtime import ModelRuntime, StatePair, describe_pairs


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
