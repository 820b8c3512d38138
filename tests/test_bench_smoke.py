"""Smoke version of the bench: the load generator, its answer check, the CLI and the echo floor, on a tiny model.

Correctness only: no figure here is compared with a wall-clock limit.
"""
from __future__ import annotations

import argparse
import asyncio

import numpy as np
import pytest
from conftest import missing_tool

from lstm_onnx.client import loadgen


@pytest.fixture(scope="module")
def tiny_server(tiny_repository):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    settings = ServerSettings(model_repository=str(tiny_repository), grpc_port=0, metrics_port=-1, http_port=-1)
    with BackgroundServer(settings) as server:
        yield server


def _measure(url: str, model: str, times: list[int], model_path, stream: bool = False, concurrency: int = 2):
    async def go():
        async with loadgen.open_channel(url) as channel:
            metadata, optional = await loadgen.fetch_inputs_spec(channel, model)
            if stream:
                payloads = loadgen.make_stream_payloads(model, metadata, optional, 1, times[0], concurrency)
            else:
                payloads = loadgen.make_payloads(model, metadata, optional, 2, times)
            result, samples = await loadgen.run_level(channel, payloads, concurrency, 24, 30.0, stream=stream,
                                                      check_every=1, warmup=0)
            loadgen.check_answers(result, samples, [p.inputs for p in payloads], model_path)
            return result

    return asyncio.run(go())


def test_loadgen_answers_match_in_process_onnxruntime(tiny_server, tiny_repository):
    result = _measure(tiny_server.url, "tiny_lstm", [3, 7], tiny_repository / "tiny_lstm" / "1" / "model.onnx")
    assert result.errors == 0, result.first_error
    assert result.requests == 24 and result.checked == 24
    assert result.mismatches == 0 and result.worst_abs <= loadgen.CHECK_ATOL
    assert result.p50_ms <= result.p90_ms <= result.p99_ms


def test_loadgen_stream_carries_state_to_the_whole_sequence_answer(tiny_server, tiny_repository):
    result = _measure(tiny_server.url, "tiny_lstm", [4], tiny_repository / "tiny_lstm" / "1" / "model.onnx",
                      stream=True)
    assert result.errors == 0, result.first_error
    assert result.checked >= 2 and result.mismatches == 0


def test_loadgen_check_catches_a_wrong_model(tiny_server, tiny_repository):
    # Answers of tiny_lstm compared with tiny_gru's file must be flagged, or the check proves nothing.
    result = _measure(tiny_server.url, "tiny_lstm", [3], tiny_repository / "tiny_gru" / "1" / "model.onnx")
    assert result.checked > 0 and result.mismatches == result.checked


def test_loadgen_counts_errors_for_an_unknown_model(tiny_server):
    async def go():
        async with loadgen.open_channel(tiny_server.url) as channel:
            x = {"input": np.zeros((1, 2, 1), np.float32)}
            from lstm_onnx.protocol import codec

            payload = loadgen.Payload(x, codec.encode_request("no_such_model", x).SerializeToString())
            return (await loadgen.run_level(channel, [payload], 1, 3, 10.0, warmup=0))[0]

    result = asyncio.run(go())
    assert result.errors == 3 and "NOT_FOUND" in result.first_error


def _bench_args(*argv: str) -> argparse.Namespace:
    from lstm_onnx.client import cli as client_cli

    parser = argparse.ArgumentParser()
    client_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_bench_command_checks_answers(tiny_server, tiny_repository, capsys):
    args = _bench_args("--url", tiny_server.url, "--model", "tiny_lstm", "--time", "2:6", "--concurrency", "1,3",
                       "--requests", "12", "--check-every", "2", "--model-repository", str(tiny_repository))
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["protocol", "conc", "req", "err", "req/s"]
    assert len(out) == 3 and all(line.split()[0] == "grpc" and line.endswith("ok") for line in out[1:])


@pytest.mark.parametrize("flag, value, message", [
    ("--concurrency", "1,x", "--concurrency: got '1,x'"),
    ("--time", "0", "--time: got '0'"),
    ("--batch", "0", "--batch: got 0, expected at least 1"),
])
def test_bench_command_rejects_bad_flags(flag, value, message):
    from lstm_onnx.errors import UsageError

    args = _bench_args("--model", "m", flag, value)
    with pytest.raises(UsageError, match=message.replace("[", r"\[")):
        args.func(args)


def test_echo_floor_answers_the_same_requests():
    from bench.processes import start_echo_server

    with start_echo_server(100) as echo:
        async def go():
            async with loadgen.open_channel(echo.url) as channel:
                payload = loadgen.Payload({}, b"\x0a\x01m")
                return (await loadgen.run_level(channel, [payload], 2, 10, 10.0, warmup=0))[0]

        result = asyncio.run(go())
    assert result.errors == 0 and result.requests == 10


