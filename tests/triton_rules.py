"""Triton's load-time rules for an onnxruntime model with a sequence batcher, checked without Triton.

Triton cannot run here, so the rules are taken from its source and re-stated one by one; each names the
file and function it comes from. Snapshots read (research notes, /work/research/triton_rules.md):
onnxruntime_backend 00fd3e8, core 73aad7c, common 83adf7c, backend 3f57fb9, server e1db8a6.

`load_errors` returns what Triton would refuse the model for, in its load order (text parse, core
NormalizeModelConfig/ValidateModelConfig, SequenceBatchScheduler::Create, then the ORT backend's
ModelInstanceState); `serving_errors` returns what Triton loads but then serves wrongly or refuses at the
first request, which Triton itself never checks at load.
"""
from __future__ import annotations

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

# onnxruntime_backend src/onnxruntime_utils.cc ModelConfigDataTypeToOnnxDataType: config type -> ONNX type.
_ONNX_OF_CONFIG = {
    "TYPE_BOOL": onnx.TensorProto.BOOL, "TYPE_UINT8": onnx.TensorProto.UINT8,
    "TYPE_UINT16": onnx.TensorProto.UINT16, "TYPE_UINT32": onnx.TensorProto.UINT32,
    "TYPE_UINT64": onnx.TensorProto.UINT64, "TYPE_INT8": onnx.TensorProto.INT8,
    "TYPE_INT16": onnx.TensorProto.INT16, "TYPE_INT32": onnx.TensorProto.INT32,
    "TYPE_INT64": onnx.TensorProto.INT64, "TYPE_FP16": onnx.TensorProto.FLOAT16,
    "TYPE_FP32": onnx.TensorProto.FLOAT, "TYPE_FP64": onnx.TensorProto.DOUBLE,
    "TYPE_STRING": onnx.TensorProto.STRING, "TYPE_BF16": onnx.TensorProto.BFLOAT16,
}
_CONTROL_KINDS = ("CONTROL_SEQUENCE_START", "CONTROL_SEQUENCE_END", "CONTROL_SEQUENCE_READY",
                  "CONTROL_SEQUENCE_CORRID")


def parse_config(text: str) -> mc.ModelConfig:
    """The text as tritonclient's ModelConfig; raises text_format.ParseError as Triton's parse would fail.

    core src/model_config_utils.cc GetNormalizedModelConfig reads config.pbtxt with protobuf's text
    parser into inference.ModelConfig (common protobuf/model_config.proto): unknown fields, such as a
    `reshape` on a state, and two members of one oneof (dynamic_batching with sequence_batching) fail here.
    """
    return text_format.Parse(text, mc.ModelConfig())


def graph_shapes(model: onnx.ModelProto) -> tuple[dict[str, tuple[int, list[int]]], dict[str, tuple[int, list[int]]]]:
    """Graph inputs (not initializers) and outputs as name -> (ONNX elem type, dims with -1 for symbolic)."""
    # onnxruntime_backend src/onnxruntime_utils.cc InputOutputInitializerInfos: SessionGetInputCount counts
    # graph inputs without initializers; dim_param and unknown dims come back from ORT as -1.
    initializers = {i.name for i in model.graph.initializer}

    def info(value) -> tuple[int, list[int]]:
        t = value.type.tensor_type
        return t.elem_type, [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]

    inputs = {v.name: info(v) for v in model.graph.input if v.name not in initializers}
    outputs = {v.name: info(v) for v in model.graph.output}
    return inputs, outputs


def _type_name(value: int) -> str:
    return mc.DataType.Name(value)


def _core_io_errors(config: mc.ModelConfig) -> list[str]:
    errors = []
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for t in tensors:
            # core src/model_config_utils.cc ValidateIOShape (via ValidateModelInput/ValidateModelOutput)
            if not t.name:
                errors.append(f"model {kind} must specify 'name'")
            if t.data_type == mc.TYPE_INVALID:
                errors.append(f"model {kind} '{t.name}' must specify 'data_type'")
            if not t.dims:
                errors.append(f"model {kind} '{t.name}' must specify 'dims'")
            if any(d < 1 and d != -1 for d in t.dims):
                errors.append(f"model {kind} '{t.name}': dimension must be integer >= 1, or -1 to indicate a "
                              "variable-size dimension")
    return errors


