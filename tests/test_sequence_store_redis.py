"""The Redis sequence store against a real redis-server: chunked equals whole, compare-and-set between replicas,
TTL as the idle timeout, END deletes, the bound across replicas, keys per model version, Redis down and back."""
from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from server_models import sample_input


def _start(repo, store: str, **overrides):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    settings = dict(model_repository=str(repo), grpc_port=0, metrics_port=-1, http_port=-1, sequence_store=store)
    return BackgroundServer(ServerSettings(**{**settings, **overrides}))


def _control(sid, start=False, end=False):
    from lstm_onnx.protocol.codec import SequenceControl

    return SequenceControl(sid, start, end)


def test_settings_accept_memory_and_redis_urls_and_refuse_others():
    from lstm_onnx.server.settings import ServerSettings

    for spec in ("memory", "redis://127.0.0.1:6379/0", "rediss://redis.example:6380/2"):
        ServerSettings(model_repository="r", sequence_store=spec).validate()
    with pytest.raises(ValueError, match="sequence_store: got 'mysql://x'"):
        ServerSettings(model_repository="r", sequence_store="mysql://x").validate()
    assert ServerSettings().sequence_store == "memory"


def test_state_encoding_round_trips_and_a_short_value_names_the_tensor():
    from lstm_onnx.server.redis_wire import decode_state, encode_state

    state = {"hn": np.arange(16, dtype=np.float32).reshape(2, 1, 8), "cn": np.ones((2, 1, 8), np.float32)}
    back = decode_state(encode_state(state))
    assert list(back) == ["hn", "cn"] and all(np.array_equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="state 'cn'"):
        decode_state(encode_state(state)[:-4])


def test_password_is_left_out_of_the_store_name():
    from lstm_onnx.server.redis_wire import redact

    assert redact("rediss://user:secret@host:6380/1") == "rediss://user:***@host:6380/1"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


def test_chunked_sequence_on_redis_equals_whole_over_unary_and_stream(tiny_repository, redis_server):
    from lstm_onnx.client.client import InferenceClient, split_time

    x = sample_input(2, 23, seed=3)
    with _start(tiny_repository, redis_server.url) as srv, InferenceClient(srv.url) as client:
        whole = client.infer("tiny_lstm", {"input": x})
        chunks = split_time(x, 5)
        for i, chunk in enumerate(chunks):
            last = client.infer("tiny_lstm", {"input": chunk}, sequence=_control(9, i == 0, i == len(chunks) - 1))
            if i == 1:
                assert len(redis_server.keys()) == 1  # live: one key for the model version
        streamed = list(client.stream_sequence("tiny_lstm", [{"input": c} for c in chunks], "s-1"))[-1]
        np.testing.assert_allclose(last["output"], whole["output"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(streamed["output"], whole["output"], atol=1e-5, rtol=0)
    assert redis_server.keys() == []  # END deleted both


def test_sequence_key_has_the_idle_timeout_as_ttl_and_carries_the_model_version(tiny_repository, redis_server):
    from lstm_onnx.client.client import InferenceClient

    x = sample_input(1, 3)
    with _start(tiny_repository, redis_server.url, sequence_idle_timeout_s=30) as srv, \
            InferenceClient(srv.url) as client:
        client.infer("tiny_gru", {"input": x}, sequence=_control(5, start=True))
        (key,) = redis_server.keys()
        assert key == b"lstm-onnx:seq:tiny_gru:1:i5"
        ttl = redis_server.client().pttl(key)
        # tiny_gru's config.pbtxt has sequence_batching, whose idle timeout wins over the server's 30 s.
        expected = srv.running.repository.sequence_idle_timeouts().get("tiny_gru", 30) * 1000
        assert 0 < ttl <= expected and ttl > expected - 5000


def test_a_sequence_never_continues_on_another_model_version(tiny_run_dir, tmp_path, redis_server):
    import shutil

    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.export.repository import export_to_repository

    repo = tmp_path / "repo"
    export_to_repository(tiny_run_dir, repo, name="m", version=1)
    x = sample_input(1, 3)
    with _start(repo, redis_server.url) as srv, InferenceClient(srv.url) as client:
        client.infer("m", {"input": x}, sequence=_control(1, start=True))
    shutil.copytree(repo / "m" / "1", repo / "m" / "2")  # a new version: the latest policy serves it
    with _start(repo, redis_server.url) as srv, InferenceClient(srv.url) as client:
        with pytest.raises(ClientError) as info:
            client.infer("m", {"input": x}, sequence=_control(1))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "version 2" in str(info.value) and "stays on its version" in str(info.value)
        client.infer("m", {"input": x}, version="1", sequence=_control(1, end=True))  # still there on version 1
    assert redis_server.keys() == []


def _store(url: str, max_sequences: int = 100):
    from lstm_onnx.server.redis_store import RedisSequenceStore

    return RedisSequenceStore(url, max_sequences, 60.0)


STATE = {"hn": np.zeros((1, 2, 8), np.float32), "cn": np.zeros((1, 2, 8), np.float32)}


def test_two_stores_racing_on_one_step_exactly_one_wins_and_the_loser_hears_why(redis_server):
    from lstm_onnx.protocol.errors import Aborted

    async def race():
        a, b = _store(redis_server.url), _store(redis_server.url)
        start = a.reserve("m", _control(42, start=True), "s", version=1)
        await a.commit(start, await a.turn(start), STATE)
        winners = []
        for n in range(3):
            steps = [(store, store.reserve("m", _control(42), f"{name}{n}", version=1)) for store, name in ((a, "a"), (b, "b"))]
            turns = [await store.turn(step) for store, step in steps]  # both read the same version
            assert turns[0].step == turns[1].step == n + 2
            results = await asyncio.gather(*(store.commit(step, turn, {k: v + n + 1 + i for k, v in STATE.items()})
                                             for i, ((store, step), turn) in enumerate(zip(steps, turns))),
                                           return_exceptions=True)
            won = [i for i, r in enumerate(results) if r is None]
            lost = [r for r in results if r is not None]
            assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], Aborted), results
            assert "sequence 42 advanced elsewhere" in str(lost[0])
            winners.append((won[0], n))
        assert len(a) == len(b) == 0  # nothing in flight is left behind in either process
        check = b.reserve("m", _control(42), "check", version=1)
        turn = await b.turn(check)
        last_winner, n = winners[-1]
        assert turn.step == 5 and np.all(turn.state["hn"] == n + 1 + last_winner)  # the winner's state, whole
        await a.close()
        await b.close()

    asyncio.run(race())


