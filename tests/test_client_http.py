"""The REST side of our client: HttpInferenceClient, `infer`/`stream`/`bench --protocol http`, the REST load
generator, and KServe's own Python REST client, against the real server on port 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import missing_tool
from server_models import sample_input

MODEL = "tiny_lstm"


@pytest.fixture(scope="module")
def server(tiny_repository):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, http_port=0, metrics_port=-1)
    with BackgroundServer(settings) as srv:
        yield srv


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_client_answers_as_the_grpc_client_does(server, binary):
    from lstm_onnx.client.client import InferenceClient, split_time
    from lstm_onnx.client.http_client import HttpInferenceClient

    x = sample_input(2, 9, seed=21)
    with HttpInferenceClient(server.http_url, binary=binary) as rest, InferenceClient(server.url) as grpc_client:
        assert rest.metadata(MODEL) == grpc_client.metadata(MODEL)
        assert rest.optional_inputs(MODEL) == grpc_client.optional_inputs(MODEL) == {"h0", "c0"}
        assert rest.ready() and grpc_client.ready()
        got = rest.infer(MODEL, {"input": x}, outputs=["hn", "output"])
        want = grpc_client.infer(MODEL, {"input": x}, outputs=["hn", "output"])
        assert list(got) == ["hn", "output"]
        chunks = [{"input": c} for c in split_time(x, 4)]
        streamed = list(rest.stream_sequence(MODEL, chunks, f"rest-{binary}"))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    np.testing.assert_allclose(streamed[-1]["output"], want["output"], atol=1e-5, rtol=0)


def test_http_client_errors_carry_the_status_and_the_server_text(server):
    from lstm_onnx.client.http_client import HttpClientError, HttpInferenceClient

    with HttpInferenceClient(server.http_url) as rest:
        with pytest.raises(HttpClientError) as info:
            rest.infer("nope", {"input": sample_input(1, 2)})
    assert info.value.code == 404 and str(info.value).startswith("HTTP 404: model 'nope' not found")


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lstm_onnx", *argv], capture_output=True, text=True, timeout=120)


def test_infer_and_stream_commands_take_protocol_http(server, tmp_path):
    x = sample_input(1, 6, seed=2)
    np.save(tmp_path / "x.npy", x)
    common = ["--protocol", "http", "--url", server.http_url, "--model", MODEL, "--json"]
    infer = _cli("infer", *common, "--input", str(tmp_path / "x.npy"))
    assert infer.returncode == 0, infer.stderr
    stream = _cli("stream", *common, "--input", str(tmp_path / "x.npy"), "--chunk", "4", "--sequence-id", "s1")
    assert stream.returncode == 0, stream.stderr
    chunks = [json.loads(line) for line in stream.stdout.splitlines()]
    whole = json.loads(infer.stdout)["outputs"]["output"]["data"]
    assert [c["steps"] for c in chunks] == [4, 2]
    np.testing.assert_allclose(chunks[-1]["outputs"]["output"]["data"], whole, atol=1e-5)
    refused = _cli("infer", "--protocol", "http", "--url", server.http_url, "--model", "nope", "--random", "1,2")
    assert refused.returncode == 1 and "HTTP 404: model 'nope' not found" in refused.stderr


def test_bench_reports_grpc_and_http_rows_with_checked_answers(server, tiny_repository):
    result = _cli("bench", "--protocol", "grpc,http", "--url", server.url, "--http-url", server.http_url,
                  "--model", MODEL, "--time", "3", "--concurrency", "1,4", "--requests", "40", "--seconds", "10",
                  "--check-every", "4", "--model-repository", str(tiny_repository), "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["protocol"], r["concurrency"]) for r in rows] == [("grpc", 1), ("grpc", 4), ("http-binary", 1),
                                                                  ("http-binary", 4)]
    for row in rows:
        assert row["errors"] == 0 and row["checked"] > 0 and row["mismatches"] == 0, row


def test_http_load_generator_flags_answers_of_a_wrong_model(server, tiny_repository):
    import asyncio

    from lstm_onnx.client import http_loadgen, loadgen

    async def go():
        async with http_loadgen.open_session(2) as session:
            metadata, optional = await http_loadgen.fetch_inputs_spec(session, server.http_url, MODEL)
            payloads = http_loadgen.make_payloads(metadata, optional, 2, [3, 5], binary=False)
            result, samples = await http_loadgen.run_level(session, server.http_url, MODEL, payloads, 2, 12, 30.0,
                                                           check_every=1, warmup=0)
        loadgen.check_answers(result, samples, [p.inputs for p in payloads],
                              tiny_repository / "tiny_gru" / "1" / "model.onnx")
        return result

    result = asyncio.run(go())
    assert result.errors == 0 and result.checked == 12 and result.mismatches == 12


KSERVE_VENV = Path(os.environ.get("LSTM_ONNX_KSERVE_VENV", "/tmp/kserve-venv"))
KSERVE_SCRIPT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, RESTConfig, InferRequest, InferInput

async def main(base):
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    try:
        x = np.array(json.loads(sys.argv[2]), dtype=np.float32)
        out = {"live": await client.is_server_live(base), "ready": await client.is_server_ready(base),
               "model_ready": await client.is_model_ready(base, "tiny_lstm")}
        for binary in (False, True):
            tensor = InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            response = await client.infer(base, InferRequest("tiny_lstm", [tensor], request_id="k1"), "tiny_lstm")
            out["binary" if binary else "json"] = {o.name: o.as_numpy().tolist() for o in response.outputs}
        try:
            await client.infer(base, InferRequest("nope", [tensor]), "nope")
        except Exception as exc:
            out["error"] = str(exc)
        print(json.dumps(out))
    finally:
        await client.close()

asyncio.run(main(sys.argv[1]))
"""


def test_kserve_rest_client_reads_health_and_infers_json_and_binary(server):
    python = KSERVE_VENV / "bin" / "python"
    if not python.exists():
        missing_tool(f"KServe's client needs its own venv ({KSERVE_VENV}; LSTM_ONNX_KSERVE_VENV): kserve pins "
                    "protobuf<7 and pulls in kubernetes, fastapi and pandas, so it is not in the test extra "
                    "(make kserve-venv installs it)")
    x = sample_input(2, 4, seed=8)
    result = subprocess.run([str(python), "-c", KSERVE_SCRIPT, f"http://{server.http_url}", json.dumps(x.tolist())],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert out["live"] is True and out["ready"] is True and out["model_ready"] is True
    from lstm_onnx.client.http_client import HttpInferenceClient

    with HttpInferenceClient(server.http_url) as rest:
        want = rest.infer(MODEL, {"input": x})
    for kind in ("json", "binary"):
        for name in want:
            np.testing.assert_array_equal(np.asarray(out[kind][name], np.float32), want[name], err_msg=f"{kind} {name}")
    assert "model 'nope' not found" in out["error"] and "404" in out["error"]