def _core_scheduler_errors(config: mc.ModelConfig) -> list[str]:
    errors = []
    mbs = config.max_batch_size
    # core src/model_config_utils.cc ValidateModelConfig: preferred sizes must be positive and <= max_batch_size.
    if config.HasField("dynamic_batching"):
        for size in config.dynamic_batching.preferred_batch_size:
            if size < 1:
                errors.append(f"dynamic batching preferred size must be positive (got {size})")
            elif size > mbs:
                errors.append(f"dynamic batching preferred size must be <= max batch size (got {size} > {mbs})")
    if not config.HasField("sequence_batching"):
        return errors
    seq = config.sequence_batching
    if seq.WhichOneof("strategy_choice") == "oldest":
        for size in seq.oldest.preferred_batch_size:
            if size < 1:
                errors.append(f"sequence batching preferred batch size must be positive (got {size})")
            elif size > mbs:
                errors.append(f"sequence batching preferred batch size must be <= max batch size (got {size} > {mbs})")
    if seq.WhichOneof("strategy_choice") == "direct" and not 0.0 <= seq.direct.minimum_slot_utilization <= 1.0:
        errors.append("sequence batching minimum slot utilization must be in range (0.0, 1.0]")
    # core src/model_config_utils.cc ValidateModelConfig: one tensor per control kind, one kind per tensor;
    # CORRID takes data_type among the integer types and STRING.
    seen_kinds, seen_names = set(), set()
    for control_input in seq.control_input:
        if not control_input.name:
            errors.append("sequence batching control tensor must have a name")
        if control_input.name in seen_names:
            errors.append(f"sequence batching control tensor '{control_input.name}' is specified for multiple "
                          "control kinds")
        seen_names.add(control_input.name)
        for control in control_input.control:
            kind = mc.ModelSequenceBatching.Control.Kind.Name(control.kind)
            if kind in seen_kinds:
                errors.append(f"sequence batching specifies multiple {kind} tensors")
            seen_kinds.add(kind)
            if kind == "CONTROL_SEQUENCE_CORRID" and control.data_type not in (
                    mc.TYPE_UINT64, mc.TYPE_INT64, mc.TYPE_UINT32, mc.TYPE_INT32, mc.TYPE_STRING):
                errors.append("unexpected data type for control CONTROL_SEQUENCE_CORRID")
    return errors


def _initial_state_errors(config: mc.ModelConfig) -> list[str]:
    """core src/sequence_batch_scheduler/sequence_batch_scheduler.cc SequenceBatchScheduler::Create and
    GenerateInitialStateData: the initial_state of every sequence_batching.state entry."""
    errors = []
    seen = set()
    for state in config.sequence_batching.state:
        if len(state.initial_state) > 1:
            errors.append(f"initial_state field for state input '{state.input_name}' must contain exactly one or "
                          f"zero element. Found '{len(state.initial_state)}' elements.")
        for initial in state.initial_state:
            if initial.data_type != state.data_type:
                errors.append(f"The data type used for 'initial_state' field of state '{state.input_name}' does "
                              f"not match the state data type ({_type_name(initial.data_type)} != "
                              f"{_type_name(state.data_type)}).")
            if not initial.name:
                errors.append(f"Field 'name' must be set when using initial_state for state input "
                              f"'{state.input_name}'.")
            if state.input_name in seen:
                errors.append(f"State input name '{state.input_name}' specified more than once.")
            seen.add(state.input_name)
            if len(initial.dims) != len(state.dims):
                errors.append(f"Number of dimensions in 'initial_state' doesn't match the size of 'state' "
                              f"dimensions for state input '{state.input_name}'. {len(initial.dims)} != "
                              f"{len(state.dims)}")
            elif any(d == -1 for d in initial.dims):
                errors.append(f"'initial_state' field for state input name '{state.input_name}' contains "
                              "variable dimensions.")
            else:
                for want, got in zip(state.dims, initial.dims):
                    if want != -1 and want != got:
                        errors.append(f"'initial_state' dim for input name '{state.input_name}' doesn't match "
                                      f"'state' dim description. {want} != {got}")
            if initial.WhichOneof("state_data") is None:
                errors.append(f"initial_state setting expects state'{state.input_name}' to have state_data set")
    return errors


