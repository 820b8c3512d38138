"""docker-compose.yml agrees with the code: CLI commands, settings, ports, images, volumes; v1 validates it."""
from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import missing_tool, require_module

ROOT = Path(__file__).resolve().parent.parent
yaml = require_module("yaml", "PyYAML is not installed (the test extra)")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _commands(service: dict) -> list[list[str]]:
    """Every `lstm-onnx ...` invocation a service runs, as argv lists."""
    command = service.get("command", [])
    if service.get("entrypoint", [None])[0] == "sh":
        script = " ".join(command)
        return [shlex.split(part.split(">")[0]) for part in re.split(r"&&", script) if "lstm-onnx" in part]
    return [["lstm-onnx", *command]]


def test_services_images_and_dockerfiles(compose):
    services = compose["services"]
    assert {"pipeline", "server", "server-gpu"} <= set(services)
    assert services["server-gpu"]["profiles"] == ["gpu"]
    for service in services.values():
        if "build" in service:  # ours; redis is the published image
            assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert services["redis"]["image"].startswith("redis:")
    server_docker = (ROOT / services["server"]["build"]["dockerfile"]).read_text()
    assert '".[serve,${EXTRA}]"' in server_docker and "train" not in server_docker.split("RUN", 1)[1].split("\n")[0]
    assert '".[train,cpu]"' in (ROOT / services["pipeline"]["build"]["dockerfile"]).read_text()
    assert services["server"]["build"]["args"]["EXTRA"] == "cpu"
    assert services["server-gpu"]["build"]["args"]["EXTRA"] == "gpu"
    devices = services["server-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for name in ("server", "server-2", "server-gpu"):
        assert "healthcheck" in services[name]
    assert services["server-2"]["image"] == services["server"]["image"]


def test_every_command_parses_with_the_real_cli(compose):
    from lstm_onnx.cli import build_parser

    parser = build_parser()
    seen = set()
    for service in compose["services"].values():
        if "build" not in service:
            continue  # not our image (redis)
        for argv in _commands(service):
            assert argv[0] == "lstm-onnx"
            args = parser.parse_args(argv[1:])  # SystemExit (a failure) on an unknown command or flag
            seen.add(args.command)
    assert {"train", "export", "verify", "audit", "serve"} <= seen


def test_env_vars_are_real_settings_and_ports_match_defaults(compose):
    from lstm_onnx.server.settings import ServerSettings, env_name

    defaults = ServerSettings()
    names = {env_name(f.name) for f in dataclasses.fields(ServerSettings)}
    for name in ("server", "server-2", "server-gpu"):
        service = compose["services"][name]
        env = service["environment"]
        assert set(env) <= names, set(env) - names
        assert int(env["LSTM_ONNX_GRPC_PORT"]) == defaults.grpc_port == 8001
        assert int(env["LSTM_ONNX_METRICS_PORT"]) == defaults.metrics_port == 8002
        assert int(env["LSTM_ONNX_HTTP_PORT"]) == defaults.http_port == 8000
        container_ports = {int(p.rsplit(":", 1)[1]) for p in service["ports"]}
        assert container_ports == {defaults.http_port, defaults.grpc_port, defaults.metrics_port}
        assert all(p.startswith("127.0.0.1:") for p in service["ports"])  # published on loopback only
        assert "127.0.0.1:8001" in " ".join(service["healthcheck"]["test"])
        repo = env["LSTM_ONNX_MODEL_REPOSITORY"]
        assert f"models:{repo}:ro" in service["volumes"]


def test_two_replicas_share_sequences_through_the_redis_service(compose):
    from lstm_onnx.server.settings import ServerSettings

    services = compose["services"]
    command = services["redis"]["command"]
    port = int(command[command.index("--port") + 1])
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no"
    published = set()
    for name in ("server", "server-2"):
        env = services[name]["environment"]
        store = ServerSettings(model_repository="/models", sequence_store=env["LSTM_ONNX_SEQUENCE_STORE"]).validate()
        assert store.sequence_store == f"redis://redis:{port}/0"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        published |= {p.rsplit(":", 1)[0] for p in services[name]["ports"]}
    assert len(published) == 6  # the two replicas publish different host ports


def test_pipeline_writes_where_the_server_reads(compose):
    pipeline = compose["services"]["pipeline"]
    export = next(argv for argv in _commands(pipeline) if argv[1] == "export")
    repo = export[export.index("--repository") + 1]
    assert f"models:{repo}" in pipeline["volumes"]
    assert compose["services"]["server"]["environment"]["LSTM_ONNX_MODEL_REPOSITORY"] == repo
    assert set(compose["volumes"]) >= {"models"}
    assert compose["services"]["server"]["depends_on"]["pipeline"]["condition"] == "service_completed_successfully"


def test_docker_compose_v1_validates_the_file():
    binary = shutil.which("docker-compose")
    if binary is None:
        missing_tool("docker-compose (v1) is not on PATH; .ci/run installs it")
    run = lambda *extra: subprocess.run([binary, "-f", "docker-compose.yml", *extra, "config", "-q"], cwd=ROOT,
                                        capture_output=True, text=True, timeout=120)
    result = run()
    assert result.returncode == 0, result.stderr
    if "--profile" in subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60).stdout:
        result = run("--profile", "gpu")
        assert result.returncode == 0, result.stderr
