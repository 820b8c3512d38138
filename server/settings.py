"""Server settings: one dataclass, each field documented where declared; LSTM_ONNX_* env, then flags override."""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lstm_onnx.contract import MAX_BATCH_SIZE, MAX_QUEUE_DELAY_US

ENV_PREFIX = "LSTM_ONNX_"
PROVIDERS = ("auto", "cpu", "cuda")
LOG_FORMATS = ("kv", "json")
EVENT_LOOPS = ("auto", "asyncio", "uvloop")
BOOLEANS = ("true", "false")  # Triton spells its boolean flags this way


def _setting(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ServerSettings:
    """Everything `lstm-onnx serve` can be told; env var = LSTM_ONNX_ + the field name upper-cased."""

    model_repository: str = _setting("", "Triton-layout model repository: <repo>/<model>/[config.pbtxt], "
                                     "<repo>/<model>/<version>/model.onnx")
    host: str = _setting("127.0.0.1", "address to bind; loopback by default so nothing is exposed by accident")
    grpc_port: int = _setting(8001, "gRPC port (Triton's default); 0 picks a free port")
    http_port: int = _setting(8000, "KServe v2 REST port (Triton's default), beside gRPC on the same event loop and "
                              "scheduler; 0 picks a free port, -1 disables")
    metrics_port: int = _setting(8002, "Prometheus metrics port (Triton's default); 0 picks a free port, -1 disables")
    provider: str = _setting("auto", "onnxruntime execution provider: auto uses CUDA only when it really works",
                             choices=PROVIDERS)
    intra_op_threads: int = _setting(0, "onnxruntime threads inside one operator; 0 lets onnxruntime decide")
    inter_op_threads: int = _setting(0, "onnxruntime threads across operators; 0 lets onnxruntime decide")
    intra_op_spinning: str = _setting("off", "on: idle onnxruntime threads busy-wait for work (lower latency on "
                                      "dedicated cores); off leaves the CPU to the gRPC event loop",
                                      choices=("off", "on"))
    max_run_memory_bytes: int = _setting(1 << 30, "estimated peak memory of one onnxruntime run (from the model's "
                                         "layers, hidden size, directions, rows and longest T); a request that "
                                         "cannot fit alone is refused with RESOURCE_EXHAUSTED, and requests are "
                                         "never merged above it. 1 GiB: the default hidden-32, 2-layer LSTM takes "
                                         "~800 bytes per row per step, so one row fits 1.3M steps and 64 rows "
                                         "20k; a [64, 50000, 1] request (2.6 GB) is refused. See "
                                         "docs/reliability.md, Limits")
    cpu_memory_arena: str = _setting("off", "onnxruntime's CPU memory arena: on keeps the peak of the largest run "
                                     "resident for good (a 2.5 GB run leaves 2.5 GB); off returns each run's "
                                     "memory, at no measurable cost on small requests", choices=("off", "on"))
    executor_threads: int = _setting(4, "threads that run onnxruntime off the event loop (all models together)")
    max_message_bytes: int = _setting(64 * 1024 * 1024, "largest gRPC message in either direction, and "
                                      "largest REST request body; "
                                      "gRPC's 4 MiB default is too small for a batch of long sequences")
    max_model_bytes: int = _setting(4 << 30, "largest model version: model.onnx plus its external data, checked "
                                    "from the file sizes and declared lengths before anything is read")
    max_batch_size: int = _setting(8, "dynamic batching: most rows merged into one run, when config.pbtxt "
                                   "does not say (its max_batch_size wins)")
    max_queue_delay_us: int = _setting(500, "dynamic batching: longest wait for more requests while the model is "
                                       "busy, when config.pbtxt's dynamic_batching does not say; an idle model "
                                       "runs at once")
    sequence_idle_timeout_s: float = _setting(60.0, "a sequence with no request for this long is forgotten, when "
                                              "config.pbtxt has no sequence_batching (its idle timeout wins)")
    max_sequences: int = _setting(1024, "most live sequences over all models in one server process (per worker "
                                  "with --workers: a connection's sequences live on its worker; with a redis:// "
                                  "sequence store, over all replicas together); a new one beyond it is refused")
    max_sequences_per_client: int = _setting(0, "most live sequences one client may hold (a client: its TLS "
                                             "certificate's identity, else its IP address), so one client cannot "
                                             "hold every slot; 0 means a quarter of max_sequences (per worker; "
                                             "with a redis:// sequence store, over all replicas together)")
    max_queued_requests_per_model: int = _setting(512, "most requests one model holds at once, waiting or running "
                                                  "(per worker); one more is refused with RESOURCE_EXHAUSTED "
                                                  "(REST 429), never queued without limit")
    max_queued_requests: int = _setting(2048, "most requests held at once over all models, waiting or running "
                                        "(per worker); one more is refused with RESOURCE_EXHAUSTED (REST 429)")
    max_queued_bytes_per_model: int = _setting(256 << 20, "most request bytes (the whole message as received, "
                                               "parameters included) one model holds at once, waiting or running "
                                               "(per worker); one more is refused with RESOURCE_EXHAUSTED (REST 429)")
    max_queued_bytes: int = _setting(1 << 30, "most request bytes held at once over all models, waiting or running "
                                     "(per worker); one more is refused with RESOURCE_EXHAUSTED (REST 429)")
    sequence_store: str = _setting("memory", "where sequence state lives: memory (this process) or "
                                   "redis://HOST:PORT/DB, rediss:// for TLS (password from env "
                                   "LSTM_ONNX_SEQUENCE_STORE_PASSWORD): shared by replicas and workers, survives "
                                   "restarts; see docs/scale-out.md")
    sequence_store_copies: str = _setting("false", "with a redis:// sequence store, true lets a replica continue a "
                                          "sequence whose last step it wrote from its own copy of that state, with "
                                          "no read, while Redis (CLIENT TRACKING) has not told it another process "
                                          "wrote the key (one round trip a step instead of two); opt-in: see "
                                          "docs/scale-out.md for the stale copy seen under CPU load")
    request_timeout_s: float = _setting(60.0, "longest one request may spend in the server (queue and run) before it "
                                        "gets DEADLINE_EXCEEDED; 0 means no limit")
    max_concurrent_streams: int = _setting(256, "most ModelStreamInfer streams open at once in one server process "
                                           "(per worker with --workers: N workers take N times this); one more is "
                                           "refused with RESOURCE_EXHAUSTED")
    max_streams_per_client: int = _setting(0, "most ModelStreamInfer streams one client may hold open (a client: "
                                           "its TLS certificate's identity, else its IP address); 0 means a "
                                           "quarter of max_concurrent_streams (per worker)")
    stream_idle_timeout_s: float = _setting(60.0, "a ModelStreamInfer stream that sends no request for this long "
                                            "(none of its requests running) is ended with DEADLINE_EXCEEDED, "
                                            "freeing its slot; 0 means no limit")
    http_max_connections: int = _setting(1024, "most HTTP connections open at once on the REST port; one more is "
                                         "answered 503 and closed")
    http_max_header_bytes: int = _setting(8190, "longest HTTP request line or header field; a longer one is refused "
                                          "with 400 (431 for a header)")
    http_client_timeout_s: float = _setting(30.0, "an HTTP client must send a request's headers, and then its body, "
                                            "within this many seconds; an idle keep-alive connection closes after it")
    tls_cert: str = _setting("", "PEM certificate chain for the gRPC and REST ports; with --tls-key, serves TLS instead of "
                             "plaintext")
    tls_key: str = _setting("", "PEM private key of --tls-cert")
    tls_client_ca: str = _setting("", "PEM CA bundle; when set, every client must present a certificate it signed "
                                  "(mutual TLS)")
    workers: int = _setting(1, "server processes sharing the gRPC port (SO_REUSEPORT, Linux): a connection, and "
                            "so every stream and sequence on it, stays on one process; worker i serves metrics on "
                            "metrics-port + i (0: a free port each, -1: none); SIGTERM drains them all")
    event_loop: str = _setting("auto", "event loop under grpc.aio: auto uses uvloop when it is installed (cheaper "
                               "per request), else asyncio's own", choices=EVENT_LOOPS)
    exit_on_error: str = _setting("true", "as in Triton: an empty repository or a model that fails to load ends "
                                  "start-up with one line and exit 1; false serves the models that loaded",
                                  choices=BOOLEANS)
    strict_readiness: str = _setting("true", "as in Triton: ServerReady and health say ready only while every model "
                                     "is ready; false: ready as soon as the server serves", choices=BOOLEANS)
    grace_period_s: float = _setting(10.0, "on SIGTERM/SIGINT, how long in-flight requests get to finish")
    log_format: str = _setting("kv", "log lines on stderr: kv (key=value) or json", choices=LOG_FORMATS)
    log_level: str = _setting("INFO", "logging level (DEBUG, INFO, WARNING, ERROR)")

    def validate(self) -> "ServerSettings":
        """Raise ValueError naming the first setting that is out of range."""
        if not self.model_repository:
            raise ValueError("model_repository: got nothing, expected a directory (--model-repository or "
                             f"{ENV_PREFIX}MODEL_REPOSITORY)")
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider: got {self.provider!r}, expected one of {', '.join(PROVIDERS)}")
        for name in ("intra_op_spinning", "cpu_memory_arena"):
            if getattr(self, name) not in ("off", "on"):
                raise ValueError(f"{name}: got {getattr(self, name)!r}, expected off or on")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"event_loop: got {self.event_loop!r}, expected one of {', '.join(EVENT_LOOPS)}")
        for name in ("exit_on_error", "strict_readiness", "sequence_store_copies"):
            if getattr(self, name) not in BOOLEANS:
                raise ValueError(f"{name}: got {getattr(self, name)!r}, expected true or false")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format: got {self.log_format!r}, expected one of {', '.join(LOG_FORMATS)}")
        for name in ("grpc_port", "http_port", "metrics_port"):
            value = getattr(self, name)
            if not -1 <= value <= 65535 or (name == "grpc_port" and value < 0):
                raise ValueError(f"{name}: got {value}, expected a port number 0..65535")
        if bool(self.tls_cert) != bool(self.tls_key) or (self.tls_client_ca and not self.tls_cert):
            raise ValueError(f"tls: got cert {self.tls_cert!r}, key {self.tls_key!r}, client CA "
                             f"{self.tls_client_ca!r}; expected cert and key together (and a client CA only with them)")
        if self.stream_idle_timeout_s < 0:
            raise ValueError(f"stream_idle_timeout_s: got {self.stream_idle_timeout_s}, expected 0 (no limit) or more")
        for name, total in (("max_sequences_per_client", "max_sequences"),
                            ("max_streams_per_client", "max_concurrent_streams")):
            if not 0 <= getattr(self, name) <= getattr(self, total):
                raise ValueError(f"{name}: got {getattr(self, name)}, expected 0..{getattr(self, total)} "
                                 f"({total}; 0 means a quarter of it)")
        if self.sequence_store != "memory" and not self.sequence_store.startswith(("redis://", "rediss://")):
            raise ValueError(f"sequence_store: got {self.sequence_store!r}, expected memory, redis://HOST:PORT/DB "
                             "or rediss://HOST:PORT/DB")
        if self.request_timeout_s < 0:
            raise ValueError(f"request_timeout_s: got {self.request_timeout_s}, expected 0 (no limit) or more")
        for name in ("executor_threads", "max_run_memory_bytes", "max_message_bytes", "max_model_bytes",
                     "max_batch_size", "max_sequences", "max_concurrent_streams", "workers", "http_max_connections",
                     "http_max_header_bytes", "max_queued_requests_per_model", "max_queued_requests",
                     "max_queued_bytes_per_model", "max_queued_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected at least 1")
        for name in ("intra_op_threads", "inter_op_threads", "max_queue_delay_us"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected 0 or more")
        for name, top in (("max_batch_size", MAX_BATCH_SIZE), ("max_queue_delay_us", MAX_QUEUE_DELAY_US)):
            if getattr(self, name) > top:  # the same ranges as a config.pbtxt value (lstm_onnx.contract)
                raise ValueError(f"{name}: got {getattr(self, name)}, expected at most {top}")
        if self.http_client_timeout_s <= 0:
            raise ValueError(f"http_client_timeout_s: got {self.http_client_timeout_s}, expected more than 0")
        if self.sequence_idle_timeout_s <= 0 or self.grace_period_s < 0:
            raise ValueError("sequence_idle_timeout_s must be > 0 and grace_period_s >= 0, got "
                             f"{self.sequence_idle_timeout_s} and {self.grace_period_s}")
        return self

    @property
    def sequences_per_client(self) -> int:
        """A client's share of the sequence slots: max_sequences_per_client, or a quarter of max_sequences."""
        return self.max_sequences_per_client or max(1, self.max_sequences // 4)

    @property
    def streams_per_client(self) -> int:
        """A client's share of the stream slots: max_streams_per_client, or a quarter of max_concurrent_streams."""
        return self.max_streams_per_client or max(1, self.max_concurrent_streams // 4)


def env_name(field_name: str) -> str:
    """The environment variable of a setting: model_repository -> LSTM_ONNX_MODEL_REPOSITORY."""
    return ENV_PREFIX + field_name.upper()


def _convert(f: dataclasses.Field, raw: str) -> Any:
    kind = type(f.default)
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{env_name(f.name)}: got {raw!r}, expected {kind.__name__}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one --flag per setting; defaults are None so that only flags given override the environment."""
    for f in dataclasses.fields(ServerSettings):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (env {env_name(f.name)}, default {f.default!r})"
        parser.add_argument(flag, dest=f.name, type=type(f.default), default=None,
                            choices=f.metadata.get("choices"), help=help_text)


def load_settings(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Defaults, then LSTM_ONNX_* variables, then flags; validated."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServerSettings):
        if env_name(f.name) in environ:
            values[f.name] = _convert(f, environ[env_name(f.name)])
        flag_value = getattr(args, f.name, None) if args is not None else None
        if flag_value is not None:
            values[f.name] = flag_value
    return ServerSettings(**values).validate()