def test_live_bound_holds_across_stores_and_end_frees_a_place(redis_server):
    from lstm_onnx.protocol.errors import ResourceExhausted

    async def fill():
        a, b = _store(redis_server.url, 2), _store(redis_server.url, 2)
        for store, sid in ((a, 1), (b, 2)):
            step = store.reserve("m", _control(sid, start=True), "", version=1)
            await store.commit(step, await store.turn(step), STATE)
        step = b.reserve("m", _control(3, start=True), "", version=1)
        with pytest.raises(ResourceExhausted, match="2 sequences are live in the sequence store redis:"):
            await b.commit(step, await b.turn(step), STATE)
        assert await a.live_count() == 2
        end = a.reserve("m", _control(1, end=True), "", version=1)
        await a.commit(end, await a.turn(end), STATE)
        step = b.reserve("m", _control(3, start=True), "", version=1)
        await b.commit(step, await b.turn(step), STATE)
        assert await b.live_count() == 2
        await a.close()
        await b.close()

    asyncio.run(fill())
    assert redis_server.keys() == [b"lstm-onnx:seq:m:1:i2", b"lstm-onnx:seq:m:1:i3"]


def test_an_abandoned_step_aborts_the_sequence_on_every_replica(redis_server):
    from lstm_onnx.protocol.errors import Aborted

    async def abandon():
        a, b = _store(redis_server.url), _store(redis_server.url)
        start = a.reserve("m", _control(7, start=True), "s", version=1)
        await a.commit(start, await a.turn(start), STATE)
        step = a.reserve("m", _control(7), "cancelled-one", version=1)
        await a.turn(step)
        a.abandon(step, "was cancelled (its call ended) before it was applied")
        await asyncio.sleep(0.2)  # the mark is written in the background
        other = b.reserve("m", _control(7), "next", version=1)
        with pytest.raises(Aborted, match="cancelled-one"):
            await b.turn(other)
        await a.close()
        await b.close()

    asyncio.run(abandon())


