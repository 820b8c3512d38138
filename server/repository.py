"""The model repository: scan a Triton-layout directory, read config.pbtxt, load every version, self-test."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from lstm_onnx.protocol import datatypes
from lstm_onnx.protocol.errors import NotFound, Unavailable
from lstm_onnx.protos import model_config_pb2 as mc

from .config_rules import check_config, check_sequence_batching
from .model_file import check_model_file
from .runtime import ModelRuntime, RuntimeOptions, StatePair

log = logging.getLogger("lstm_onnx.server")

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
PLATFORM = "onnxruntime_onnx"
# core src/constants.h SEQUENCE_IDLE_DEFAULT_MICROSECONDS: Triton's idle timeout when the config gives none.
TRITON_SEQUENCE_IDLE_DEFAULT_US = 1_000_000


@dataclass
class ModelVersion:
    """One version of a model: its runtime when it loaded, else why not."""

    version: int
    runtime: ModelRuntime | None = None
    state: str = UNAVAILABLE
    reason: str = ""

    @property
    def ready(self) -> bool:
        return self.state == READY


@dataclass
class ModelEntry:
    """A model directory: its config (from config.pbtxt or built from the graph) and versions."""

    name: str
    config: mc.ModelConfig
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    reason: str = ""  # why the model as a whole failed (bad config.pbtxt), if it did
    max_batch_size: int = 0
    max_queue_delay_us: int = 0
    dynamic_batching: bool = False  # merge concurrent requests (dynamic_batching or sequence_batching in the config)
    sequence_idle_us: int = 0  # from sequence_batching; 0: the server's sequence_idle_timeout_s applies

    def resolve(self, version: str) -> ModelVersion:
        """The version asked for ("" = the highest ready one); NotFound or Unavailable otherwise."""
        if version:
            try:
                entry = self.versions[int(version)]
            except (ValueError, KeyError):
                raise NotFound(f"model '{self.name}': no version {version!r}, expected one of "
                               f"{sorted(self.versions)}") from None
        else:
            ready = [v for v in self.versions.values() if v.ready]
            if not ready:
                raise Unavailable(f"model '{self.name}' is not ready: {self.reason or self._reasons()}")
            entry = max(ready, key=lambda v: v.version)
        if not entry.ready:
            raise Unavailable(f"model '{self.name}' version {entry.version} is not ready: {entry.reason}")
        return entry

    def _reasons(self) -> str:
        return "; ".join(f"version {v.version}: {v.reason}" for v in self.versions.values()) or "no versions"


class Repository:
    """All models of one directory, loaded once at start-up."""

    def __init__(self, root: Path, options: RuntimeOptions, default_max_batch_size: int,
                 default_queue_delay_us: int):
        self.root = Path(root)
        self.options = options
        self.default_max_batch_size = default_max_batch_size
        self.default_queue_delay_us = default_queue_delay_us
        self.models: dict[str, ModelEntry] = {}
        self.strict_readiness = True  # Triton's --strict-readiness: server ready only while every model is

    def load_all(self) -> None:
        """Load every model; a model that fails is logged and kept as not ready, the others serve."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root}: not a directory")
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entry = self._load_model(model_dir)
            self.models[entry.name] = entry

    def get(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(f"model '{name}' not found, expected one of {sorted(self.models)}") from None

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        return self.get(name).resolve(version)

    def sequence_idle_timeouts(self) -> dict[str, float]:
        """Seconds a sequence of each model may idle, where its config.pbtxt says (sequence_batching)."""
        return {name: m.sequence_idle_us / 1e6 for name, m in self.models.items() if m.sequence_idle_us}

    @property
    def ready(self) -> bool:
        """Server readiness: with strict readiness (Triton's default) every model has a ready version, so a
        broken model makes the server not ready; without it, the server is ready once it serves."""
        return not self.strict_readiness or not self.problems()

    def problems(self) -> list[str]:
        """Why the repository is not wholly ready: one line per model without a ready version."""
        if not self.models:
            return [f"model repository {self.root}: no model directories"]
        return [f"model '{name}': {entry.reason or entry._reasons()}" for name, entry in sorted(self.models.items())
                if not any(v.ready for v in entry.versions.values())]

    def _load_model(self, model_dir: Path) -> ModelEntry:
        name = model_dir.name
        config_path = model_dir / "config.pbtxt"
        config = mc.ModelConfig()
        entry = ModelEntry(name=name, config=config)
        if config_path.exists():
            try:
                text_format.Parse(config_path.read_text(), config)
            except text_format.ParseError as exc:
                entry.reason = f"{config_path}: {exc}"
                log.error("model failed", extra={"fields": {"model": name, "reason": entry.reason}})
                return entry
            if config.name and config.name != name:
                entry.reason = f"{config_path}: name {config.name!r} differs from the directory name {name!r}"
                log.error("model failed", extra={"fields": {"model": name, "reason": entry.reason}})
                return entry
        config.name = name
        filename = config.default_model_filename or "model.onnx"
        versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
        for number in _select_versions(versions, config):
            entry.versions[number] = self._load_version(entry, number, model_dir / str(number) / filename)
        if not entry.versions:
            entry.reason = f"{model_dir}: no numeric version directory with {filename}"
            log.error("model failed", extra={"fields": {"model": name, "reason": entry.reason}})
        self._complete_config(entry)
        return entry

    def _load_version(self, entry: ModelEntry, number: int, path: Path) -> ModelVersion:
        version = ModelVersion(number)
        runtime = ModelRuntime(name=entry.name, version=number, path=path)
        try:
            if not path.exists():
                raise FileNotFoundError(f"{path}: missing")
            check_model_file(path)  # before onnxruntime follows an external-data hard link out of the folder
            runtime.load(self.options, state=_config_state(entry.config))
            check_config(entry.config, runtime)
            check_sequence_batching(entry.config, runtime)
            failure = runtime.self_test()
            if failure:
                raise ValueError(failure)
        except Exception as exc:  # any failure makes this version not ready; the server keeps going
            version.reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.error("model version failed", extra={"fields": {"model": entry.name, "version": number,
                                                                "reason": version.reason}})
            return version
        runtime.ready = True
        version.runtime, version.state = runtime, READY
        return version

    def _complete_config(self, entry: ModelEntry) -> None:
        """Fill what config.pbtxt left out from the graph, and pick the batching limits."""
        config = entry.config
        config.platform = config.platform or PLATFORM
        runtime = next((v.runtime for v in sorted(entry.versions.values(), key=lambda v: -v.version)
                        if v.runtime), None)
        if runtime is None:
            return
        if not config.input and not config.output:
            batchable = all(s.shape and s.shape[0] < 0 for s in runtime.inputs + runtime.outputs)
            config.max_batch_size = self.default_max_batch_size if batchable else 0
            skip = 1 if batchable else 0
            for spec in runtime.inputs:
                config.input.add(name=spec.name, data_type=datatypes.config_name_of(spec.datatype),
                                 dims=spec.shape[skip:], optional=spec.name in runtime.state_inputs)
            for spec in runtime.outputs:
                config.output.add(name=spec.name, data_type=datatypes.config_name_of(spec.datatype),
                                  dims=spec.shape[skip:])
            if batchable:
                config.dynamic_batching.max_queue_delay_microseconds = self.default_queue_delay_us
        entry.max_batch_size = config.max_batch_size
        # As in Triton, requests are merged only when the config asks for a batcher: dynamic_batching, or
        # sequence_batching, whose batches mix the requests of different sequences.
        scheduling = config.WhichOneof("scheduling_choice")
        entry.dynamic_batching = config.max_batch_size > 0 and scheduling is not None
        if scheduling == "sequence_batching":
            seq = config.sequence_batching
            strategy = seq.oldest if seq.WhichOneof("strategy_choice") == "oldest" else seq.direct
            entry.max_queue_delay_us = strategy.max_queue_delay_microseconds
            entry.sequence_idle_us = seq.max_sequence_idle_microseconds or TRITON_SEQUENCE_IDLE_DEFAULT_US
        else:
            entry.max_queue_delay_us = config.dynamic_batching.max_queue_delay_microseconds
        # Report the provider actually chosen, as Triton does with instance_group kind.
        del config.instance_group[:]
        kind = mc.ModelInstanceGroup.KIND_GPU if runtime.provider == "cuda" else mc.ModelInstanceGroup.KIND_CPU
        config.instance_group.add(name=f"{entry.name}_0", kind=kind, count=1)
        config.parameters["execution_provider"].string_value = runtime.provider


def _select_versions(versions: list[int], config: mc.ModelConfig) -> list[int]:
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "latest":
        return versions[-max(1, policy.latest.num_versions):]
    if choice == "specific":
        return [v for v in versions if v in set(policy.specific.versions)]
    return versions  # no policy: every version, as the task asks (Triton's own default is latest 1)


def _config_state(config: mc.ModelConfig) -> list[StatePair]:
    if config.WhichOneof("scheduling_choice") != "sequence_batching":
        return []
    return [StatePair(s.input_name, s.output_name) for s in config.sequence_batching.state]
