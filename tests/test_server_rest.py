"""KServe v2 REST on the real server (port 0): tritonclient.http unchanged, plain httpx on every endpoint and
error status, a generated malformed-body suite, and gRPC + REST sharing one scheduler."""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import grpc
import httpx
import numpy as np
import orjson
import pytest
from server_models import build_repository, sample_input

MODEL = "tiny_lstm"


@pytest.fixture(scope="module")
def server(tiny_repository, tmp_path_factory):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    repo = build_repository(tiny_repository, tmp_path_factory.mktemp("rest") / "repo")
    settings = ServerSettings(model_repository=str(repo), grpc_port=0, http_port=0, metrics_port=0,
                              executor_threads=1, exit_on_error="false")  # "broken" beside good models
    with BackgroundServer(settings) as srv:
        srv.repo = repo
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"http://{server.http_url}", timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def triton_http(server):
    import tritonclient.http as th

    client = th.InferenceServerClient(server.http_url)
    yield client
    client.close()


def _alone(server, x, h0=None, c0=None, model=MODEL):
    runtime = server.running.repository.resolve(model).runtime
    zeros = np.zeros((x.shape[0], 2, 8), np.float32)
    feed = {"input": x, "h0": zeros if h0 is None else h0}
    if model == MODEL:
        feed["c0"] = zeros if c0 is None else c0
    return runtime.predict(feed)


def _body(inputs: dict, binary: bool, **extra) -> tuple[bytes, dict]:
    from lstm_onnx.protocol.rest_codec import HEADER_LENGTH, encode_infer_request

    body, length = encode_infer_request(inputs, binary=binary, **extra)
    return body, ({HEADER_LENGTH: str(length)} if length is not None else {})


def _decode(response: httpx.Response) -> dict[str, np.ndarray]:
    from lstm_onnx.protocol.rest_codec import HEADER_LENGTH, decode_infer_response

    assert response.status_code == 200, response.text
    length = response.headers.get(HEADER_LENGTH)
    return decode_infer_response(response.content, int(length) if length else None)


def _triton_input(name, array, binary=True):
    import tritonclient.http as th

    tensor = th.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


# tritonclient.http, unchanged

def test_tritonclient_http_reads_health_metadata_config_and_stats(triton_http):
    assert triton_http.is_server_live()
    assert not triton_http.is_server_ready()  # the repository holds a broken model, as in gRPC
    assert triton_http.is_model_ready(MODEL) and not triton_http.is_model_ready("broken")
    meta = triton_http.get_server_metadata()
    assert meta["name"] == "lstm-onnx" and {"binary_tensor_data", "sequence", "statistics"} <= set(meta["extensions"])
    model = triton_http.get_model_metadata(MODEL)
    assert model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert {"name": "input", "datatype": "FP32", "shape": [-1, -1, 1]} in model["inputs"]
    config = triton_http.get_model_config(MODEL)
    assert config["name"] == MODEL and config["max_batch_size"] == 64
    # The implicit-state style: the client sends only `input`; the sequence batcher carries h0/c0 from hn/cn.
    assert [t["name"] for t in config["input"]] == ["input"]
    assert {(s["input_name"], s["output_name"]) for s in config["sequence_batching"]["state"]} == {("h0", "hn"),
                                                                                                 ("c0", "cn")}
    assert config["input"][0]["dims"] == [-1, 1]  # int64 as numbers, as Triton writes them
    triton_http.infer(MODEL, [_triton_input("input", sample_input(1, 3))])
    stats = triton_http.get_inference_statistics(MODEL)["model_stats"][0]
    assert stats["name"] == MODEL and stats["version"] == "1"
    assert stats["inference_stats"]["success"]["count"] >= 1 and isinstance(stats["inference_count"], int)
    index = triton_http.get_model_repository_index()
    assert {(m["name"], m.get("state")) for m in index} >= {(MODEL, "READY"), ("broken", "UNAVAILABLE")}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_infers_and_equals_the_model_run_alone(server, triton_http, binary):
    import tritonclient.http as th

    x = sample_input(3, 7, seed=4)
    outputs = [th.InferRequestedOutput("cn", binary_data=binary), th.InferRequestedOutput("output", binary_data=binary)]
    result = triton_http.infer(MODEL, [_triton_input("input", x, binary)], outputs=outputs, request_id="r7")
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["cn", "output"] and response["id"] == "r7"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary
    want = _alone(server, x)
    for name in ("cn", "output"):
        # JSON carries float32 in its shortest decimal form, which reads back to the same float32
        np.testing.assert_array_equal(result.as_numpy(name), want[name])