def test_merged_batch_commits_its_sequences_in_one_round_trip(redis_server):
    async def batch():
        store, other = _store(redis_server.url), _store(redis_server.url)
        steps = [store.reserve("m", _control(i, start=True), "", version=1) for i in range(16)]
        turns = [await store.turn(s) for s in steps]
        before = store.round_trips
        await asyncio.gather(*(store.commit(s, t, STATE) for s, t in zip(steps, turns)))
        assert store.round_trips - before == 1 and store.pipeline_sizes[16] == 1
        # The replica that wrote them continues them on its copies: no read at all.
        steps = [store.reserve("m", _control(i), "", version=1) for i in range(16)]
        before = store.round_trips
        turns = await asyncio.gather(*(store.turn(s) for s in steps))
        assert store.round_trips - before == 0 and store.copy_hits == 16 and store.reads == 0
        await asyncio.gather(*(store.commit(s, t, STATE) for s, t in zip(steps, turns)))
        assert store.round_trips - before == 1
        # Another replica reads them, in one pipeline: one round trip for the sixteen.
        steps = [other.reserve("m", _control(i), "", version=1) for i in range(16)]
        turns = await asyncio.gather(*(other.turn(s) for s in steps))
        assert other.round_trips == 1 and other.reads == 16 and other.copy_hits == 0
        assert all(t.step == 3 for t in turns)
        await store.close()
        await other.close()

    asyncio.run(batch())


def test_redis_down_fails_sequences_with_unavailable_serves_stateless_and_recovers(tiny_repository, redis_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lstm_onnx.client.client import ClientError, InferenceClient

    x = sample_input(1, 3)
    with _start(tiny_repository, redis_server.url) as srv, InferenceClient(srv.url) as client:
        def store_health():
            with grpc.insecure_channel(srv.url) as channel:
                request = health_pb2.HealthCheckRequest(service="lstm_onnx.SequenceStore")
                return health_pb2_grpc.HealthStub(channel).Check(request).status

        client.infer("tiny_lstm", {"input": x}, sequence=_control(1, start=True))
        assert store_health() == health_pb2.HealthCheckResponse.SERVING
        redis_server.stop()
        with pytest.raises(ClientError) as info:
            client.infer("tiny_lstm", {"input": x}, sequence=_control(1))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert f"sequence store {redis_server.url}: unreachable" in str(info.value)
        client.infer("tiny_lstm", {"input": x})  # stateless: served
        deadline = time.monotonic() + 10
        while store_health() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store_health() == health_pb2.HealthCheckResponse.NOT_SERVING
        redis_server.start()  # same port, empty: the old sequence is gone, a new one works
        deadline = time.monotonic() + 10
        while store_health() != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store_health() == health_pb2.HealthCheckResponse.SERVING
        client.infer("tiny_lstm", {"input": x}, sequence=_control(2, start=True))
        client.infer("tiny_lstm", {"input": x}, sequence=_control(2, end=True))
    assert redis_server.keys() == []


def test_store_counters_are_on_the_metrics_port(tiny_repository, redis_server):
    from bench.sequence_store import scrape
    from lstm_onnx.client.client import InferenceClient

    x = sample_input(1, 2)
    with _start(tiny_repository, redis_server.url, metrics_port=0, sequence_store_copies="true") as srv, \
            InferenceClient(srv.url) as client:
        before = scrape(srv.running.metrics_port)
        for i in range(3):
            client.infer("tiny_lstm", {"input": x}, sequence=_control(3, start=i == 0, end=i == 2))
        after = scrape(srv.running.metrics_port)
    # Three steps on one replica: a compare-and-set each, and no read: the continuations run on the copy this
    # process kept of what it wrote, which Redis would have invalidated had another process written the key.
    delta = {k: after[k] - before[k] for k in after}
    assert delta["lstm_onnx_sequence_store_commands"] == 3
    assert delta["lstm_onnx_sequence_store_round_trips"] == 3
    assert delta["lstm_onnx_sequence_store_copy_hits"] == 2 and delta["lstm_onnx_sequence_store_reads"] == 0
    assert delta["nv_inference_exec_count"] == 3


def test_a_missing_redis_server_skips_saying_why_but_fails_in_ci(monkeypatch):
    import redis_server

    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        redis_server.require_redis_server()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y redis-server"):
        redis_server.require_redis_server()


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_request_naming_its_step_is_never_applied_twice(tiny_repository, redis_server, store):
    from lstm_onnx.client.client import ClientError, InferenceClient
    from lstm_onnx.protocol.codec import SequenceControl
    from lstm_onnx.protocol.rest_codec import decode_sequence_json

    assert decode_sequence_json({"sequence_id": 4, "sequence_step": 2}) == SequenceControl(4, step=2)
    x = sample_input(1, 3)
    with _start(tiny_repository, redis_server.url if store == "redis" else "memory") as srv, \
            InferenceClient(srv.url) as client:
        client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(4, start=True, step=1))
        client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(4, step=2))
        with pytest.raises(ClientError) as info:  # the same step again: a retry after a lost answer
            client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(4, step=2))
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "already applied" in str(info.value)
        with pytest.raises(ClientError, match="step 3 must come first"):
            client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(4, step=4))
        client.infer("tiny_lstm", {"input": x}, sequence=SequenceControl(4, end=True, step=3))  # the log went on


