"""deploy/ agrees with the published schemas and with the code: Kubernetes kinds by kubernetes-validate, KServe's by
its CRD schema (vendored, tests/data/kserve), and images, ports, probes, flags and memory by our own settings."""
from __future__ import annotations

import copy
import dataclasses
import gzip
import json
import shlex
from pathlib import Path

import pytest
from conftest import require_module

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30"  # the oldest Kubernetes these manifests target (native gRPC probes are GA since 1.27)
yaml = require_module("yaml", "PyYAML is not installed (the test extra)")
kubernetes_validate = require_module("kubernetes_validate", "kubernetes-validate is not installed (the test extra)")
jsonschema = require_module("jsonschema", "jsonschema is not installed (the test extra)")


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((str(path.relative_to(ROOT)), doc))
    return docs


DOCS = _documents()


def _one(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _kserve_schema(kind: str) -> dict:
    files = {"InferenceService": "inferenceservices.v1beta1", "ServingRuntime": "servingruntimes.v1alpha1"}
    with gzip.open(ROOT / "tests" / "data" / "kserve" / f"{files[kind]}.schema.json.gz") as f:
        return json.load(f)


def _validate(doc: dict) -> None:
    """Raise on a document its published schema rejects."""
    if doc["apiVersion"].startswith("serving.kserve.io/"):
        wrapper = _kserve_schema(doc["kind"])
        assert doc["apiVersion"] == f"{wrapper['group']}/{wrapper['version']}"
        jsonschema.validate(doc, wrapper["openAPIV3Schema"])
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_deploy_has_every_kind_the_scale_out_needs():
    kinds = sorted({d["kind"] for _, d in DOCS})
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "InferenceService", "Job", "PersistentVolumeClaim",
                     "PodDisruptionBudget", "Service", "ServingRuntime"]


@pytest.mark.parametrize("where,doc", DOCS, ids=[f"{w}:{d['kind']}/{d['metadata']['name']}" for w, d in DOCS])
def test_every_manifest_validates_against_its_published_schema(where, doc):
    _validate(doc)


@pytest.mark.parametrize("kind,name,path,bad", [
    ("Deployment", "lstm-onnx", ["spec", "replicas"], "two"),
    ("Service", "lstm-onnx", ["spec", "ports", 0, "port"], "eight-thousand"),
    ("ServingRuntime", "lstm-onnx", ["spec", "protocolVersions"], "v2"),
    ("InferenceService", "lstm-onnx", ["spec", "predictor", "minReplicas"], "two"),
])
def test_the_validators_reject_a_broken_manifest(kind, name, path, bad):
    doc = copy.deepcopy(_one(kind, name))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        _validate(doc)


def _container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0] if doc["kind"] in ("Deployment", "Job") \
        else doc["spec"]["containers"][0]


def _flags_parse(argv: list[str]):
    from lstm_onnx.cli import build_parser

    return build_parser().parse_args(argv)  # SystemExit on an unknown command or flag


def test_server_deployment_matches_the_code_settings_and_compose():
    from lstm_onnx.server.settings import ServerSettings, env_name

    defaults = ServerSettings()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    deployment = _one("Deployment", "lstm-onnx")
    container = _container(deployment)
    assert container["image"] == compose["services"]["server"]["image"]
    assert _flags_parse(container["args"]).command == "serve"
    env = {e["name"]: e.get("value") for e in container["env"]}
    names = {env_name(f.name) for f in dataclasses.fields(ServerSettings)} | {"LSTM_ONNX_SEQUENCE_STORE_PASSWORD"}
    assert set(env) <= names, set(env) - names
    settings = ServerSettings(**{f.name: type(f.default)(env[env_name(f.name)]) for f in dataclasses.fields(
        ServerSettings) if env_name(f.name) in env}).validate()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": defaults.http_port, "grpc": defaults.grpc_port, "metrics": defaults.metrics_port}
    assert (settings.http_port, settings.grpc_port, settings.metrics_port) == (8000, 8001, 8002)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": settings.grpc_port}  # native grpc.health.v1, server-wide
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings.grace_period_s
    mount = container["volumeMounts"][0]
    assert mount["mountPath"] == settings.model_repository and mount["readOnly"]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(settings.metrics_port)
    # The store: the Redis Service of redis.yaml, by name and port.
    redis_service = _one("Service", "lstm-onnx-redis")
    assert settings.sequence_store == f"redis://{redis_service['metadata']['name']}:" \
                                      f"{redis_service['spec']['ports'][0]['port']}/0"
    password = next(e for e in container["env"] if e["name"] == "LSTM_ONNX_SEQUENCE_STORE_PASSWORD")
    from lstm_onnx.server.redis_store import PASSWORD_ENV

    assert password["name"] == PASSWORD_ENV and password["valueFrom"]["secretKeyRef"]["optional"] is True


