"""Live sequences as strictly ordered logs of steps: each step runs on exactly its predecessor's state, or is refused.

A request of a sequence takes a place in its sequence's log when it arrives (`reserve`), waits until every
earlier step is resolved (`turn`), and then either commits its new state (`commit`, a compare-and-set on the
sequence's version) or is abandoned (`abandon`: cancelled, past its deadline, or failed). An abandoned step
changes nothing, and every later step is refused with the reason until a sequence_start: a step never runs on
a state other than the one its predecessor left. The same four calls are what a shared store (Redis: INCR for
the place, a Lua compare-and-set on the version) implements.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lstm_onnx.protocol.codec import SequenceControl
from lstm_onnx.protocol.errors import (
    Aborted,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)

from .clients import ANONYMOUS, Client

log = logging.getLogger("lstm_onnx.server")

State = dict[str, np.ndarray]


@dataclass
class Sequence:
    """One sequence id's log: places handed out and resolved, and the state its last applied step left."""

    key: tuple[str, int | str]
    issued: int = 0  # places handed out, in arrival order (1-based)
    resolved: int = 0  # places resolved (applied, refused or abandoned); always a prefix of the issued ones
    version: int = 0  # compare-and-set counter: +1 on every applied step
    step: int = 0  # steps applied since the last sequence_start (1 = the start itself)
    state: State | None = None  # None: zeros (nothing applied since the start)
    last_request: str = ""  # request id of the last applied step
    ended: str = ""  # set by an applied sequence_end: which request ended it
    broken: str = ""  # why the log cannot go on (a step abandoned); cleared by the next sequence_start
    last_used: float = 0.0
    owner: str = ""  # the certificate identity that started it ("" without mutual TLS: anyone may address it)
    client: str = ""  # Client.key of its starter, whose share of the slots it takes
    abandoned_early: dict[int, str] = field(default_factory=dict)  # place -> reason, given up before its turn
    waiters: dict[int, asyncio.Future] = field(default_factory=dict)  # place -> woken when its turn comes

    @property
    def busy(self) -> bool:
        return self.resolved < self.issued


@dataclass
class Step:
    """A request's place in its sequence's log, captured when it arrived."""

    sequence: Sequence
    place: int
    control: SequenceControl
    request_id: str
    seen: tuple | None = None  # a shared store's (incarnation, version) that this step's turn read


@dataclass(frozen=True)
class Turn:
    """What a step runs on once its turn has come: the state (None: zeros) and the version it must find on commit."""

    state: State | None
    version: int
    step: int  # the number this step gets in the sequence (1 for a sequence_start)
    previous_id: str  # request id of the step whose state this one continues ("" for a sequence_start)


def check_step(step: Step, applied: int, last_request: str) -> None:
    """Refuse a request that names its step number (`sequence_step`) when the sequence is not one step before it."""
    want = step.control.step
    if not want or want == applied + 1:
        return
    if want <= applied:
        raise FailedPrecondition(f"sequence {step.control.id!r}: this request is step {want} (sequence_step), which "
                                 f"is already applied (the last applied is step {applied}, request {last_request!r}); "
                                 "it is not applied twice")
    raise FailedPrecondition(f"sequence {step.control.id!r}: this request is step {want} (sequence_step), but the "
                             f"last applied is step {applied}; step {applied + 1} must come first")


