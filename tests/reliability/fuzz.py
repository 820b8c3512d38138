"""Generated malformed inference requests, each with the gRPC status the server documents for it."""
from __future__ import annotations

import random
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from lstm_onnx.protos import grpc_service_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED
OK = grpc.StatusCode.OK

# Numeric v2 datatypes and their little-endian numpy dtypes (the wire format).
DTYPES = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
          "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


@dataclass(frozen=True)
class ModelShape:
    """What the generator needs to know of the model under test (one of ours: input [B, T, F], h0/c0 [B, L*D, H])."""

    name: str
    features: int
    state: dict[str, tuple[int, int]]  # state input -> (L*D, H)
    outputs: tuple[str, ...]
    max_batch_size: int
    max_message_bytes: int


@dataclass
class BadCase:
    """One request and the status it must get; OK marks an edge case that must be served, not refused."""

    kind: str
    request: pb.ModelInferRequest
    code: grpc.StatusCode
    stream_ok: bool = True  # False when the request cannot travel on a stream without ending it (oversized)


@dataclass
class Tally:
    """Counts per kind of what was sent and what went wrong, for the test output and the bench table."""

    sent: Counter = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.sent.items()))
        return f"{sum(self.sent.values())} bad requests in {len(self.sent)} kinds ({kinds}); {len(self.wrong)} wrong"


def shape_of_repository(repository: Path, model: str, max_message_bytes: int) -> ModelShape:
    """Read the model's shape from its config.pbtxt (the exporter writes every tensor there)."""
    from google.protobuf import text_format

    from lstm_onnx.protos import model_config_pb2 as mc

    config = text_format.Parse((Path(repository) / model / "config.pbtxt").read_text(), mc.ModelConfig())
    inputs = {t.name: list(t.dims) for t in config.input}
    state = {name: (dims[0], dims[1]) for name, dims in inputs.items() if name != "input"}
    return ModelShape(model, inputs["input"][-1], state, tuple(t.name for t in config.output),
                      config.max_batch_size, max_message_bytes)


def good_inputs(rng: np.random.Generator, shape: ModelShape, batch: int | None = None,
                steps: int | None = None) -> dict[str, np.ndarray]:
    """A valid `input` tensor (state left to the server's zeros)."""
    batch = batch or int(rng.integers(1, 4))
    steps = steps or int(rng.integers(1, 7))
    return {"input": rng.standard_normal((batch, steps, shape.features)).astype(np.float32)}