def test_service_hpa_and_pdb_point_at_the_server_pods():
    deployment = _one("Deployment", "lstm-onnx")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = _one("Service", "lstm-onnx")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("http", 8000, "http"), ("grpc", 8001, "grpc"), ("metrics", 8002, "metrics")}
    hpa = _one("HorizontalPodAutoscaler", "lstm-onnx")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lstm-onnx"}
    assert hpa["spec"]["minReplicas"] >= 2  # a PDB of minAvailable 1 needs a second replica to drain one
    pdb = _one("PodDisruptionBudget", "lstm-onnx")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    redis = _one("Deployment", "lstm-onnx-redis")
    assert _one("Service", "lstm-onnx-redis")["spec"]["selector"].items() <= \
        redis["spec"]["template"]["metadata"]["labels"].items()
    args = _container(redis)["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"


def test_pipeline_job_runs_real_commands_into_the_claim_the_server_reads():
    job = _one("Job", "lstm-onnx-pipeline")
    container = _container(job)
    script = " ".join(container["args"])
    commands = [shlex.split(part) for part in script.split("&&")]
    assert [c[1] for c in commands] == ["train", "export", "verify"]
    for argv in commands:
        _flags_parse(argv[1:])
    claim = job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    server = _one("Deployment", "lstm-onnx")["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]
    assert claim == server["claimName"] == _one("PersistentVolumeClaim", claim)["metadata"]["name"]
    export = commands[1]
    assert export[export.index("--repository") + 1] == container["volumeMounts"][0]["mountPath"]


def test_kserve_runtime_and_inference_services_match_the_code():
    from lstm_onnx.server.settings import ServerSettings

    runtime = _one("ServingRuntime", "lstm-onnx")
    assert {"name": "onnx", "version": "1", "autoSelect": False} in runtime["spec"]["supportedModelFormats"]
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    container = _container(runtime)
    assert container["image"] == _container(_one("Deployment", "lstm-onnx"))["image"]
    args = _flags_parse(container["args"])
    assert args.model_repository == "/mnt/models"  # where KServe's storage initializer puts storageUri
    assert (args.http_port, args.grpc_port) == (8080, 9000)  # KServe's ports, as its Triton runtime's
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(ServerSettings().metrics_port)
    ours = _one("InferenceService", "lstm-onnx")["spec"]["predictor"]
    assert ours["model"]["runtime"] == runtime["metadata"]["name"]
    assert ours["model"]["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert ours["model"]["protocolVersion"] in runtime["spec"]["protocolVersions"]
    triton = _one("InferenceService", "lstm-onnx-triton")["spec"]["predictor"]
    assert triton["model"]["runtime"] == "kserve-tritonserver"  # KServe's own ClusterServingRuntime
    assert triton["model"]["storageUri"] == ours["model"]["storageUri"]  # the same repository
    assert triton["maxReplicas"] == 1  # Triton's sequences live in one process (triton-inference-server/server#7360)
    assert triton["model"]["ports"] == [{"name": "h2c", "containerPort": 9000, "protocol": "TCP"}]


def test_server_memory_stays_under_the_manifest_request(tiny_repository):
    """The request is what a replica really needs: the real server, loaded and under load, measured here."""
    import threading
    import time

    from server_models import sample_input
    from test_scale_out import Replica

    from lstm_onnx.client.client import InferenceClient

    memory = _container(_one("Deployment", "lstm-onnx"))["resources"]
    request_mib = int(memory["requests"]["memory"].removesuffix("Mi"))
    limit_mib = int(memory["limits"]["memory"].removesuffix("Mi"))
    replica = Replica(tiny_repository, "memory")
    try:
        def load():
            with InferenceClient(replica.url) as client:
                for _ in range(20):
                    client.infer("tiny_lstm", {"input": sample_input(8, 200)})

        threads = [threading.Thread(target=load) for _ in range(8)]
        for t in threads:
            t.start()
        peak = 0
        while any(t.is_alive() for t in threads):
            status = Path(f"/proc/{replica.proc.pid}/status").read_text()
            peak = max(peak, int(status.split("VmRSS:")[1].split()[0]) // 1024)
            time.sleep(0.02)
    finally:
        replica.stop()
    assert peak < request_mib <= limit_mib, f"peak RSS {peak} MiB, request {request_mib} MiB, limit {limit_mib} MiB"
    assert request_mib < 4 * peak, f"request {request_mib} MiB is far above the measured {peak} MiB"
