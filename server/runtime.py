"""One onnxruntime session per model version: load, ready, metadata, predict and self-test; no protobuf here."""
from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lstm_onnx.contract import METADATA_KEY, parse_contract
from lstm_onnx.protocol import datatypes
from lstm_onnx.protocol.errors import Internal, InvalidArgument, ResourceExhausted, clip

from .memory import RELEASE_BYTES, RunMemory, format_bytes, read_run_memory, release_free_memory
from .padding import RaggedPlan, add_sequence_lens

log = logging.getLogger("lstm_onnx.server")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class Stopped(Exception):
    """A run stopped through RunOptions.terminate; nobody is waiting for its answer."""


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as clients see it; -1 marks a dynamic axis (batch first when batchable)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return "[" + ", ".join("?" if d < 0 else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class StatePair:
    """A recurrent state: the output that feeds the input back on a sequence's next request."""

    input: str
    output: str


@dataclass
class RuntimeOptions:
    """How sessions are built (from the server settings)."""

    provider: str = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    spinning: bool = False  # idle intra-op threads busy-wait: faster hand-offs, but CPU taken from gRPC's loop
    max_run_memory_bytes: int = 1 << 30  # estimated peak of one run; the batcher refuses or splits above it
    cpu_memory_arena: bool = False  # onnxruntime's CPU arena keeps the peak of the largest run for good


@dataclass
class ModelRuntime:
    """A loaded ONNX model version; `predict` is synchronous and meant to run in an executor thread."""

    name: str
    version: int
    path: Path
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    state: list[StatePair] = field(default_factory=list)
    provider: str = ""
    parity_sample: dict | None = None
    ragged: RaggedPlan | None = None  # set when the session takes sequence_lens, so requests of any T can merge
    bidirectional: bool = False  # from the contract: state cannot be carried across chunks of one sequence
    run_memory: RunMemory | None = None  # peak memory of a run from its shape; None: no recurrent node to read
    time_input: str | None = None  # the [B, T, F] input whose T a run's memory grows with
    max_run_memory_bytes: int = 0  # the budget of one run (0: none)
    ready: bool = False
    reason: str = ""
    _session: object = None

    def load(self, options: RuntimeOptions, state: list[StatePair] | None = None) -> None:
        """Build the session on the chosen provider and read the tensors and the contract from the file."""
        import onnxruntime as ort

        providers = choose_providers(options.provider)
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spinning else "0")
        so.enable_cpu_mem_arena = options.cpu_memory_arena
        so.log_severity_level = 3  # ORT's warnings (e.g. unused initializers) are not the operator's problem
        # True FP32 on CUDA: TF32 would drift ~1e-2 from what was trained and verified.
        entries = [(p, {"use_tf32": "0"}) if p == CUDA else p for p in providers]
        source, self.ragged, graph = _ragged_source(self.path)
        session = ort.InferenceSession(source, sess_options=so, providers=entries)
        used = session.get_providers()[0]
        if options.provider == "cuda" and used != CUDA:
            raise RuntimeError(f"provider cuda was asked for, but onnxruntime fell back to {used}")
        self._session = session
        self.provider = "cuda" if used == CUDA else "cpu"
        hidden = self.ragged.lengths_input if self.ragged else None
        self.inputs = [_spec_of(arg) for arg in session.get_inputs() if arg.name != hidden]
        self.outputs = [_spec_of(arg) for arg in session.get_outputs()]
        self.max_run_memory_bytes = options.max_run_memory_bytes
        contract = _read_contract(session)
        if contract is not None:
            self.state = [StatePair(s["input"], s["output"]) for s in contract.get("state", [])]
            self.bidirectional = contract.get("num_directions", 1) == 2
            self.parity_sample = contract.get("parity_sample")
            if state and set(state) != set(self.state):  # config.pbtxt is the source, the contract a cross-check
                raise ValueError(f"config.pbtxt sequence_batching.state pairs {describe_pairs(state)}, but the "
                                 f"model's contract ({METADATA_KEY}) says {describe_pairs(self.state)}")
        elif state:
            self.state = list(state)
        self._check_state()
        self._read_run_memory(graph)
        log.info("model loaded", extra={"fields": {"model": self.name, "version": self.version,
                                                   "provider": self.provider, "providers": providers,
                                                   "ragged": self.ragged is not None}})

    def _check_state(self) -> None:
        inputs = {s.name: s for s in self.inputs}
        outputs = {s.name: s for s in self.outputs}
        for pair in self.state:
            if pair.input not in inputs or pair.output not in outputs:
                raise ValueError(f"state pair {pair.input!r}->{pair.output!r}: not an input/output of the model "
                                 f"(inputs {sorted(inputs)}, outputs {sorted(outputs)})")

    def _read_run_memory(self, graph) -> None:
        """Find the time input (the ragged plan's, else the one [B, T, F] input that is not state) and the
        graph's run-memory model."""
        if self.ragged is not None:
            self.time_input = self.ragged.time_input
        else:
            candidates = [s.name for s in self.inputs if len(s.shape) == 3 and s.name not in self.state_inputs]
            self.time_input = candidates[0] if len(candidates) == 1 else None
        features = self.input_spec(self.time_input).shape[2] if self.time_input else -1
        if graph is not None and features > 0:
            self.run_memory = read_run_memory(graph, features)

    def steps_of(self, inputs: dict[str, np.ndarray]) -> int:
        """T of a request: the time input's axis 1 (0 when the model has no time input or the request lacks it)."""
        x = inputs.get(self.time_input) if self.time_input else None
        return x.shape[1] if x is not None and x.ndim == 3 else 0

    def check_run_memory(self, rows: int, steps: int) -> None:
        """Raise ResourceExhausted when a run of `rows` rows and `steps` steps cannot fit the budget alone."""
        if self.run_memory is None or not self.max_run_memory_bytes:
            return
        need = self.run_memory.estimate(rows, steps)
        if need <= self.max_run_memory_bytes:
            return
        longest = self.run_memory.max_steps(rows, self.max_run_memory_bytes)
        fits = (f"at batch {rows} the longest time axis that fits is {longest}" if longest else
                f"no time axis fits at batch {rows}; send fewer rows")
        raise ResourceExhausted(
            f"model '{self.name}': input '{self.time_input}' of batch {rows} and time {steps} needs an estimated "
            f"{format_bytes(need)} ({need} bytes) in one run, above the run memory budget of "
            f"{format_bytes(self.max_run_memory_bytes)} ({self.max_run_memory_bytes} bytes, --max-run-memory-bytes); "
            f"{fits} (send a sequence in chunks with sequence_id to go longer)")

    @property
    def state_inputs(self) -> set[str]:
        return {p.input for p in self.state}

    def input_spec(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise InvalidArgument(f"model '{self.name}' has no input '{clip(name)}', expected one of "
                              f"{[s.name for s in self.inputs]}")

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise InvalidArgument naming the first input whose name, datatype or shape the model does not take."""
        for name, array in inputs.items():
            spec = self.input_spec(name)
            got = datatypes.datatype_of_numpy(array.dtype)
            if got != spec.datatype:
                raise InvalidArgument(f"input '{name}': got datatype {got}, expected {spec.datatype}")
            if len(array.shape) != len(spec.shape) or any(
                    want >= 0 and have != want for have, want in zip(array.shape, spec.shape)):
                raise InvalidArgument(f"input '{name}': got shape {list(array.shape)}, expected {spec.describe()}")
            if 0 in array.shape:  # onnxruntime's LSTM/GRU return uninitialised memory as hn/cn for T = 0
                raise InvalidArgument(f"input '{name}': got shape {list(array.shape)}, expected every axis at "
                                      "least 1 (an empty batch or time axis has nothing to compute)")
        missing = [s.name for s in self.inputs if s.name not in inputs and s.name not in self.state_inputs]
        if missing:
            raise InvalidArgument(f"model '{self.name}': missing input(s) {missing}, got "
                                  f"{[clip(n) for n in sorted(inputs)]}")

    def zero_state(self, name: str, batch: int) -> np.ndarray:
        """Zeros for an omitted state input, batch-major; the other axes must be fixed in the model."""
        spec = self.input_spec(name)
        rest = spec.shape[1:]
        if any(d < 0 for d in rest):
            raise InvalidArgument(f"input '{name}': omitted, and its shape {spec.describe()} has dynamic axes "
                                  "besides batch, so the server cannot make zeros for it")
        return np.zeros((batch, *rest), dtype=datatypes.numpy_of(spec.datatype))

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
                lengths: np.ndarray | None = None, run_options=None) -> dict[str, np.ndarray]:
        """Run the session; `outputs` None means all, in the model's order. `lengths` (int32 [B]) are the real
        time lengths of a zero-padded ragged batch; None means every row is as long as the time input.
        `run_options` (onnxruntime.RunOptions): setting its `terminate` from another thread stops the run at
        the next node boundary (one LSTM/GRU layer is one node, so a layer in progress finishes first), and
        the run raises Stopped."""
        names = outputs or [s.name for s in self.outputs]
        if self.ragged is not None:
            if lengths is None:
                x = inputs[self.ragged.time_input]
                lengths = np.full(x.shape[0], x.shape[1], dtype=np.int32)
            inputs = {**inputs, self.ragged.lengths_input: lengths}
        try:
            results = self._session.run(names, inputs, run_options)
        except Exception as exc:  # ORT raises its own types; the client gets one line
            self._release_after(inputs)
            if run_options is not None and run_options.terminate:
                raise Stopped(f"model '{self.name}' version {self.version}: run stopped, its requests were "
                              "abandoned") from exc
            raise Internal(f"model '{self.name}' version {self.version} failed: {exc}".splitlines()[0]) from exc
        self._release_after(inputs)
        return dict(zip(names, results))

    def _release_after(self, inputs: dict[str, np.ndarray]) -> None:
        """After a large run, give its freed memory back to the OS, so one big request does not leave its peak."""
        steps = self.steps_of(inputs)
        if self.run_memory is not None and steps:
            rows = inputs[self.time_input].shape[0]
            if self.run_memory.estimate(rows, steps) > RELEASE_BYTES:
                release_free_memory()

    def self_test(self) -> str | None:
        """Run the parity sample recorded at export; None when it passes or there is none, else why it failed."""
        sample = self.parity_sample
        if not sample:
            return None
        inputs = {k: decode_sample_tensor(v) for k, v in sample["inputs"].items()}
        expected = {k: decode_sample_tensor(v) for k, v in sample["outputs"].items()}
        atol = float(sample.get("atol", 1e-4))
        rtol = float(sample.get("rtol", 0.0))  # an int8 model's budget against FP32 has a relative part
        got = self.predict(inputs, list(expected))
        for name, want in expected.items():
            if got[name].shape != want.shape:
                return f"self-test output '{name}': got shape {list(got[name].shape)}, expected {list(want.shape)}"
            diff = np.abs(got[name].astype(np.float64) - want)
            if want.size and not (diff <= atol + rtol * np.abs(want)).all():
                return (f"self-test output '{name}': max |diff| {float(diff.max()):.3g} exceeds atol {atol:g} "
                        f"+ rtol {rtol:g} x |expected| (shape {list(want.shape)})")
        return None


def describe_pairs(pairs: list[StatePair]) -> str:
    """State pairs for a message: [h0->hn, c0->cn]."""
    return "[" + ", ".join(f"{p.input}->{p.output}" for p in pairs) + "]"


def _ragged_source(path: Path) -> tuple[str | bytes, RaggedPlan | None, object]:
    """The model to open: the file's path as it is, or its bytes rewritten to take sequence_lens when safe; and the
    parsed graph (None when onnx cannot read it), for the run-memory model."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception:  # onnxruntime gives the clearer error on a bad file: let it open the path
        return str(path), None, None
    trusted = any(p.key == METADATA_KEY for p in model.metadata_props)
    rewritten, plan = add_sequence_lens(model, trusted)
    if rewritten is None:
        log.info("ragged batching off", extra={"fields": {"path": str(path), "why": plan}})
        return str(path), None, model
    try:
        return rewritten.SerializeToString(), plan, model
    except ValueError:  # past protobuf's 2 GiB: serve the file as it is, batching equal lengths only
        return str(path), None, model


def decode_sample_tensor(tensor: dict) -> np.ndarray:
    """A contract TENSOR ({"datatype", "shape", "b64"}) as a numpy array."""
    dtype = datatypes.numpy_of(tensor["datatype"])
    return np.frombuffer(base64.b64decode(tensor["b64"]), dtype=dtype).reshape(tensor["shape"])


def choose_providers(requested: str) -> list[str]:
    """onnxruntime providers for auto|cpu|cuda; CUDA is only asked for when this onnxruntime build has it,
    because onnxruntime-gpu prints errors when asked for CUDA on a machine without it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == "cpu":
        return [CPU]
    if requested == "cuda":
        if CUDA not in available:
            raise RuntimeError(f"provider cuda: onnxruntime has only {available}; install onnxruntime-gpu")
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available and cuda_device_present() else [CPU]


def cuda_device_present() -> bool:
    # onnxruntime-gpu lists CUDA even with no GPU or driver; asking for it then logs errors, so look first.
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def _spec_of(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatypes.datatype_of_ort(arg.type), shape)


def _read_contract(session) -> dict | None:
    contract, problem = parse_contract(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY))
    if problem:
        raise ValueError(problem)
    return contract
