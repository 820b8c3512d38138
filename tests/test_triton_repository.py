"""Our server on an exported repository, through tritonclient.grpc, as Triton serves the same config.pbtxt."""
from __future__ import annotations

import asyncio
import queue
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from google.protobuf import text_format
from server_models import sample_input
from tritonclient.utils import InferenceServerException

DATA = Path(__file__).resolve().parent / "data"
ATOL = 1e-5


def _start(repo: Path, **overrides):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    # Several tests put a model that must fail beside good ones: the good ones serve (--exit-on-error false).
    overrides.setdefault("exit_on_error", "false")
    return BackgroundServer(ServerSettings(model_repository=str(repo), grpc_port=0, http_port=-1, metrics_port=-1, **overrides))


@pytest.fixture(scope="module")
def server(tiny_repository):
    with _start(tiny_repository) as srv:
        yield srv


def _tensor(x: np.ndarray, name: str = "input") -> tc.InferInput:
    tensor = tc.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(x))
    return tensor


def _outputs(result, names=("output", "hn", "cn")) -> dict[str, np.ndarray]:
    return {n: result.as_numpy(n) for n in names if result.get_output(n) is not None}


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want) and got, f"{what}: got outputs {sorted(got)}, expected {sorted(want)}"
    for name in want:
        err = float(np.max(np.abs(got[name] - want[name])))
        assert err <= ATOL, f"{what}: output '{name}' differs by {err:.3g}, expected at most {ATOL:g}"


def _chunks(x: np.ndarray, cuts: tuple[int, int]) -> list[np.ndarray]:
    return [x[:, :cuts[0]], x[:, cuts[0]:cuts[1]], x[:, cuts[1]:]]


def test_config_is_the_exported_triton_config(triton, tiny_repository):
    from tritonclient.grpc import model_config_pb2

    served = triton.get_model_config("tiny_lstm").config
    written = text_format.Parse((tiny_repository / "tiny_lstm" / "config.pbtxt").read_text(),
                                model_config_pb2.ModelConfig())
    assert served.sequence_batching == written.sequence_batching
    assert [i.name for i in served.input] == ["input"]
    assert {"sequence", "sequence(string_id)"} <= set(triton.get_server_metadata().extensions)


@pytest.mark.parametrize("model", ["tiny_lstm", "tiny_gru"])
def test_three_chunks_without_state_equal_the_whole_sequence(triton, model):
    x = sample_input(1, 13, seed=11)
    whole = _outputs(triton.infer(model, [_tensor(x)]))
    chunks = _chunks(x, (4, 9))
    for i, chunk in enumerate(chunks):
        last = triton.infer(model, [_tensor(chunk)], sequence_id=1000, sequence_start=i == 0,
                            sequence_end=i == len(chunks) - 1)
    _assert_close(_outputs(last), whole, f"{model} in 3 chunks")


