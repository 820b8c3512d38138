"""The model repository: scan a Triton-layout directory, read config.pbtxt, load every version, self-test."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from lstm_onnx.protocol import datatypes
from lstm_onnx.protocol.errors import NotFound, Unavailable, clip
from lstm_onnx.protos import model_config_pb2 as mc

from .config_rules import (
    PLATFORM,
    ConfigError,
    check_config,
    check_ranges,
    check_sequence_batching,
    model_filename,
    read_config,
)
from .model_file import DEFAULT_MAX_MODEL_BYTES, ModelFileError, check_model_file
from .runtime import ModelRuntime, RuntimeOptions, StatePair

log = logging.getLogger("lstm_onnx.server")

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
INT64_MAX = 2**63 - 1  # versions travel as int64 in Triton's protocol
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
                raise NotFound(f"model '{self.name}': no version {clip(version)!r}, expected one of "
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
                 default_queue_delay_us: int, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES):
        self.root = Path(root)
        self.max_model_bytes = max_model_bytes  # model.onnx plus its external data, per version
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
            name = os.fsencode(model_dir.name).decode("utf-8", "backslashreplace")
            if name != model_dir.name:  # the protocol carries names as UTF-8: this one cannot travel as it is
                entry = ModelEntry(name=name, config=mc.ModelConfig(name=name),
                                   reason=f"model folder '{name}': its name is not UTF-8, expected a UTF-8 name")
                log.error("model failed", extra={"fields": {"model": name, "reason": entry.reason}})
            else:
                entry = self._load_or_fail(model_dir)
            self.models[entry.name] = entry

    def _load_or_fail(self, model_dir: Path) -> ModelEntry:
        try:
            return self._load_model(model_dir)
        except Exception as exc:  # a bug or an entry no check foresaw: it fails alone, start-up goes on
            log.exception("model failed", extra={"fields": {"model": model_dir.name}})
            return ModelEntry(name=model_dir.name, config=mc.ModelConfig(name=model_dir.name),
                              reason=f"{model_dir}: {type(exc).__name__}: {exc}".splitlines()[0])

    def get(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(f"model '{clip(name)}' not found, expected one of {sorted(self.models)}") from None

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
        entry = ModelEntry(name=name, config=mc.ModelConfig())
        config_path = model_dir / "config.pbtxt"
        try:
            entry.config = config = read_config(config_path)
            if config.name and config.name != name:
                raise ConfigError(f"{config_path}: name {config.name!r} differs from the directory name {name!r}")
            check_ranges(config)
            filename = model_filename(config)
        except (ConfigError, ModelFileError) as exc:
            entry.reason = str(exc)
            log.error("model failed", extra={"fields": {"model": name, "reason": entry.reason}})
            return entry
        config.name = name
        folders, ignored = _version_folders(name, model_dir)
        for number in _select_versions(sorted(folders), config):
            entry.versions[number] = self._load_version(entry, number, folders[number] / filename, model_dir)
        if not entry.versions:
            entry.reason = (f"{model_dir}: no version folder with {filename}, expected folders named by ASCII digits "
                            "(1, 2, ...)" + (f"; ignored {', '.join(ignored)}" if ignored else ""))
            log.error("model failed", extra={"fields": {"model": name, "reason": entry.reason}})
        self._complete_config(entry)
        return entry

    def _load_version(self, entry: ModelEntry, number: int, path: Path, model_dir: Path) -> ModelVersion:
        version = ModelVersion(number)
        runtime = ModelRuntime(name=entry.name, version=number, path=path)
        try:
            if not path.exists():
                raise FileNotFoundError(f"{path}: missing")
            # Before onnxruntime opens a FIFO, reads a sparse gigabyte, or follows a link out of the folder.
            check_model_file(path, model_dir, self.max_model_bytes)
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


def _version_folders(name: str, model_dir: Path) -> tuple[dict[int, Path], list[str]]:
    """The version folders by number, and the folders that look numbered but are ignored (as Triton does),
    each with why: str.isdigit() takes digits int() reads differently or not at all ('²', '١')."""
    folders: dict[int, Path] = {}
    ignored: list[str] = []
    for path in sorted(model_dir.iterdir()):
        if not path.name.isdigit() or not path.is_dir():
            continue
        if not path.name.isascii():
            why = "not ASCII digits"
        elif int(path.name) > INT64_MAX:
            why = f"above {INT64_MAX}, the largest version"
        elif int(path.name) in folders:
            why = f"version {int(path.name)} again, after {folders[int(path.name)].name!r}"
        else:
            folders[int(path.name)] = path
            continue
        ignored.append(f"{path.name!r} ({why})")
        log.warning("version folder ignored", extra={"fields": {"model": name, "folder": path.name, "why": why}})
    return folders, ignored


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