def test_tritonclient_http_sequence_in_three_chunks_equals_the_whole(server, triton_http):
    x = sample_input(1, 12, seed=9)
    whole = _alone(server, x)
    chunks = [x[:, :4], x[:, 4:9], x[:, 9:]]
    for i, chunk in enumerate(chunks):
        result = triton_http.infer(MODEL, [_triton_input("input", chunk)], sequence_id=4242,
                                   sequence_start=i == 0, sequence_end=i == len(chunks) - 1)
    for name in ("output", "hn", "cn"):
        np.testing.assert_allclose(result.as_numpy(name), whole[name], atol=1e-5, rtol=0, err_msg=name)


def test_a_sequence_may_alternate_between_grpc_and_rest(server, http):
    from lstm_onnx.client.client import InferenceClient
    from lstm_onnx.protocol.codec import SequenceControl

    x = sample_input(2, 9, seed=3)
    whole = _alone(server, x)
    with InferenceClient(server.url) as grpc_client:
        grpc_client.infer(MODEL, {"input": x[:, :3]}, sequence=SequenceControl("mixed", start=True))
        body, headers = _body({"input": x[:, 3:6]}, True, sequence=SequenceControl("mixed"))
        assert http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers).status_code == 200
        last = grpc_client.infer(MODEL, {"input": x[:, 6:]}, sequence=SequenceControl("mixed", end=True))
    for name in ("output", "hn", "cn"):
        np.testing.assert_allclose(last[name], whole[name], atol=1e-5, rtol=0, err_msg=name)
    # ended over gRPC, so REST finds no such sequence, with the gRPC text
    body, headers = _body({"input": x[:, :1]}, True, sequence=SequenceControl("mixed"))
    refused = http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert refused.status_code == 400 and "sequence 'mixed'" in refused.json()["error"]


# plain HTTP: every endpoint

def test_every_endpoint_answers_json_over_plain_http(http):
    assert http.get("/v2/health/live").json() == {"live": True}
    ready = http.get("/v2/health/ready")
    assert ready.status_code == 503 and ready.json() == {"ready": False}  # the broken model
    assert http.get("/v2").json()["version"]
    for prefix in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"):
        assert http.get(prefix).json()["name"] == MODEL
        assert http.get(prefix + "/ready").json() == {"name": MODEL, "ready": True}
        assert http.get(prefix + "/config").json()["platform"] == "onnxruntime_onnx"
        assert http.get(prefix + "/stats").json()["model_stats"][0]["name"] == MODEL
        x = sample_input(1, 2)
        body, headers = _body({"input": x}, False)
        answer = http.post(prefix + "/infer", content=body, headers=headers)
        assert answer.headers["content-type"].startswith("application/json")
        assert _decode(answer)["output"].shape == (1, 4)
    names = {s["name"] for s in http.get("/v2/models/stats").json()["model_stats"]}
    assert MODEL in names and "tiny_gru" in names
    index = http.post("/v2/repository/index", json={"ready": True}).json()
    assert MODEL in {m["name"] for m in index} and "broken" not in {m["name"] for m in index}
    assert "broken" in {m["name"] for m in http.post("/v2/repository/index").json()}


def test_nested_and_flat_json_data_give_the_same_answer(server, http):
    x = sample_input(2, 3, seed=5)
    flat = {"inputs": [{"name": "input", "shape": [2, 3, 1], "datatype": "FP32", "data": x.ravel().tolist()}]}
    nested = {"inputs": [{"name": "input", "shape": [2, 3, 1], "datatype": "FP32", "data": x.tolist()}]}
    a = _decode(http.post(f"/v2/models/{MODEL}/infer", json=flat))
    b = _decode(http.post(f"/v2/models/{MODEL}/infer", json=nested))
    for name in ("output", "hn", "cn"):
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name], _alone(server, x)[name])


def _grpc_error(server, request) -> tuple[grpc.StatusCode, str]:
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.url) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    return info.value.code(), info.value.details()