def encode(model: str, inputs: dict[str, np.ndarray], version: str = "") -> pb.ModelInferRequest:
    """A raw_input_contents request, as tritonclient sends it."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        datatype = next(k for k, v in DTYPES.items() if np.dtype(v) == array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


def _raw_tensor(request: pb.ModelInferRequest, name: str, datatype: str, shape: list[int], raw: bytes) -> None:
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)


def _word(rng: random.Random, n: int = 8) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + "_.-") for _ in range(n))


def _case_wrong_datatype(rng: random.Random, shape: ModelShape) -> BadCase:
    datatype = rng.choice([d for d in DTYPES if d != "FP32"])
    dims = [rng.randint(1, 3), rng.randint(1, 5), shape.features]
    raw = np.zeros(dims, np.dtype(DTYPES[datatype])).tobytes()
    request = pb.ModelInferRequest(model_name=shape.name)
    _raw_tensor(request, "input", datatype, dims, raw)
    return BadCase("wrong_datatype", request, INVALID)


def _case_unknown_datatype(rng: random.Random, shape: ModelShape) -> BadCase:
    datatype = rng.choice(["BYTES", "FP8", "", "fp32", "Float", "BF16", _word(rng, rng.randint(1, 12))])
    request = pb.ModelInferRequest(model_name=shape.name)
    _raw_tensor(request, "input", datatype, [1, 2, shape.features], bytes(8 * shape.features))
    return BadCase("unknown_datatype", request, INVALID)


def _case_wrong_rank(rng: random.Random, shape: ModelShape) -> BadCase:
    rank = rng.choice([0, 1, 2, 4, 5])
    dims = [rng.randint(1, 3) for _ in range(rank)]
    count = int(np.prod(dims)) if dims else 1
    request = pb.ModelInferRequest(model_name=shape.name)
    _raw_tensor(request, "input", "FP32", dims, bytes(4 * count))
    return BadCase("wrong_rank", request, INVALID)


def _case_wrong_features(rng: random.Random, shape: ModelShape) -> BadCase:
    features = rng.choice([f for f in range(0, shape.features + 4) if f != shape.features])
    dims = [1, rng.randint(1, 4), features]
    request = pb.ModelInferRequest(model_name=shape.name)
    _raw_tensor(request, "input", "FP32", dims, bytes(4 * int(np.prod(dims))))
    return BadCase("wrong_features", request, INVALID)


def _case_negative_dim(rng: random.Random, shape: ModelShape) -> BadCase:
    dims = [1, rng.randint(1, 4), shape.features]
    dims[rng.randrange(3)] = -rng.choice([1, 2, 7, 2**31, 2**62])
    request = pb.ModelInferRequest(model_name=shape.name)
    _raw_tensor(request, "input", "FP32", dims, bytes(4 * rng.randint(0, 16)))
    return BadCase("negative_dim", request, INVALID)


def _case_huge_dim(rng: random.Random, shape: ModelShape) -> BadCase:
    # Products that overflow int64 (or wrap to the byte count sent) must still be refused as bad input.
    dims = [1, rng.randint(1, 4), shape.features]
    dims[rng.randrange(3)] = rng.choice([2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1])
    wraps = rng.random() < 0.5
    if wraps:  # the int64 product of these is 0 (mod 2**64): a naive check would take 0 bytes as matching
        dims = rng.choice([[2**62, 4, shape.features], [2**32, 2**32, shape.features]])
    request = pb.ModelInferRequest(model_name=shape.name)
    if rng.random() < 0.5:
        _raw_tensor(request, "input", "FP32", dims, bytes(0 if wraps else 4 * rng.choice([1, 16])))
    else:
        request.inputs.add(name="input", datatype="FP32", shape=dims)
        request.inputs[0].contents.fp32_contents.extend([0.0] * rng.choice([0, 1, 4]))
    return BadCase("huge_dim", request, INVALID)


def _case_raw_length(rng: random.Random, shape: ModelShape) -> BadCase:
    dims = [rng.randint(1, 3), rng.randint(1, 5), shape.features]
    want = 4 * int(np.prod(dims))
    got = max(0, want + rng.choice([-want, -5, -4, -1, 1, 3, 4, 1000]))
    request = pb.ModelInferRequest(model_name=shape.name)
    _raw_tensor(request, "input", "FP32", dims, bytes(got))
    return BadCase("raw_length_mismatch", request, INVALID)


def _case_typed_count(rng: random.Random, shape: ModelShape) -> BadCase:
    dims = [1, rng.randint(1, 5), shape.features]
    want = int(np.prod(dims))
    request = pb.ModelInferRequest(model_name=shape.name)
    request.inputs.add(name="input", datatype="FP32", shape=dims)
    field_name = rng.choice(["fp32_contents", "fp32_contents", "int_contents", "fp64_contents"])
    count = want + rng.choice([-1, 1, 5]) if field_name == "fp32_contents" else want
    getattr(request.inputs[0].contents, field_name).extend([1] * max(0, count))
    return BadCase("typed_count_mismatch", request, INVALID)


def _case_mixed(rng: random.Random, shape: ModelShape) -> BadCase:
    request = encode(shape.name, {"input": np.zeros((1, 2, shape.features), np.float32)})
    typed = request.inputs.add(name=rng.choice(list(shape.state) or ["input"]), datatype="FP32")
    typed.shape.extend([1, *next(iter(shape.state.values()), (1, 1))])
    typed.contents.fp32_contents.extend([0.0] * int(np.prod(typed.shape)))
    if rng.random() < 0.5:  # the typed tensor may also carry a raw entry, so counts agree
        request.raw_input_contents.append(bytes(4 * int(np.prod(typed.shape))))
    return BadCase("mixed_raw_and_typed", request, INVALID)


def _case_raw_count(rng: random.Random, shape: ModelShape) -> BadCase:
    request = encode(shape.name, {"input": np.zeros((1, 2, shape.features), np.float32)})
    if rng.random() < 0.5:
        for _ in range(rng.randint(1, 3)):
            request.raw_input_contents.append(bytes(rng.randint(0, 64)))
    else:
        request.inputs.add(name=rng.choice(list(shape.state) or ["x"]), datatype="FP32", shape=[1, 1])
    return BadCase("raw_count_mismatch", request, INVALID)


def _case_missing_input(rng: random.Random, shape: ModelShape) -> BadCase:
    request = pb.ModelInferRequest(model_name=shape.name)
    if shape.state and rng.random() < 0.7:
        name, (layers, hidden) = rng.choice(sorted(shape.state.items()))
        _raw_tensor(request, name, "FP32", [1, layers, hidden], bytes(4 * layers * hidden))
    return BadCase("missing_input", request, INVALID)


def _case_unknown_input(rng: random.Random, shape: ModelShape) -> BadCase:
    inputs = {"input": np.zeros((1, 2, shape.features), np.float32),
              rng.choice(["x", "input0", "INPUT", "h1", _word(rng)]): np.zeros((1, 2), np.float32)}
    return BadCase("unknown_input", encode(shape.name, inputs), INVALID)


def _case_duplicate_input(rng: random.Random, shape: ModelShape) -> BadCase:
    request = encode(shape.name, {"input": np.zeros((1, 2, shape.features), np.float32)})
    _raw_tensor(request, "input", "FP32", [1, 2, shape.features], bytes(8 * shape.features))
    return BadCase("duplicate_input", request, INVALID)


def _case_unknown_model(rng: random.Random, shape: ModelShape) -> BadCase:
    name = rng.choice(["", shape.name.upper(), shape.name + "_", "../" + shape.name, _word(rng, rng.randint(1, 40))])
    return BadCase("unknown_model", encode(name, {"input": np.zeros((1, 2, shape.features), np.float32)}), NOT_FOUND)


def _case_unknown_version(rng: random.Random, shape: ModelShape) -> BadCase:
    version = rng.choice(["0", "2", "-1", "1.0", "abc", "99999999999999999999999", "1e3", _word(rng, 3) + "x"])
    request = encode(shape.name, {"input": np.zeros((1, 2, shape.features), np.float32)}, version=version)
    return BadCase("unknown_version", request, NOT_FOUND)


def _case_unknown_output(rng: random.Random, shape: ModelShape) -> BadCase:
    request = encode(shape.name, {"input": np.zeros((1, 2, shape.features), np.float32)})
    if rng.random() < 0.5:
        request.outputs.add(name=rng.choice(["out", "OUTPUT", "h0", "", _word(rng)]))
    else:
        name = rng.choice(shape.outputs)
        request.outputs.add(name=name)
        request.outputs.add(name=name)
    return BadCase("unknown_or_duplicate_output", request, INVALID)


def _case_bad_parameter(rng: random.Random, shape: ModelShape) -> BadCase:
    request = encode(shape.name, {"input": np.zeros((1, 2, shape.features), np.float32)})
    params = request.parameters
    choice = rng.randrange(4)
    if choice == 0:  # sequence_id of a type that is not an id
        kind = rng.choice(["bool", "double"])
        if kind == "bool":
            params["sequence_id"].bool_param = True
        else:
            params["sequence_id"].double_param = rng.choice([1.0, 0.5, float("nan")])
        params["sequence_start"].bool_param = True
    elif choice == 1:  # start/end flags that are not bools
        params["sequence_id"].int64_param = rng.randint(1, 2**40)
        flag = params[rng.choice(["sequence_start", "sequence_end"])]
        kind = rng.choice(["int64", "string", "double"])
        if kind == "int64":
            flag.int64_param = 1
        elif kind == "string":
            flag.string_param = "true"
        else:
            flag.double_param = 1.0
    elif choice == 2:  # a flag without an id
        params[rng.choice(["sequence_start", "sequence_end"])].bool_param = True
    else:  # continuing a sequence that was never started
        params["sequence_id"].string_param = "never-started-" + _word(rng, 12)
    return BadCase("bad_sequence_parameter", request, INVALID)


def _case_batch(rng: random.Random, shape: ModelShape) -> BadCase:
    rows = rng.choice([0, shape.max_batch_size + 1, shape.max_batch_size + rng.randint(2, 30)])
    request = encode(shape.name, {"input": np.zeros((rows, 1, shape.features), np.float32)})
    return BadCase("empty_or_oversized_batch", request, INVALID)


def _case_state(rng: random.Random, shape: ModelShape) -> BadCase:
    if not shape.state:
        return _case_batch(rng, shape)
    name, (layers, hidden) = rng.choice(sorted(shape.state.items()))
    batch = rng.randint(1, 3)
    if rng.random() < 0.5:  # wrong state dims
        dims = (batch, layers + rng.choice([-1, 1, 2]), hidden) if rng.random() < 0.5 else (batch, layers, hidden + 1)
    else:  # batch disagreeing with the input's
        dims = (batch + 1, layers, hidden)
    inputs = {"input": np.zeros((batch, 2, shape.features), np.float32), name: np.zeros(dims, np.float32)}
    return BadCase("bad_state_tensor", encode(shape.name, inputs), INVALID)


def _case_oversized(rng: random.Random, shape: ModelShape) -> BadCase:
    steps = shape.max_message_bytes // (4 * shape.features) + rng.randint(1, 1000)
    request = pb.ModelInferRequest(model_name=shape.name)
    _raw_tensor(request, "input", "FP32", [1, steps, shape.features], bytes(4 * steps * shape.features))
    return BadCase("oversized_message", request, TOO_BIG, stream_ok=False)


def _case_nonfinite(rng: random.Random, shape: ModelShape) -> BadCase:
    array = np.random.default_rng(rng.randrange(2**32)).standard_normal((1, 3, shape.features)).astype(np.float32)
    array.flat[rng.randrange(array.size)] = rng.choice([np.nan, np.inf, -np.inf])
    return BadCase("nan_or_inf_served", encode(shape.name, {"input": array}), OK)


def _case_zero_time(rng: random.Random, shape: ModelShape) -> BadCase:
    request = encode(shape.name, {"input": np.zeros((rng.randint(1, 3), 0, shape.features), np.float32)})
    return BadCase("zero_length_time", request, INVALID)


# Weights: the cheap, varied kinds most; the oversized one (a message past the limit) only now and then.
GENERATORS = [(_case_wrong_datatype, 3), (_case_unknown_datatype, 2), (_case_wrong_rank, 3), (_case_wrong_features, 2),
              (_case_negative_dim, 2), (_case_huge_dim, 3), (_case_raw_length, 3), (_case_typed_count, 2),
              (_case_mixed, 2), (_case_raw_count, 2), (_case_missing_input, 2), (_case_unknown_input, 2),
              (_case_duplicate_input, 2), (_case_unknown_model, 2), (_case_unknown_version, 2),
              (_case_unknown_output, 2), (_case_bad_parameter, 4), (_case_batch, 2), (_case_state, 2),
              (_case_oversized, 1), (_case_nonfinite, 2), (_case_zero_time, 1)]


def generate_bad_requests(shape: ModelShape, count: int, seed: int = 0) -> list[BadCase]:
    """`count` requests: every kind at least once, the rest drawn by weight; the same seed gives the same list."""
    rng = random.Random(seed)
    makers = [make for make, _ in GENERATORS]
    weights = [weight for _, weight in GENERATORS]
    chosen = makers[:count] + rng.choices(makers, weights, k=max(0, count - len(makers)))
    return [make(rng, shape) for make in chosen]


def reference_outputs(model_path: Path, inputs: dict[str, np.ndarray], shape: ModelShape) -> dict[str, np.ndarray]:
    """The model's outputs computed in-process with onnxruntime (zero state, as the server supplies).

    `shape` is accepted for the callers' convenience; the load generator's reference reads the state
    shapes from the graph itself.
    """
    from lstm_onnx.client.loadgen import reference_outputs as in_process

    return in_process(model_path, inputs)