def test_the_password_comes_from_the_environment_and_a_wrong_one_is_unavailable(monkeypatch):
    from redis_server import RedisServer, require_redis_server

    from lstm_onnx.protocol.errors import Unavailable
    from lstm_onnx.server.redis_store import PASSWORD_ENV

    server = RedisServer(require_redis_server(), None, "--requirepass", "s3cret").start()
    try:
        async def step(expect_ok: bool):
            store = _store(server.url)
            start = store.reserve("m", _control(1, start=True), "", version=1)
            turn = await store.turn(start)
            if expect_ok:
                await store.commit(start, turn, STATE)
            else:
                with pytest.raises(Unavailable, match=f"sequence store {server.url}: unreachable"):
                    await store.commit(start, turn, STATE)
            await store.close()

        monkeypatch.setenv(PASSWORD_ENV, "s3cret")
        asyncio.run(step(True))
        monkeypatch.setenv(PASSWORD_ENV, "wrong")
        asyncio.run(step(False))
    finally:
        server.stop()


def test_a_sequence_belongs_to_the_identity_that_started_it_on_every_replica(redis_server):
    """Under mutual TLS the owner is kept in Redis with the state: another identity is refused on any replica,
    whether it continues (which would read hn/cn), restarts or ends the sequence; the owner goes on."""
    from lstm_onnx.protocol.errors import PermissionDenied
    from lstm_onnx.server.clients import Client

    alice, mallory = Client("10.0.0.1", "alice"), Client("10.0.0.2", "mallory")

    async def go():
        a, b = _store(redis_server.url), _store(redis_server.url)
        start = a.reserve("m", _control(9, start=True), "s", alice, version=1)
        await a.commit(start, await a.turn(start), STATE)
        for control in (_control(9), _control(9, end=True)):
            step = b.reserve("m", control, "m1", mallory, version=1)
            with pytest.raises(PermissionDenied, match="another client identity"):
                await b.turn(step)
        restart = b.reserve("m", _control(9, start=True), "m2", mallory, version=1)
        with pytest.raises(PermissionDenied, match="another client identity"):
            await b.commit(restart, await b.turn(restart), {k: v + 5 for k, v in STATE.items()})
        step = b.reserve("m", _control(9), "a2", alice, version=1)  # the owner, on the other replica
        turn = await b.turn(step)
        assert turn.step == 2 and all(np.array_equal(turn.state[k], STATE[k]) for k in STATE)
        await b.commit(step, turn, STATE)
        await a.close()
        await b.close()

    asyncio.run(go())


# -- copies: a replica continues what it wrote without a read, and only while Redis has not said otherwise ---------

def _state(value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in STATE.items()}


async def _apply(store, sid, request_id: str, value: float, start: bool = False, end: bool = False):
    step = store.reserve("m", _control(sid, start=start, end=end), request_id, version=1)
    turn = await store.turn(step)
    await store.commit(step, turn, _state(value))
    return turn


