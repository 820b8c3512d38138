"""The sequence store on its own (a fake clock, no server): ordered places, compare-and-set, refusals, eviction."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from lstm_onnx.protocol.codec import SequenceControl
from lstm_onnx.protocol.errors import Aborted, FailedPrecondition, Internal, InvalidArgument, ResourceExhausted
from lstm_onnx.server.sequences import SequenceStore, Turn


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _store(max_sequences=4, idle=10.0, **kw):
    clock = Clock()
    return SequenceStore(max_sequences, idle, clock=clock, **kw), clock


def _state(value: float) -> dict[str, np.ndarray]:
    return {"hn": np.full((1, 2), value, np.float32)}


def _apply(store, control, request_id, value):
    """One step start to end: reserve, turn, commit; the Turn it ran on."""
    async def go():
        step = store.reserve("m", control, request_id)
        turn = await store.turn(step)
        await store.commit(step, turn, _state(value))
        return turn
    return asyncio.run(go())


def test_steps_continue_their_predecessor_and_say_which_they_are():
    store, _ = _store()
    first = _apply(store, SequenceControl(1, start=True), "a", 1.0)
    assert first == Turn(None, 0, 1, "")
    second = _apply(store, SequenceControl(1), "b", 2.0)
    assert (second.version, second.step, second.previous_id) == (1, 2, "a")
    np.testing.assert_array_equal(second.state["hn"], _state(1.0)["hn"])
    third = _apply(store, SequenceControl(1), "c", 3.0)
    assert (third.version, third.step, third.previous_id) == (2, 3, "b")
    np.testing.assert_array_equal(third.state["hn"], _state(2.0)["hn"])
    assert ("m", 1) in store and len(store) == 1


def test_start_on_a_live_idle_id_runs_on_zeros():
    store, _ = _store()
    _apply(store, SequenceControl(1, start=True), "a", 1.0)
    _apply(store, SequenceControl(1), "b", 2.0)
    restart = _apply(store, SequenceControl(1, start=True), "c", 3.0)
    assert (restart.state, restart.step, restart.previous_id) == (None, 1, "")
    after = _apply(store, SequenceControl(1), "d", 4.0)
    assert (after.step, after.previous_id) == (2, "c")
    np.testing.assert_array_equal(after.state["hn"], _state(3.0)["hn"])


def test_unknown_id_and_the_limit_are_refused_with_their_reasons():
    store, _ = _store(max_sequences=2)
    with pytest.raises(InvalidArgument) as caught:
        store.reserve("m", SequenceControl(9))
    assert str(caught.value) == ("sequence 9 for model 'm': unknown (never started, ended, or evicted after idling); "
                                 "its first request must set sequence_start")
    _apply(store, SequenceControl(1, start=True), "a", 1.0)
    _apply(store, SequenceControl(2, start=True), "b", 1.0)
    with pytest.raises(ResourceExhausted) as caught:
        store.reserve("m", SequenceControl(3, start=True))
    assert str(caught.value) == ("sequence 3: 2 sequences are live on this server process, the limit is 2 "
                                 "(max_sequences, per worker); end or let some expire first")
    assert _apply(store, SequenceControl(1, start=True), "c", 1.0).step == 1  # a known id restarts at the limit
    assert ("m", 3) not in store


def test_an_ended_sequence_is_forgotten():
    store, _ = _store()
    _apply(store, SequenceControl(1, start=True), "a", 1.0)
    _apply(store, SequenceControl(1, end=True), "b", 2.0)
    assert ("m", 1) not in store and len(store) == 0
    with pytest.raises(InvalidArgument):
        store.reserve("m", SequenceControl(1))


def test_a_step_waits_for_its_turn_and_runs_on_the_state_its_predecessor_left():
    store, _ = _store()
    _apply(store, SequenceControl(1, start=True), "a", 1.0)

    async def go():
        one = store.reserve("m", SequenceControl(1), "b")
        two = store.reserve("m", SequenceControl(1), "c")
        later = asyncio.ensure_future(store.turn(two))
        await asyncio.sleep(0)
        assert not later.done()  # its predecessor is not resolved yet
        turn_one = await store.turn(one)
        await asyncio.sleep(0)
        assert not later.done()
        await store.commit(one, turn_one, _state(5.0))
        return await asyncio.wait_for(later, 5)

    turn = asyncio.run(go())
    assert (turn.step, turn.previous_id, turn.version) == (3, "b", 2)
    assert store._live[("m", 1)].waiters == {}  # a woken step leaves no waiter behind
    np.testing.assert_array_equal(turn.state["hn"], _state(5.0)["hn"])


def test_steps_behind_an_abandoned_one_are_aborted_until_a_start():
    store, _ = _store()
    _apply(store, SequenceControl(1, start=True), "a", 1.0)

    async def go():
        one = store.reserve("m", SequenceControl(1), "b")
        two = store.reserve("m", SequenceControl(1), "c")
        behind = asyncio.ensure_future(store.turn(two))
        await store.turn(one)
        store.abandon(one, "was cancelled before it was applied")
        with pytest.raises(Aborted) as caught:
            await asyncio.wait_for(behind, 5)
        store.abandon(two, "failed")  # already refused: the first reason is kept
        return str(caught.value)

    message = asyncio.run(go())
    assert message == ("sequence 1: step (request 'b') was cancelled before it was applied; this request would run "
                       "on the state from before it, so it is refused; start the sequence again with sequence_start")
    assert len(store) == 0 and ("m", 1) in store  # aborted: not live, but held to say why
    with pytest.raises(Aborted, match="request 'b'"):
        _apply(store, SequenceControl(1), "d", 1.0)
    assert _apply(store, SequenceControl(1, start=True), "e", 1.0).state is None
    assert _apply(store, SequenceControl(1), "f", 2.0).previous_id == "e" and len(store) == 1


def test_a_step_given_up_while_waiting_is_resolved_in_order():
    store, _ = _store()
    _apply(store, SequenceControl(1, start=True), "a", 1.0)

    async def go():
        one = store.reserve("m", SequenceControl(1), "b")
        two = store.reserve("m", SequenceControl(1), "c")
        three = store.reserve("m", SequenceControl(1), "d")
        waiting = asyncio.ensure_future(store.turn(three))
        turn_one = await store.turn(one)
        store.abandon(two, "passed its deadline")  # before its turn: kept until one resolves
        await asyncio.sleep(0)
        assert not waiting.done()
        await store.commit(one, turn_one, _state(2.0))
        with pytest.raises(Aborted) as caught:
            await asyncio.wait_for(waiting, 5)
        return str(caught.value)

    assert "step (request 'c') passed its deadline" in asyncio.run(go())


def test_a_step_behind_a_sequence_end_is_refused():
    store, _ = _store()
    _apply(store, SequenceControl(1, start=True), "a", 1.0)

    async def go():
        ending = store.reserve("m", SequenceControl(1, end=True), "b")
        behind = store.reserve("m", SequenceControl(1), "c")
        waiting = asyncio.ensure_future(store.turn(behind))
        turn = await store.turn(ending)
        await store.commit(ending, turn, _state(2.0))
        with pytest.raises(FailedPrecondition) as caught:
            await asyncio.wait_for(waiting, 5)
        return str(caught.value)

    assert asyncio.run(go()) == ("sequence 1: ended by step 2 (request 'b') (sequence_end) before this request's "
                                 "turn; start it again with sequence_start")
    assert ("m", 1) not in store


def test_commit_on_a_stale_version_is_internal():
    store, _ = _store()

    async def go():
        step = store.reserve("m", SequenceControl(1, start=True), "a")
        turn = await store.turn(step)
        await store.commit(step, Turn(None, turn.version, 1, ""), _state(1.0))
        again = store.reserve("m", SequenceControl(1), "b")
        stale = await store.turn(again)
        with pytest.raises(Internal, match="commit of place 2 at version 0 found 1 resolved, version 1"):
            await store.commit(again, Turn(stale.state, 0, 2, "a"), _state(2.0))

    asyncio.run(go())


def test_idle_sequences_are_evicted_after_their_models_timeout_but_not_while_busy():
    store, clock = _store(idle=10.0, idle_timeouts={"fast": 2.0})
    assert store.shortest_idle_timeout_s == 2.0
    _apply(store, SequenceControl(1, start=True), "a", 1.0)
    fast = store.reserve("fast", SequenceControl(1, start=True), "b")
    clock.now += 5
    assert store.evict_idle() == []  # "fast" has a step pending; "m" is within its 10 s
    asyncio.run(_finish(store, fast))
    clock.now += 2.5
    assert store.evict_idle() == [("fast", 1)]
    clock.now += 2.5
    assert store.evict_idle() == []  # "m": exactly its 10 s since its last step, not more
    clock.now += 0.1
    assert store.evict_idle() == [("m", 1)] and len(store) == 0


async def _finish(store, step):
    turn = await store.turn(step)
    await store.commit(step, turn, _state(0.0))


def test_aborted_sequences_are_bounded_oldest_first():
    store, clock = _store(max_sequences=1)

    def abort(sequence_id):
        async def go():
            step = store.reserve("m", SequenceControl(sequence_id, start=True), "s")
            await store.turn(step)
            store.abandon(step, "failed")
        clock.now += 1
        asyncio.run(go())

    abort(2)
    assert ("m", 2) in store and len(store) == 0
    abort(1)
    assert ("m", 2) not in store and ("m", 1) in store  # only max_sequences aborted ones, the latest, are kept


def test_bounding_aborted_sequences_never_drops_a_live_one():
    store, clock = _store(max_sequences=2)
    _apply(store, SequenceControl("live", start=True), "a", 1.0)  # idle, and older than the aborted ones

    async def abort(sequence_id):
        clock.now += 1
        step = store.reserve("m", SequenceControl(sequence_id, start=True), "s")
        await store.turn(step)
        store.abandon(step, "failed")

    asyncio.run(abort("dead1"))
    asyncio.run(abort("dead2"))
    assert ("m", "live") in store and len(store) == 1
    assert ("m", "dead1") in store and ("m", "dead2") in store


def test_request_id_defaults_to_empty():
    store, _ = _store()

    async def go():
        step = store.reserve("m", SequenceControl(1, start=True))
        await store.commit(step, await store.turn(step), _state(1.0))
        return await store.turn(store.reserve("m", SequenceControl(1)))

    assert asyncio.run(go()).previous_id == ""


def test_eviction_is_logged_with_its_counts(caplog):
    store, clock = _store(idle=1.0)
    _apply(store, SequenceControl(1, start=True), "a", 1.0)
    _apply(store, SequenceControl(2, start=True), "b", 1.0)
    clock.now += 2
    with caplog.at_level("INFO", logger="lstm_onnx.server"):
        store.evict_idle()
        store.evict_idle()  # nothing left to evict: nothing logged
    (record,) = [r for r in caplog.records if r.name == "lstm_onnx.server"]
    assert (record.getMessage(), record.fields) == ("sequences evicted", {"count": 2, "live": 0})