def _compare_dims(name: str, graph: list[int], dims: list[int], mbs: int, exact: bool) -> str | None:
    """onnxruntime_backend src/onnxruntime_utils.cc CompareDimsSupported."""
    if mbs > 0 and (not graph or graph[0] != -1):
        return (f"tensor '{name}': for the model to support batching the shape should have at least 1 dimension "
                f"and the first dimension must be -1; but shape expected by the model is {graph}")
    full = ([-1] if mbs > 0 else []) + list(dims)
    ok = len(full) == len(graph) and all(
        g == f for g, f in zip(graph, full) if exact or g != -1)
    if not ok:
        return (f"tensor '{name}': the model expects {len(graph)} dimensions (shape {graph}) but the model "
                f"configuration specifies {len(full)} dimensions (making complete shape {full})")
    return None


def _ort_errors(config: mc.ModelConfig, model: onnx.ModelProto) -> list[str]:
    graph_in, graph_out = graph_shapes(model)
    mbs = config.max_batch_size
    seq = config.sequence_batching
    errors = []
    # onnxruntime_backend src/onnxruntime.cc ModelInstanceState::ModelInstanceState: controls are optional,
    # but one that is configured must be a graph input whose shape, without the batch dim, is [1]
    # (ValidateBooleanSequenceControl / ValidateTypedSequenceControl).
    kinds = set()
    for control_input in seq.control_input:
        for control in control_input.control:
            kinds.add(control.kind)
        if control_input.name not in graph_in:
            errors.append(f"configuration specified sequence control '{control_input.name}', but model does not "
                          "provide that input")
            continue
        dims = graph_in[control_input.name][1][1 if mbs > 0 else 0:]
        if dims != [1]:
            errors.append(f"sequence control '{control_input.name}' in model has dims {dims} but dims [1] is "
                          "expected")
    # Same constructor: the expected input count is config inputs minus optional ones, plus batch inputs,
    # one per control kind present and one per state; ModelInstanceState::ValidateInputs compares it with
    # the graph's input count before it looks at any single input.
    expected = (len(config.input) - sum(1 for t in config.input if t.optional) + len(config.batch_input)
                + len(kinds) + len(seq.state))
    if expected != len(graph_in):
        errors.append(f"configuration expects {expected} inputs, model provides {len(graph_in)}")
        return errors
    for t in config.input:
        # onnxruntime.cc ModelInstanceState::ValidateInputs: optional inputs and batching do not mix.
        if t.optional and mbs != 0:
            errors.append(f"optional input '{t.name}' is not supported for models that support batching")
        # backend src/backend_common.cc CheckAllowedModelInput: every config input is a graph input.
        if t.name not in graph_in:
            errors.append(f"unexpected inference input '{t.name}', allowed inputs are: {', '.join(sorted(graph_in))}")
            continue
        elem, shape = graph_in[t.name]
        if _ONNX_OF_CONFIG.get(_type_name(t.data_type)) != elem:
            errors.append(f"configuration expects datatype {_type_name(t.data_type)} for input '{t.name}', model "
                          f"provides ONNX type {onnx.TensorProto.DataType.Name(elem)}")
        dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
        problem = _compare_dims(t.name, shape, dims, mbs, exact=False)  # inputs: compare_exact false
        if problem:
            errors.append(problem)
    for t in config.output:
        # backend_common.cc CheckAllowedModelOutput; onnxruntime.cc ModelInstanceState::ValidateOutputs.
        if t.name not in graph_out:
            errors.append(f"unexpected inference output '{t.name}', allowed outputs are: "
                          f"{', '.join(sorted(graph_out))}")
            continue
        elem, shape = graph_out[t.name]
        if _ONNX_OF_CONFIG.get(_type_name(t.data_type)) != elem:
            errors.append(f"configuration expects datatype {_type_name(t.data_type)} for output '{t.name}', model "
                          f"provides ONNX type {onnx.TensorProto.DataType.Name(elem)}")
        dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
        problem = _compare_dims(t.name, shape, dims, mbs, exact=True)  # outputs: compare_exact true
        if problem:
            errors.append(problem)
    return errors