def test_three_chunks_over_a_stream_with_a_string_id_equal_the_whole(server, triton):
    x = sample_input(1, 10, seed=12)
    whole = _outputs(triton.infer("tiny_lstm", [_tensor(x)]))
    answers: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, chunk in enumerate(_chunks(x, (3, 7))):
            client.async_stream_infer("tiny_lstm", [_tensor(chunk)], sequence_id="stream-a", sequence_start=i == 0,
                                      sequence_end=i == 2)
        got = [answers.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
        client.close()
    assert [error for _, error in got] == [None, None, None]
    _assert_close(_outputs(got[-1][0]), whole, "stream of 3 chunks")


def test_64_concurrent_interleaved_sequences_each_equal_their_whole_run(server):
    import tritonclient.grpc.aio as tca

    rng = np.random.default_rng(5)
    lengths = rng.integers(3, 25, size=64)  # different lengths: batches are ragged
    xs = [sample_input(1, int(t), seed=100 + i) for i, t in enumerate(lengths)]
    cuts = [tuple(sorted(rng.choice(np.arange(1, t), size=2, replace=False))) for t in lengths]

    async def run() -> tuple[list, list]:
        async with tca.InferenceServerClient(server.url) as client:
            wholes = await asyncio.gather(*(client.infer("tiny_lstm", [_tensor(x)]) for x in xs))
            last = [None] * len(xs)
            for k in range(3):  # every sequence's chunk k is in flight together, so chunks interleave
                results = await asyncio.gather(*(
                    client.infer("tiny_lstm", [_tensor(_chunks(x, c)[k])], sequence_id=5000 + i,
                                 sequence_start=k == 0, sequence_end=k == 2)
                    for i, (x, c) in enumerate(zip(xs, cuts))))
                last = results
            return wholes, last

    wholes, last = asyncio.run(run())
    for i, (whole, chunked) in enumerate(zip(wholes, last)):
        _assert_close(_outputs(chunked), _outputs(whole), f"sequence {i} (T={lengths[i]}, cuts {cuts[i]})")
    assert len(server.running.scheduler.sequences) == 0  # every END freed its sequence


def test_continuation_of_an_unknown_id_without_start_is_refused(triton):
    with pytest.raises(InferenceServerException) as info:
        triton.infer("tiny_lstm", [_tensor(sample_input(1, 3))], sequence_id=424242)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "sequence 424242" in info.value.message() and "sequence_start" in info.value.message()


def test_start_on_a_live_id_restarts_it_and_end_frees_it(server, triton):
    a, b = sample_input(1, 8, seed=21), sample_input(1, 9, seed=22)
    triton.infer("tiny_lstm", [_tensor(a[:, :4])], sequence_id=77, sequence_start=True)
    triton.infer("tiny_lstm", [_tensor(a[:, 4:])], sequence_id=77)
    # START again on the live id: Triton ends the old sequence early and starts from the initial state.
    triton.infer("tiny_lstm", [_tensor(b[:, :5])], sequence_id=77, sequence_start=True)
    last = triton.infer("tiny_lstm", [_tensor(b[:, 5:])], sequence_id=77, sequence_end=True)
    _assert_close(_outputs(last), _outputs(triton.infer("tiny_lstm", [_tensor(b)])), "restarted sequence")
    live = {key for key in server.running.scheduler.sequences._live}
    assert ("tiny_lstm", 77) not in live
    with pytest.raises(InferenceServerException) as info:
        triton.infer("tiny_lstm", [_tensor(b[:, :2])], sequence_id=77)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "sequence 77" in info.value.message()


def test_explicit_state_in_a_request_overrides_the_carried_state(triton):
    x = sample_input(1, 8, seed=31)
    zeros = np.zeros((1, 2, 8), np.float32)
    triton.infer("tiny_lstm", [_tensor(x[:, :4])], sequence_id=88, sequence_start=True)
    got = triton.infer("tiny_lstm", [_tensor(x[:, 4:]), _tensor(zeros, "h0"), _tensor(zeros, "c0")],
                       sequence_id=88, sequence_end=True)
    _assert_close(_outputs(got), _outputs(triton.infer("tiny_lstm", [_tensor(x[:, 4:])])), "h0/c0 given")


def test_idle_sequence_is_freed_after_the_configs_idle_timeout(tiny_run_dir, tmp_path):
    from lstm_onnx.export.repository import BatchingOptions, export_to_repository

    # The server's own setting (60 s) is far longer: only config.pbtxt's 0.2 s can free it in time.
    export_to_repository(tiny_run_dir, tmp_path, name="m", batching=BatchingOptions(max_sequence_idle_us=200_000))
    x = sample_input(1, 3)
    with _start(tmp_path, sequence_idle_timeout_s=60.0) as srv:
        client = tc.InferenceServerClient(srv.url)
        try:
            started = time.monotonic()
            client.infer("m", [_tensor(x)], sequence_id=9, sequence_start=True)
            sequences = srv.running.scheduler.sequences
            while len(sequences) and time.monotonic() - started < 10:
                time.sleep(0.05)  # waiting for the evictor's clock, not for another thread's progress
            freed_after = time.monotonic() - started
            assert len(sequences) == 0, f"sequence still live after {freed_after:.1f} s, expected freed after 0.2 s"
            assert freed_after >= 0.2
            with pytest.raises(InferenceServerException) as info:
                client.infer("m", [_tensor(x)], sequence_id=9)
            assert "sequence 9" in info.value.message()
        finally:
            client.close()


def _copy_model(src: Path, dest: Path, name: str, config_text: str) -> None:
    shutil.copytree(src, dest / name)
    (dest / name / "config.pbtxt").write_text(config_text)


def test_config_written_before_issue_10_still_serves_sequences(tiny_repository, tmp_path):
    old = (DATA / "config_before_issue10.pbtxt").read_text()
    _copy_model(tiny_repository / "tiny_lstm", tmp_path, "tiny_lstm", old)
    x = sample_input(1, 9, seed=41)
    with _start(tmp_path) as srv:
        client = tc.InferenceServerClient(srv.url)
        try:
            assert client.get_model_config("tiny_lstm").config.dynamic_batching.max_queue_delay_microseconds == 500
            whole = _outputs(client.infer("tiny_lstm", [_tensor(x)]))
            for i, chunk in enumerate(_chunks(x, (2, 6))):
                last = client.infer("tiny_lstm", [_tensor(chunk)], sequence_id=3, sequence_start=i == 0,
                                    sequence_end=i == 2)
        finally:
            client.close()
    _assert_close(_outputs(last), whole, "old config, 3 chunks")


def test_state_that_disagrees_with_the_contract_fails_the_model_naming_both(tiny_repository, tmp_path):
    text = (tiny_repository / "tiny_lstm" / "config.pbtxt").read_text()
    start = text.index('    { input_name: "c0"')
    end = text.index("  ]\n}", start)
    one_state = text[:start].rstrip().rstrip(",") + "\n" + text[end:]  # drops c0 -> cn
    _copy_model(tiny_repository / "tiny_lstm", tmp_path, "tiny_lstm", one_state)
    with _start(tmp_path) as srv:
        version = srv.running.repository.models["tiny_lstm"].versions[1]
    assert not version.ready
    assert "sequence_batching.state pairs [h0->hn]" in version.reason, version.reason
    assert "contract (lstm_onnx.contract) says [h0->hn, c0->cn]" in version.reason, version.reason


def test_stateless_config_serves_and_a_bidirectional_model_refuses_implicit_state(make_run_dir, tmp_path):
    from lstm_onnx.export.repository import export_to_repository
    from lstm_onnx.protos import model_config_pb2 as mc

    repo = tmp_path / "repo"
    export_to_repository(make_run_dir(bidirectional=True), repo, name="bi")  # stateless: the only style it has
    config = text_format.Parse((repo / "bi" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    # The same model given implicit state by hand: the server refuses it, as the contract says why.
    forced = mc.ModelConfig()
    forced.CopyFrom(config)
    forced.ClearField("dynamic_batching")
    for tensor in [t for t in forced.input if t.name != "input"]:
        state = forced.sequence_batching.state.add(input_name=tensor.name, output_name=tensor.name[0] + "n",
                                                   data_type=tensor.data_type, dims=tensor.dims)
        state.initial_state.add(data_type=tensor.data_type, dims=tensor.dims, zero_data=True, name=f"{tensor.name}_0")
    del forced.input[1:]
    _copy_model(repo / "bi", tmp_path / "forced", "bi", text_format.MessageToString(forced))
    x = sample_input(1, 6, seed=51)
    with _start(repo) as srv, _start(tmp_path / "forced") as bad:
        client = tc.InferenceServerClient(srv.url)
        try:
            # Triton needs h0/c0 in every request here; our server still fills zeros when they are left out.
            zeros = np.zeros((1, 4, 8), np.float32)
            given = _outputs(client.infer("bi", [_tensor(x), _tensor(zeros, "h0"), _tensor(zeros, "c0")]))
            _assert_close(_outputs(client.infer("bi", [_tensor(x)])), given, "bidirectional, h0/c0 left out")
        finally:
            client.close()
        reason = bad.running.repository.models["bi"].versions[1].reason
    assert "bidirectional" in reason and "--config-style stateless" in reason, reason


def _write_accumulator(model_dir: Path, states: list[tuple[str, str]]) -> None:
    """A model without our contract: y = x, and per state `out = in + x` ([batch, 1] each); outputs listed."""
    import onnx
    from onnx import TensorProto, helper

    def value(name: str):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 1])

    nodes = [helper.make_node("Identity", ["x"], ["y"])] + [helper.make_node("Add", [i, "x"], [o]) for i, o in states]
    graph = helper.make_graph(nodes, "accumulator", [value("x")] + [value(i) for i, _ in states],
                              [value("y")] + [value(o) for _, o in states])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (model_dir / "1").mkdir(parents=True)
    onnx.save(model, str(model_dir / "1" / "model.onnx"))
    entries = ",\n".join(f'    {{ input_name: "{i}" output_name: "{o}" data_type: TYPE_FP32 dims: [ 1 ] '
                         f'initial_state {{ data_type: TYPE_FP32 dims: [ 1 ] zero_data: true name: "{i}0" }} }}'
                         for i, o in states)
    (model_dir / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        "output [ " + ", ".join(f'{{ name: "{n}" data_type: TYPE_FP32 dims: [ 1 ] }}'
                               for n in ["y"] + [o for _, o in states])
        + " ]\n"
        f"sequence_batching {{\n  state [\n{entries}\n  ]\n}}\n")


def test_config_state_drives_a_model_without_contract_and_bad_pairing_is_refused(tmp_path):
    _write_accumulator(tmp_path / "acc", [("total", "total_next"), ("count", "count_next")])
    # server issue 8586's pattern: "s" < "s_len" but "s_len_next" < "s_next".
    _write_accumulator(tmp_path / "mispaired", [("s", "s_next"), ("s_len", "s_len_next")])
    with _start(tmp_path) as srv:
        client = tc.InferenceServerClient(srv.url)
        try:
            for i in range(3):
                last = client.infer("acc", [_tensor(np.full((1, 1), 2.0, np.float32), "x")], sequence_id=1,
                                    sequence_start=i == 0, sequence_end=i == 2)
        finally:
            client.close()
        # No idle timeout in the config: Triton's default of 1 s applies, not the server's 60 s.
        assert srv.running.scheduler.sequences.idle_timeouts["acc"] == 1.0
        reason = srv.running.repository.models["mispaired"].versions[1].reason
    assert last.as_numpy("total_next").tolist() == [[6.0]] and last.as_numpy("count_next").tolist() == [[6.0]]
    assert "sort orders of input and output names differ" in reason and "s->s_next" in reason, reason