def test_a_replica_continues_its_own_sequence_from_its_copy_and_reads_after_another_replica_wrote(redis_server):
    async def alternate():
        a, b = _store(redis_server.url), _store(redis_server.url)
        await _apply(a, 5, "s", 1.0, start=True)
        turn = await _apply(a, 5, "a2", 2.0)  # a wrote step 1: its copy, no read
        assert (a.copy_hits, a.reads) == (1, 0) and turn.step == 2 and np.all(turn.state["hn"] == 1.0)
        turn = await _apply(b, 5, "b3", 3.0)  # b never saw it: reads Redis
        assert (b.copy_hits, b.reads) == (0, 1) and turn.step == 3 and np.all(turn.state["hn"] == 2.0)
        # b's write reached a as an invalidation: a reads b's state, not its own copy of step 2.
        turn = await _apply(a, 5, "a4", 4.0)
        assert (a.copy_hits, a.reads) == (1, 1) and turn.step == 4 and turn.previous_id == "b3"
        assert np.all(turn.state["hn"] == 3.0)
        turn = await _apply(a, 5, "a5", 5.0)  # and a's copy again from then on
        assert (a.copy_hits, a.reads) == (2, 1) and np.all(turn.state["hn"] == 4.0)
        await a.close()
        await b.close()

    asyncio.run(alternate())


def test_an_invalidation_not_yet_read_when_the_next_step_arrives_is_read_first(redis_server):
    async def unread():
        a, b = _store(redis_server.url), _store(redis_server.url)
        await _apply(a, 6, "s", 1.0, start=True)
        reader = a._tracker_tasks[0]
        reader.cancel()  # a's loop has not got round to reading the invalidation when the next step comes
        await asyncio.gather(reader, return_exceptions=True)
        await _apply(b, 6, "b2", 2.0)
        turn = await _apply(a, 6, "a3", 3.0)  # the copy is not trusted while bytes from Redis wait unread
        assert a.copy_hits == 0 and a.reads == 1 and turn.previous_id == "b2" and np.all(turn.state["hn"] == 2.0)
        await a.close()
        await b.close()

    asyncio.run(unread())


def test_a_stale_copy_costs_an_aborted_never_a_forked_state(redis_server):
    from lstm_onnx.protocol.errors import Aborted

    async def stale():
        a, b = _store(redis_server.url), _store(redis_server.url)
        await _apply(a, 7, "s", 1.0, start=True)
        key = next(iter(a._copies))
        lost = a._copies[key]
        await _apply(b, 7, "b2", 2.0)
        await asyncio.sleep(0)
        a._copies[key] = lost  # as if b's invalidation never reached a
        with pytest.raises(Aborted, match="sequence 7 advanced elsewhere: .*applied step 2 \\(request 'b2'\\)"):
            await _apply(a, 7, "a2", 9.0)
        assert a.copy_hits == 1 and key not in a._copies
        turn = await _apply(a, 7, "a3", 3.0)  # the next step reads, and continues b's state
        assert a.reads == 1 and turn.previous_id == "b2" and np.all(turn.state["hn"] == 2.0)
        check = b.reserve("m", _control(7), "check", version=1)
        turn = await b.turn(check)
        assert turn.step == 4 and np.all(turn.state["hn"] == 3.0)  # 9.0, the stale step's result, never landed
        await a.close()
        await b.close()

    asyncio.run(stale())


def test_copies_are_dropped_when_the_invalidations_connection_is_lost_and_come_back(redis_server):
    async def lost():
        a, b = _store(redis_server.url), _store(redis_server.url)
        await _apply(a, 8, "s", 1.0, start=True)
        assert a._copies
        redis_server.client().client_kill_filter(_type="pubsub")  # every replica's invalidations connection
        for _ in range(200):
            if not a._tracking:
                break
            await asyncio.sleep(0.01)
        assert not a._tracking and not a._copies
        await _apply(b, 8, "b2", 2.0)
        turn = await _apply(a, 8, "a3", 3.0)
        assert a.reads == 1 and np.all(turn.state["hn"] == 2.0)
        assert a._tracking and a._copies  # tracking restarted with that write: copies again
        turn = await _apply(a, 8, "a4", 4.0)
        assert a.copy_hits == 1 and np.all(turn.state["hn"] == 3.0)
        await a.close()
        await b.close()

    asyncio.run(lost())


def test_with_copies_off_every_step_reads_redis(redis_server):
    from lstm_onnx.server.redis_store import RedisSequenceStore

    async def off():
        store = RedisSequenceStore(redis_server.url, 10, 60.0, copies=False)
        await _apply(store, 9, "s", 1.0, start=True)
        for n in range(3):
            turn = await _apply(store, 9, f"r{n}", 2.0 + n)
        assert (store.copy_hits, store.reads) == (0, 3) and np.all(turn.state["hn"] == 3.0)
        assert not store._copies
        await store.close()

    asyncio.run(off())