def load_errors(text: str, model: onnx.ModelProto) -> list[str]:
    """Why Triton's onnxruntime backend would refuse to load `text` as config.pbtxt of `model`; [] if it loads."""
    try:
        config = parse_config(text)
    except text_format.ParseError as exc:
        return [f"config.pbtxt does not parse as inference.ModelConfig: {exc}"]
    errors = []
    # core src/model_config_utils.cc GetNormalizedModelConfig / backend_model.cc: platform and backend agree.
    if config.platform and config.platform != "onnxruntime_onnx":
        errors.append(f"platform: got {config.platform!r}, expected 'onnxruntime_onnx'")
    if config.backend and config.backend != "onnxruntime":
        errors.append(f"backend: got {config.backend!r}, expected 'onnxruntime'")
    errors += _core_io_errors(config)
    errors += _core_scheduler_errors(config)
    errors += _initial_state_errors(config)
    if not errors:  # the backend only sees a model that passed core's checks
        errors += _ort_errors(config, model)
    return errors


def serving_errors(text: str, model: onnx.ModelProto) -> list[str]:
    """What Triton loads without complaint and then gets wrong: state entries that do not fit the graph.

    core src/sequence_state.cc and onnxruntime.cc never compare a state's names, datatype or dims with the
    graph at load (the output-state check in ModelInstanceState::ValidateOutputs is never reached), so a
    wrong entry only fails, or answers wrongly, at inference time.
    """
    config = parse_config(text)
    graph_in, graph_out = graph_shapes(model)
    mbs = config.max_batch_size
    errors = []
    states = list(config.sequence_batching.state)
    config_inputs = {t.name for t in config.input}
    for state in states:
        for kind, name, graph in (("input", state.input_name, graph_in), ("output", state.output_name, graph_out)):
            if name not in graph:
                errors.append(f"state {kind} '{name}': not a graph {kind} ({sorted(graph)})")
                continue
            elem, shape = graph[name]
            if _ONNX_OF_CONFIG.get(_type_name(state.data_type)) != elem:
                errors.append(f"state {kind} '{name}': datatype {_type_name(state.data_type)}, graph has ONNX type "
                              f"{onnx.TensorProto.DataType.Name(elem)}")
            # core sequence_state.cc SequenceStates::Initialize gives each request's state a batch dim of 1
            # when max_batch_size > 0, and batches concatenate along axis 0: the graph must be batch-major.
            problem = _compare_dims(name, shape, list(state.dims), mbs, exact=True)
            if problem:
                errors.append(f"state {kind} {problem}")
        # core model.cc Model::GetInput: a state input named under `input` too is counted twice by the backend.
        if state.input_name in config_inputs:
            errors.append(f"state input '{state.input_name}' is also listed under input")
        if not state.initial_state:
            # common protobuf/model_config.proto State.initial_state: without it the first request of a
            # sequence "contains garbage data".
            errors.append(f"state '{state.input_name}' has no initial_state: Triton starts it from garbage")
    # core sequence_state.cc SequenceStates::OutputState pairs an output state with the input state of the
    # same index in the sorted maps of names (server issue 8586).
    inputs = sorted(s.input_name for s in states)
    outputs = sorted(s.output_name for s in states)
    for state in states:
        if state.output_name in outputs and inputs[outputs.index(state.output_name)] != state.input_name:
            errors.append(f"state output '{state.output_name}' is fed back into "
                          f"'{inputs[outputs.index(state.output_name)]}' by sorted-name pairing, expected "
                          f"'{state.input_name}'")
    if len(set(inputs)) != len(inputs) or len(set(outputs)) != len(outputs):
        # SequenceStates::Initialize ignores a duplicate with a warning, which shifts the pairing.
        errors.append(f"duplicate state names: inputs {inputs}, outputs {outputs}")
    # Every graph input is either sent by the client (config input) or fed by Triton (state): a graph input
    # Triton neither receives nor feeds makes every request fail.
    for name in graph_in:
        if name not in config_inputs and name not in inputs and name not in {c.name for c in
                                                                             config.sequence_batching.control_input}:
            errors.append(f"graph input '{name}': neither a config input, a state nor a control")
    return errors