def test_batch_stats_between_counts_only_the_level():
    from bench.head_to_head import batch_stats_between

    before = {"requests": 10, "runs": 10, "queue_ns": 1000, "compute_ns": 5000, "rows": {1: 10}}
    after = {"requests": 10 + 1 + 3 + 8, "runs": 10 + 3, "queue_ns": 1000 + 12 * 2000, "compute_ns": 5000 + 12000,
             "rows": {1: 11, 3: 1, 8: 1}}
    got = batch_stats_between(before, after)
    assert (got["requests"], got["runs"], got["runs_of_1"]) == (12, 3, 1)
    assert got["mean_rows"] == 4.0 and got["queue_us"] == 2.0 and got["compute_us_per_request"] == 1.0
    # By request: 8 of the 12 requests ran in the run of 8, so the typical request's run had 8 rows.
    assert (got["p50_rows_by_request"], got["p90_rows_by_request"]) == (8, 8)
    assert got["runs_by_rows"] == {"1": 1, "3": 1, "8": 1}


def test_median_row_takes_medians_and_sums_checks():
    from bench.head_to_head import median_row

    rows = [dict(concurrency=64, requests=n, errors=e, seconds=3.0, rps=r, p50_ms=p, p90_ms=p, p99_ms=p, checked=4,
                 mismatches=0, first_error="boom" if e else "", worst_abs=w)
            for n, e, r, p, w in ((100, 0, 900.0, 3.0, 0.0), (120, 1, 1000.0, 1.0, 1e-6), (90, 0, 800.0, 2.0, 0.0))]
    got = median_row(rows)
    assert (got["rps"], got["p50_ms"], got["requests"], got["errors"], got["checked"]) == (900.0, 2.0, 310, 1, 12)
    assert got["first_error"] == "boom" and got["worst_abs"] == 1e-6


def test_mlserver_settings_name_the_model_and_adaptive_batching(tiny_repository, tmp_path):
    import json

    from bench import mlserver

    model = tiny_repository / "tiny_lstm" / "1" / "model.onnx"
    folder = mlserver.write_settings(tmp_path / "ml", model, "tiny_lstm", 16, 0.0005, 1234, 1235, 0)
    server = json.loads((folder / "settings.json").read_text())
    settings = json.loads((folder / "model-settings.json").read_text())
    assert (server["grpc_port"], server["http_port"], server["host"]) == (1234, 1235, "127.0.0.1")
    assert settings["implementation"] == "bench.mlserver_runtime.OnnxLstmRuntime"
    assert (settings["max_batch_size"], settings["max_batch_time"]) == (16, 0.0005)
    assert settings["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, -1, 1]}]  # tiny: 1 feature
    assert settings["parameters"]["uri"] == str(model.resolve())


def test_mlserver_runtime_answers_like_in_process_onnxruntime(tiny_repository, tmp_path):
    # Needs MLServer's venv (`make mlserver-venv`, which .ci/run calls; make bench creates it too); nothing is
    # installed here. Without it the test skips, or fails under CI=true.
    from bench import mlserver

    exe = mlserver.ensure_venv(log=lambda _: None, install=False)
    if exe is None:
        missing_tool(f"no MLServer {mlserver.VERSION} venv in {mlserver.venv_dir()} (LSTM_ONNX_MLSERVER_VENV; "
                     "make mlserver-venv installs it)")
    model = tiny_repository / "tiny_lstm" / "1" / "model.onnx"
    folder = mlserver.write_settings(tmp_path / "ml", model, "tiny_lstm", 8, 0.0005, mlserver.free_port(),
                                     mlserver.free_port(), 0)
    with mlserver.start_mlserver(exe, folder) as server:
        result = _measure(server.url, "tiny_lstm", [3, 7], model, concurrency=4)
    assert result.errors == 0, result.first_error
    assert result.checked == 24 and result.mismatches == 0


def test_a_marked_section_replaces_only_itself_on_the_benchmark_page(tmp_path):
    from bench.report import write_marked_section

    page = tmp_path / "benchmarks.md"
    page.write_text("# B\n\nA\n<!-- x:begin -->\nold\n<!-- x:end -->\nZ\n")
    write_marked_section(page, "<!-- x:begin -->\nnew\n<!-- x:end -->\n", "<!-- x:begin -->", "<!-- x:end -->")
    assert page.read_text() == "# B\n\nA\n<!-- x:begin -->\nnew\n<!-- x:end -->\nZ\n"
    write_marked_section(page, "<!-- y:begin -->\nY\n<!-- y:end -->\n", "<!-- y:begin -->", "<!-- y:end -->")
    assert page.read_text().endswith("Z\n\n<!-- y:begin -->\nY\n<!-- y:end -->\n")