def test_a_redis_that_refuses_client_tracking_serves_every_step_by_reading(caplog):
    from redis_server import RedisServer, require_redis_server

    server = RedisServer(require_redis_server(), None, "--rename-command", "CLIENT", "").start()
    try:
        async def refused():
            store = _store(server.url)
            await _apply(store, 1, "s", 1.0, start=True)
            turn = await _apply(store, 1, "r", 2.0)
            assert not store.copies_enabled and (store.copy_hits, store.reads) == (0, 1)
            assert np.all(turn.state["hn"] == 1.0)
            await store.close()

        asyncio.run(refused())
    finally:
        server.stop()
    assert "sequence store refuses CLIENT TRACKING: every step reads its state from Redis" in caplog.text


# -- the per-client share over all replicas ------------------------------------------------------------------------

def test_a_clients_share_of_sequences_holds_across_replicas(redis_server):
    from lstm_onnx.protocol.errors import ResourceExhausted
    from lstm_onnx.server.clients import Client
    from lstm_onnx.server.redis_store import RedisSequenceStore

    greedy, other = Client("10.0.0.1"), Client("10.0.0.2")

    async def share():
        a, b = (RedisSequenceStore(redis_server.url, 100, 60.0, max_per_client=2) for _ in range(2))

        async def start(store, sid, client):
            step = store.reserve("m", _control(sid, start=True), "", client, version=1)
            await store.commit(step, await store.turn(step), STATE)

        await start(a, 1, greedy)
        await start(b, 2, greedy)
        await start(a, 1, greedy)  # a restart of its own sequence takes no new place
        with pytest.raises(ResourceExhausted, match=r"sequence 3: this client \(address 10.0.0.1\) holds 2 live "
                                                    r"sequences in the sequence store redis://.*its share is 2"):
            await start(a, 3, greedy)
        await start(b, 3, other)  # another client is not held back
        end = b.reserve("m", _control(2, end=True), "", greedy, version=1)
        await b.commit(end, await b.turn(end), STATE)  # an end frees a place, on every replica
        await start(a, 4, greedy)
        await a.close()
        await b.close()

    asyncio.run(share())
    keys = redis_server.keys("lstm-onnx:clients:*")
    assert keys == [b"lstm-onnx:clients:address 10.0.0.1", b"lstm-onnx:clients:address 10.0.0.2"]
    client = redis_server.client()
    assert client.zcard(keys[0]) == 2 and client.zcard(keys[1]) == 1 and client.pttl(keys[0]) > 0


# -- rediss:// with a password, through the server ---------------------------------------------------------------

def test_a_server_on_a_tls_redis_with_a_password_from_the_environment(tiny_repository, tmp_path, monkeypatch):
    from pki import issue, write
    from redis_server import RedisServer, require_redis_server

    from lstm_onnx.client.client import InferenceClient
    from lstm_onnx.server.redis_store import PASSWORD_ENV

    ca, ca_key = issue("redis test CA", ca=True)
    cert, key = write(tmp_path / "redis", *issue("127.0.0.1", ca, ca_key, server=True))
    ca_file = write(tmp_path / "ca", ca, ca_key)[0]
    server = RedisServer(require_redis_server(), None, "--requirepass", "s3cret",
                         tls={"cert": cert, "key": key, "ca": ca_file}).start()
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    model = tiny_repository / "tiny_lstm" / "1" / "model.onnx"
    x = sample_input(1, 8, seed=3)
    try:
        assert server.url.startswith("rediss://")
        with _start(tiny_repository, server.url) as srv, InferenceClient(srv.url) as client:
            answers = [client.infer("tiny_lstm", {"input": x[:, i:i + 2]},
                                    sequence=_control(11, start=i == 0, end=i == 6)) for i in range(0, 8, 2)]
        import onnxruntime as ort

        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)  # zero state, batch 1
                for i in session.get_inputs() if i.name != "input"}
        whole = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x, **feed})))
        np.testing.assert_allclose(answers[-1]["output"], whole["output"], atol=1e-5, rtol=0)
    finally:
        server.stop()