def test_every_error_status_with_the_grpc_text(server, http):
    from lstm_onnx.protocol.codec import encode_request

    x = sample_input(2, 5)
    cases = [  # (model path, inputs, outputs, HTTP status, gRPC code)
        (MODEL, {"input": x[:, :, :1].repeat(3, axis=2)}, None, 400, grpc.StatusCode.INVALID_ARGUMENT),
        (MODEL, {"input": x.astype(np.float64)}, None, 400, grpc.StatusCode.INVALID_ARGUMENT),
        (MODEL, {"input": x}, ["nope"], 400, grpc.StatusCode.INVALID_ARGUMENT),
        (MODEL, {"input": sample_input(500, 2)}, None, 400, grpc.StatusCode.INVALID_ARGUMENT),
        ("missing_model", {"input": x}, None, 404, grpc.StatusCode.NOT_FOUND),
        ("broken", {"x": x}, None, 503, grpc.StatusCode.UNAVAILABLE),
    ]
    for model, inputs, outputs, status, code in cases:
        body, headers = _body(inputs, True, outputs=outputs)
        answer = http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        grpc_code, grpc_text = _grpc_error(server, encode_request(model, inputs, outputs=outputs))
        assert (answer.status_code, grpc_code) == (status, code), answer.text
        assert answer.json() == {"error": grpc_text}
    version = http.post(f"/v2/models/{MODEL}/versions/9/infer", content=body, headers=headers)
    assert version.status_code == 404 and "no version '9'" in version.json()["error"]
    assert http.get(f"/v2/models/{MODEL}/versions/9").status_code == 404
    assert http.get("/v2/models/missing_model/config").status_code == 404
    # Triton: 400 for a model version that is not ready, known or not (ModelReady answers false, not NOT_FOUND).
    assert http.get("/v2/models/broken/ready").status_code == 400
    missing = http.get("/v2/models/missing_model/ready")
    assert missing.status_code == 400 and missing.json() == {"name": "missing_model", "ready": False}
    route = http.get("/v3/nothing")
    assert route.status_code == 404 and "no route GET /v3/nothing" in route.json()["error"]
    method = http.delete(f"/v2/models/{MODEL}/infer")
    assert method.status_code == 405 and "DELETE" in method.json()["error"]

    # 500: the model itself fails while running (a fault injected into the live runtime)
    from lstm_onnx.protocol.errors import Internal

    answer, grpc_code, grpc_text = _failing_run(server, http, x,
                                                Internal("model 'tiny_gru' version 1 failed: injected fault"))
    assert (answer.status_code, grpc_code) == (500, grpc.StatusCode.INTERNAL)
    assert answer.json() == {"error": grpc_text} and "injected fault" in grpc_text