class SequenceStore:
    """In-memory sequences keyed by (model, sequence id); bounded in number and forgotten after an idle timeout.

    Aborted sequences are kept (not counted as live, at most max_sequences of them) until they idle out, so a
    client continuing one hears why it was aborted rather than "unknown".
    """

    name = "memory"  # what errors, logs and health call this store

    def __init__(self, max_sequences: int, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 idle_timeouts: dict[str, float] | None = None, max_per_client: int = 0):
        self.max_sequences = max_sequences
        self.max_per_client = max_per_client  # 0: no share, only max_sequences
        self.idle_timeout_s = idle_timeout_s
        self.idle_timeouts = dict(idle_timeouts or {})  # per model, from config.pbtxt; others use idle_timeout_s
        self._clock = clock
        self._live: dict[tuple[str, int | str], Sequence] = {}

    def __len__(self) -> int:
        """Live sequences: those not aborted (a step of theirs pending counts them live too)."""
        return sum(1 for s in self._live.values() if not s.broken or s.busy)

    def __contains__(self, key: tuple[str, int | str]) -> bool:
        """Whether (model, sequence id) is held: live, or aborted and not yet idled out."""
        return key in self._live

    def reserve(self, model: str, control: SequenceControl, request_id: str = "", client: Client = ANONYMOUS,
                version: int = 0) -> Step:
        """A place at the end of the sequence's log; refuses an id never started, a new id beyond the limit or
        the client's share, and a sequence another authenticated identity started.

        `version`: the model version that runs the step (the Redis store keys on it; one process's memory does not).
        """
        self.evict_idle()
        key = (model, control.id)
        sequence = self._live.get(key)
        if sequence is not None and sequence.owner and sequence.owner != client.identity:
            raise PermissionDenied(f"sequence {control.id!r} for model '{model}': started by another client "
                                   f"identity, so this one ({client.identity or 'unauthenticated'!r}) may not "
                                   "continue, read or end it")
        if sequence is None:
            if not control.start:
                raise InvalidArgument(f"sequence {control.id!r} for model '{model}': unknown (never started, ended, "
                                      "or evicted after idling); its first request must set sequence_start")
            if len(self) >= self.max_sequences:
                raise ResourceExhausted(f"sequence {control.id!r}: {len(self)} sequences are live on this server "
                                        f"process, the limit is {self.max_sequences} (max_sequences, per worker); "
                                        "end or let some expire first")
            held = sum(1 for s in self._live.values() if s.client == client.key and (not s.broken or s.busy))
            if self.max_per_client and held >= self.max_per_client:
                raise ResourceExhausted(f"sequence {control.id!r}: this client ({client.key}) holds {held} sequences, "
                                        f"its share is {self.max_per_client} (max_sequences_per_client, per worker); "
                                        "end or let some expire first")
            sequence = self._live[key] = Sequence(key, owner=client.identity, client=client.key)
        sequence.issued += 1
        sequence.last_used = self._clock()
        return Step(sequence, sequence.issued, control, request_id)

    async def turn(self, step: Step) -> Turn:
        """Wait until every earlier step of the sequence is resolved; then the state this step runs on.

        Raises (and resolves the step as refused) when the step cannot run on its predecessor's state:
        FailedPrecondition when the sequence was ended before its turn, Aborted when an earlier step was
        abandoned. A sequence_start always runs, on zeros. Cancelled while waiting: the caller must `abandon`.
        """
        await self._wait_turn(step)
        sequence = step.sequence
        if step.control.start:
            return Turn(None, sequence.version, 1, "")
        self._refuse_if_broken(step)
        try:
            check_step(step, sequence.step, sequence.last_request)
        except FailedPrecondition:
            self._resolve(step)
            raise
        return Turn(sequence.state, sequence.version, sequence.step + 1, sequence.last_request)

    async def _wait_turn(self, step: Step) -> None:
        sequence = step.sequence
        if sequence.resolved < step.place - 1:
            waiter = asyncio.get_running_loop().create_future()
            sequence.waiters[step.place] = waiter
            try:
                await waiter
            finally:
                sequence.waiters.pop(step.place, None)
        if sequence.resolved != step.place - 1:
            raise Internal(f"sequence {step.control.id!r}: place {step.place} woken with {sequence.resolved} resolved")

    def _refuse_if_broken(self, step: Step) -> None:
        """Resolve the step as refused, and raise, when the local log says it cannot run (aborted, or ended)."""
        sequence = step.sequence
        if sequence.broken:
            self._resolve(step)
            raise Aborted(f"sequence {step.control.id!r}: {sequence.broken}; this request would run on the state "
                          "from before it, so it is refused; start the sequence again with sequence_start")
        if sequence.ended:
            self._resolve(step)
            raise FailedPrecondition(f"sequence {step.control.id!r}: ended by {sequence.ended} (sequence_end) before "
                                     "this request's turn; start it again with sequence_start")

    async def commit(self, step: Step, turn: Turn, state: State) -> None:
        """Apply the step: compare-and-set on the version the turn saw; the step leaves `state` for the next.

        Never suspends here (in memory), so a step is either applied and answered, or abandoned.
        """
        sequence = step.sequence
        if sequence.resolved != step.place - 1 or sequence.version != turn.version:
            raise Internal(f"sequence {step.control.id!r}: commit of place {step.place} at version {turn.version} "
                           f"found {sequence.resolved} resolved, version {sequence.version}")
        sequence.version += 1
        sequence.step = turn.step
        sequence.state = None if step.control.end else state
        sequence.last_request = step.request_id
        sequence.broken = ""
        sequence.ended = f"step {turn.step} (request {step.request_id!r})" if step.control.end else ""
        self._resolve(step)

    def abandon(self, step: Step, reason: str) -> None:
        """The step did not apply (cancelled, deadline, failed): nothing after it may run until a sequence_start."""
        sequence = step.sequence
        what = f"step (request {step.request_id!r}) {reason}"
        if sequence.resolved >= step.place:  # already resolved (refused at its turn): keep the first reason
            return
        if sequence.resolved < step.place - 1:  # given up while waiting: resolved in order when its turn comes
            sequence.abandoned_early[step.place] = what
            return
        sequence.broken = what
        self._resolve(step)

    def _resolve(self, step: Step) -> None:
        sequence = step.sequence
        sequence.resolved = step.place
        sequence.last_used = self._clock()
        while sequence.resolved + 1 in sequence.abandoned_early:
            sequence.broken = sequence.abandoned_early.pop(sequence.resolved + 1)
            sequence.resolved += 1
        waiter = sequence.waiters.get(sequence.resolved + 1)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not sequence.busy and self._live.get(sequence.key) is sequence:
            if sequence.ended:
                del self._live[sequence.key]
            elif sequence.broken:
                self._bound_aborted()

    def _bound_aborted(self) -> None:
        aborted = [k for k, s in self._live.items() if s.broken and not s.busy]
        for key in sorted(aborted, key=lambda k: self._live[k].last_used)[:max(0, len(aborted) - self.max_sequences)]:
            del self._live[key]

    @property
    def shortest_idle_timeout_s(self) -> float:
        return min([self.idle_timeout_s, *self.idle_timeouts.values()])

    def evict_idle(self) -> list[tuple[str, int | str]]:
        """Forget sequences idle longer than their model's timeout (not one with a step pending)."""
        now = self._clock()
        stale = [k for k, s in self._live.items()
                 if now - s.last_used > self.idle_timeouts.get(k[0], self.idle_timeout_s) and not s.busy]
        for key in stale:
            del self._live[key]
        if stale:
            log.info("sequences evicted", extra={"fields": {"count": len(stale), "live": len(self)}})
        return stale