def _malformed_cases() -> list[tuple[str, bytes, dict, int, str]]:
    """(label, body, headers, status, text the error must contain): generated over each field of the body."""
    good = {"name": "input", "shape": [1, 2, 1], "datatype": "FP32", "data": [0.5, -1.0]}
    cases: list[tuple[str, bytes, dict, int, str]] = []

    def add(label, request, expect, status=400, headers=None, raw=None):
        body = raw if raw is not None else json.dumps(request).encode()
        cases.append((label, body, headers or {}, status, expect))

    for raw in (b"", b"{", b"not json", b"[1, 2", b"{\"inputs\": [NaN]}", b"{\"inputs\": [1e400]}", b"\xff\xfe",
                b"{\"inputs\": [Infinity]}", b"{'inputs': []}", b"{\"inputs\": []} trailing"):
        add(f"not json {raw[:12]!r}", None, "not valid JSON", raw=raw)
    for top in ([], [good], "text", 3, None, True):
        add(f"top {top!r}", top, "request body: got")
    for value in (None, [], {}, "x", 1, [1], [None], ["input"], [[good]]):
        add(f"inputs {value!r}", {"inputs": value}, "inputs")
    for value in (3, ["a"], True, {"k": 1}, None):
        add(f"id {value!r}", {"id": value, "inputs": [good]}, "id: got")
    fields = {
        "name": [None, "", 3, ["input"], {"a": 1}, True],
        "datatype": [None, "FP8", "fp32", 32, "", ["FP32"], "STRING", "BYTES"],
        "shape": [None, "1,2,1", [1, 2, -1], [1.0, 2, 1], [True, 2, 1], [[1], 2, 1], 2, ["1", "2", "1"], [1, None]],
        "data": [None, "0.5,-1", 0.5, {"0": 0.5}, [0.5], [0.5, -1.0, 2.0], ["0.5", "-1"], [True, False], [None, 1.0],
                 [[0.5], [1.0, 2.0]], [[0.5, -1.0]] * 2, [0.5, [1.0]], [{"v": 1}, 2], [1e39, 0.0], [-1e39, 0.0], [],
                 [[]], ["NaN", "Infinity"]],
        "parameters": [None, [], "binary", 3, {"binary_data_size": -1}, {"binary_data_size": "8"},
                       {"binary_data_size": 8.0}, {"binary_data_size": True}, {"binary_data_size": 8}],
    }
    # each field broken in the first input, and in a second one after a good first (the error names its index)
    for position in (0, 1):
        where = f"inputs[{position}]"
        other = {**good, "name": "h0"}
        for field_name, values in fields.items():
            for value in values:
                expect = f"{where}.name" if field_name == "name" else f"{where} (input '{good['name']}').{field_name}"
                if field_name == "data" and value in ([0.5], [0.5, -1.0, 2.0], [], [[]], [[0.5, -1.0]] * 2):
                    expect = "values, expected 2"
                if field_name == "parameters" and repr(value) == "{'binary_data_size': 8}":
                    expect = "both data and parameters.binary_data_size"
                tensors = [{**good, field_name: value}]
                add(f"{where}.{field_name}={value!r}", {"inputs": [other, *tensors] if position else tensors}, expect)
                if field_name != "parameters" and value is values[0]:
                    missing = [{k: v for k, v in good.items() if k != field_name}]
                    add(f"{where} without {field_name}", {"inputs": [other, *missing] if position else missing},
                        "neither data nor" if field_name == "data" else expect.replace(f".{field_name}", ""))
    # integer and boolean datatypes: values that do not fit
    for datatype, values, expect in [
        ("INT32", [1.5, 2], "expected integers for INT32"), ("INT32", [2 ** 31, 0], "out of range for INT32"),
        ("INT64", [True, 0.5], "expected integers"), ("INT64", [2 ** 70, 1], "expected integers"), ("INT64", ["1", "2"], "expected integers"),
        ("UINT8", [256, 0], "out of range for UINT8"), ("UINT8", [-1, 0], "out of range for UINT8"),
        ("INT8", [128, 0], "out of range for INT8"), ("UINT64", [-1, 2], "out of range for UINT64"),
        ("BOOL", [1, 0], "expected true/false for BOOL"), ("BOOL", [0.0, 1.0], "expected true/false"),
        ("BOOL", ["true", "false"], "expected true/false"), ("FP16", [70000.0, 0.0], "overflows FP16"),
        ("FP64", [True, False], "expected numbers for FP64"), ("FP32", [[True], [1.0]], "expected numbers"),
    ]:
        add(f"{datatype} {values!r}", {"inputs": [{**good, "datatype": datatype, "data": values}]}, expect)
    # outputs and parameters
    for value in ("output", 3, {"name": "output"}, [3], [{"name": 3}], [{}], [{"name": ""}],
                  [{"name": "output", "parameters": 3}], [{"name": "output", "parameters": {"binary_data": 1}}],
                  [{"name": "output", "parameters": {"binary_data": "true"}}],
                  [{"name": "output"}, {"name": "output"}]):
        add(f"outputs={value!r}", {"inputs": [good], "outputs": value}, "outputs")
    add("unknown requested output", {"inputs": [good], "outputs": [{"name": "nope"}]}, "requested output 'nope'")
    for params, expect in [
        ([], "parameters: got"), ("x", "parameters: got"), ({"binary_data_output": 1}, "binary_data_output"),
        ({"binary_data_output": "yes"}, "binary_data_output"), ({"sequence_start": True}, "without 'sequence_id'"),
        ({"sequence_end": True}, "without 'sequence_id'"), ({"sequence_id": 1.5}, "parameters.sequence_id"),
        ({"sequence_id": True}, "parameters.sequence_id"), ({"sequence_id": [1]}, "parameters.sequence_id"),
        ({"sequence_id": None}, "parameters.sequence_id"), ({"sequence_id": 2 ** 64}, "parameters.sequence_id"),
        ({"sequence_id": 5, "sequence_start": "yes"}, "sequence_start"),
        ({"sequence_id": 5, "sequence_end": 1}, "sequence_end"),
        ({"sequence_id": 987654321}, "sequence 987654321"), ({"sequence_id": "never-started"}, "never-started"),
    ]:
        add(f"parameters={params!r}", {"inputs": [good], "parameters": params}, expect)
    add("input given twice", {"inputs": [good, good]}, "given twice")
    add("unknown input", {"inputs": [{**good, "name": "inptu"}]}, "no input 'inptu'")
    add("wrong feature size", {"inputs": [{**good, "shape": [1, 1, 2]}]}, "got shape [1, 1, 2]")
    add("empty time axis", {"inputs": [{**good, "shape": [1, 0, 1], "data": []}]}, "at least 1")
    add("wrong datatype for the model", {"inputs": [{**good, "datatype": "FP64"}]}, "got datatype FP64")
    # binary tensors: header and sizes
    header = orjson.dumps({"inputs": [{**{k: v for k, v in good.items() if k != "data"},
                                      "parameters": {"binary_data_size": 8}}]})
    blob = np.array([0.5, -1.0], np.float32).tobytes()
    hl = "Inference-Header-Content-Length"
    for value, expect in [("abc", "expected an integer"), ("-3", "expected 1.."), ("0", "expected 1.."),
                          (str(len(header) + 9), "expected 1.."), ("1.5", "expected an integer"),
                          ("", "expected an integer"), (str(len(header) - 1), "not valid JSON"),
                          (str(len(header) + 1), "not valid JSON")]:
        add(f"header {value!r}", None, expect if "JSON" in expect else hl, raw=header + blob, headers={hl: value})
    add("binary without header", None, "no Inference-Header-Content-Length", raw=header)
    add("binary after JSON without header", None, "not valid JSON", raw=header + blob)
    add("binary short", None, "only 7 bytes follow", raw=header + blob[:-1], headers={hl: str(len(header))})
    add("binary long", None, "got 9 bytes after the JSON header", raw=header + blob + b"\0",
        headers={hl: str(len(header))})
    for size in (4, 12, 0):
        bad = header.replace(b'"binary_data_size":8', b'"binary_data_size":%d' % size)
        add(f"binary_data_size {size}", None, f"binary_data_size: got {size}, expected 8", raw=bad + blob[:size],
            headers={hl: str(len(bad))})
    bools = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "BOOL",
                                      "parameters": {"binary_data_size": 3}}]})
    cases.append(("BOOL binary byte 2", bools + b"\x01\x02\x00", {hl: str(len(bools))}, 400,
                  "bytes other than 0 and 1"))
    return cases


MALFORMED = _malformed_cases()


def test_malformed_body_suite_gets_400_naming_the_field_and_the_server_still_answers(server, http):
    assert len(MALFORMED) >= 200, len(MALFORMED)
    wrong = []
    for label, body, headers, status, expect in MALFORMED:
        model = "identity_bool" if "BOOL binary" in label else MODEL
        answer = http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
        error = answer.json().get("error", "") if answer.headers["content-type"].startswith("application/json") \
            else answer.text
        if answer.status_code != status or expect not in error:
            wrong.append(f"{label}: got {answer.status_code} {error!r}, expected {status} containing {expect!r}")
    assert not wrong, f"{len(wrong)} of {len(MALFORMED)} cases:\n" + "\n".join(wrong)
    x = sample_input(2, 4, seed=11)
    body, headers = _body({"input": x}, True)
    after = _decode(http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers))
    np.testing.assert_array_equal(after["output"], _alone(server, x)["output"])


# one scheduler behind both protocols

@contextlib.contextmanager
def _executor_held(srv):
    """Occupy the server's one executor thread until the block ends, so that requests sent meanwhile queue and merge."""
    release = threading.Event()
    srv.running.executor.submit(release.wait, 30)
    try:
        yield release
    finally:
        release.set()


def test_grpc_and_rest_requests_merge_into_one_batch_and_each_equals_its_answer_alone(server):
    import aiohttp

    from lstm_onnx.protocol.codec import decode_response, encode_request
    from lstm_onnx.protocol.rest_codec import HEADER_LENGTH, decode_infer_response, encode_infer_request
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    inputs = [sample_input(1, 6, seed=100 + i) for i in range(8)]
    counters = server.running.scheduler.metrics.counters("tiny_gru", "1")
    before = dict(counters.batch_sizes)
    pending = server.running.scheduler.metrics.counters

    async def fire(release: threading.Event):
        async with grpc.aio.insecure_channel(server.url) as channel, aiohttp.ClientSession() as session:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def rest(x):
                body, length = encode_infer_request({"input": x})
                async with session.post(f"http://{server.http_url}/v2/models/tiny_gru/infer", data=body,
                                        headers={HEADER_LENGTH: str(length)}) as r:
                    assert r.status == 200, await r.text()
                    return decode_infer_response(await r.read(), int(r.headers[HEADER_LENGTH]))

            async def grpc_call(x):
                return decode_response(await stub.ModelInfer(encode_request("tiny_gru", {"input": x})))

            calls = [asyncio.ensure_future(rest(x) if i % 2 else grpc_call(x)) for i, x in enumerate(inputs)]
            # every request has reached the scheduler (pending counts it) before the executor is let go
            while pending("tiny_gru", "1").pending < len(inputs):
                await asyncio.sleep(0.005)
            release.set()
            return await asyncio.gather(*calls)

    with _executor_held(server) as release:
        together = asyncio.run(fire(release))
    merged = {rows: n - before.get(rows, 0) for rows, n in counters.batch_sizes.items()}
    assert max(rows for rows, n in merged.items() if n) > 1, f"no merged run: {merged}"
    for x, got in zip(inputs, together):
        want = _alone(server, x, model="tiny_gru")
        for name in ("output", "hn"):
            np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0)


def test_rest_requests_are_counted_in_the_metrics_and_statistics(server, http):
    from prometheus_client.parser import text_string_to_metric_families

    def successes() -> float:
        text = httpx.get(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=10).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        return sum(s.value for s in families["nv_inference_request_success"].samples
                   if s.labels == {"model": "identity_fp32", "version": "1"})

    before = successes()
    stats_before = http.get("/v2/models/identity_fp32/stats").json()["model_stats"][0]
    for _ in range(3):
        body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
        assert _decode(http.post("/v2/models/identity_fp32/infer", json=body))["z"].tolist() == [[2, 4, 6]]
    assert successes() == before + 3
    stats = http.get("/v2/models/identity_fp32/stats").json()["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == stats_before["inference_stats"]["success"]["count"] + 3
    page = httpx.get(f"http://127.0.0.1:{server.running.metrics_port}/nope", timeout=10)
    assert page.status_code == 404



def _failing_run(server, http, x, exc: BaseException):
    """The same request over REST and gRPC while tiny_gru's runtime raises `exc`: (REST answer, gRPC code, text)."""
    from lstm_onnx.protocol.codec import encode_request

    runtime = server.running.repository.resolve("tiny_gru").runtime

    def failing(*args, **kwargs):
        raise exc

    runtime.predict = failing
    try:
        body, headers = _body({"input": x}, True)
        answer = http.post("/v2/models/tiny_gru/infer", content=body, headers=headers)
        grpc_code, grpc_text = _grpc_error(server, encode_request("tiny_gru", {"input": x}))
    finally:
        del runtime.predict
    return answer, grpc_code, grpc_text

def test_an_unexpected_exception_is_internal_over_grpc_and_500_over_rest(server, http):
    """A bug (an exception outside our error classes) is the server's fault: INTERNAL / 500, never the client's."""

    x = sample_input(1, 3)
    answer, grpc_code, grpc_text = _failing_run(server, http, x, ZeroDivisionError("injected bug"))
    assert grpc_code == grpc.StatusCode.INTERNAL, f"gRPC: got {grpc_code}, expected INTERNAL ({grpc_text})"
    assert answer.status_code == 500, f"REST: got {answer.status_code}, expected 500 ({answer.text})"
    assert "ZeroDivisionError" in grpc_text and "injected bug" in grpc_text, grpc_text
    assert answer.json() == {"error": grpc_text}
    body, headers = _body({"input": x}, True)  # the model answers again once the fault is gone
    assert not isinstance(_decode(http.post("/v2/models/tiny_gru/infer", content=body, headers=headers)), Exception)
