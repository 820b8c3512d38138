"""Sequences in Redis, shared by replicas: one hash per live sequence and model version, compare-and-set per step.

Within one process a sequence's steps still queue in a local log (the memory store's `reserve`/`turn`), so two
requests of one sequence never run at once here. Across processes the order is the order of commits: a step reads
the sequence's (incarnation, version) with its state, runs, and writes back with a Lua compare-and-set on both;
a step whose sequence advanced elsewhere meanwhile is refused (ABORTED) and its result discarded, so the state is
never forked. The idle timeout is the key's TTL; sequence_end deletes the key; a sorted set of live keys (score:
expiry) bounds live sequences across all replicas. Reads and writes made in one event-loop turn (the commits of a
merged batch, the reads of requests that arrived together) go to Redis in one pipeline: one round trip.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import Callable

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from lstm_onnx.protocol.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)

from .redis_wire import ABANDON, COMMIT, FIELDS, decode_state, encode_state, redact
from .sequences import Sequence, SequenceStore, State, Step, Turn, check_step

log = logging.getLogger("lstm_onnx.server")

PASSWORD_ENV = "LSTM_ONNX_SEQUENCE_STORE_PASSWORD"  # never a flag: it would show in `ps`
PREFIX = "lstm-onnx:"
# Redis being down must fail a request in about a second, not hang it: these bound every connect and reply.
CONNECT_TIMEOUT_S = 1.0
REPLY_TIMEOUT_S = 2.0
PIPELINES = 4  # connections to Redis for steps, each with at most one pipeline in flight

class RedisSequenceStore(SequenceStore):
    """The memory store's four calls over Redis: the state lives in Redis, only steps in flight live here."""

    def __init__(self, url: str, max_sequences: int, idle_timeout_s: float, idle_timeouts: dict[str, float] | None = None,
                 password: str | None = None, prefix: str = PREFIX):
        super().__init__(max_sequences, idle_timeout_s, idle_timeouts=idle_timeouts)
        self.url = url
        self.name = redact(url)
        self.prefix = prefix
        password = password if password is not None else os.environ.get(PASSWORD_ENV) or None
        options = dict(password=password, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=REPLY_TIMEOUT_S,
                       retry=Retry(NoBackoff(), 0))
        # No retries: a compare-and-set sent again after a lost reply would find its own write and report it lost.
        self.redis = aioredis.from_url(url, **options)  # health checks, script loading, counts
        # Steps go over a few connections of their own, one pipeline in flight on each: what queues meanwhile goes
        # in the next (as the batcher merges runs), so a read need not wait behind a batch's compare-and-sets, and
        # no pool is consulted per command.
        pool = aioredis.ConnectionPool.from_url(url, **options)
        self._connections = [pool.make_connection() for _ in range(PIPELINES)]
        self._idle = list(self._connections)
        self._starting = False  # a writer is scheduled and has not taken the queue yet
        self._live_key = f"{prefix}live"
        self._incarnations = f"{prefix}incarnations"
        self._sha: dict[str, str] = {}
        self._queued: list[tuple[tuple, asyncio.Future]] = []
        self.healthy: bool | None = None  # None until the first check
        self.on_health: Callable[[bool], None] | None = None
        # The store's own counters: round trips to Redis, commands sent, and commands per round trip.
        self.round_trips = 0
        self.commands = 0
        self.pipeline_sizes: Counter = Counter()

    # -- the four calls -----------------------------------------------------------------------------------------

    def reserve(self, model: str, control, request_id: str = "", client=None, version: int = 0) -> Step:
        """A place in this process's log of the sequence; whether the id is known is Redis's to say, at its turn.

        The owner identity is kept in Redis with the state and checked there (every replica agrees); the
        per-client share is not enforced here (yet): docs/scale-out.md says so."""
        key = (model, version, control.id)
        sequence = self._live.get(key)
        if sequence is None:
            sequence = self._live[key] = Sequence(key)
        sequence.issued += 1
        sequence.last_used = self._clock()
        step = Step(sequence, sequence.issued, control, request_id)
        step.owner = client.identity if client is not None else ""
        return step

    async def turn(self, step: Step) -> Turn:
        """Wait for the earlier local steps, then read the sequence's state and version from Redis (not for a start)."""
        await self._wait_turn(step)
        if step.control.start:
            step.seen = ("", "")
            return Turn(None, None, 1, "")
        self._refuse_if_broken(step)
        try:
            values = await self._send(("HMGET", self.redis_key(step), *FIELDS))
            inc, version, number, last, broken, blob, owner = values
            if owner and owner.decode() != step.owner:
                raise PermissionDenied(f"sequence {step.control.id!r} for model '{step.sequence.key[0]}': started by "
                                       f"another client identity, so this one ({step.owner or 'unauthenticated'!r}) "
                                       "may not continue, read or end it")
            if inc is None:
                raise InvalidArgument(f"sequence {step.control.id!r} for model '{step.sequence.key[0]}' version "
                                      f"{step.sequence.key[1]}: unknown in the sequence store {self.name} (never "
                                      "started, ended, expired after idling, or started on another model version: a "
                                      "sequence stays on its version); its first request must set sequence_start")
            if broken:
                raise Aborted(f"sequence {step.control.id!r}: {broken.decode()}; this request would run on the state "
                              "from before it, so it is refused; start the sequence again with sequence_start")
            check_step(step, int(number), last.decode())
            state = decode_state(blob)
        except BaseException:
            self._resolve(step)  # refused before it ran: the log goes on (a retry finds the same state)
            raise
        step.seen = (inc, version)
        return Turn(state, step.seen, int(number) + 1, last.decode())

    async def commit(self, step: Step, turn: Turn, state: State) -> None:
        """Write the step's state with a compare-and-set on what its turn read; a cancellation does not interrupt it."""
        model = step.sequence.key[0]
        ttl_ms = int(self.idle_timeouts.get(model, self.idle_timeout_s) * 1000)
        inc, version = step.seen
        args = (int(step.control.start), int(step.control.end), inc, version,
                b"" if step.control.end else encode_state(state), step.request_id, ttl_ms, self.max_sequences,
                turn.step, step.owner)
        keys = (self.redis_key(step), self._live_key, self._incarnations)
        done = self._send(("EVALSHA", "commit", len(keys), *keys, *args))
        done.add_done_callback(lambda f: self._after_commit(step, turn, f))
        reply = await asyncio.shield(done)
        self._raise_refusal(step, turn, reply)

    def abandon(self, step: Step, reason: str) -> None:
        """As in memory; a step that had read Redis also marks the sequence aborted there, for every replica."""
        ran = step.sequence.resolved == step.place - 1 and step.seen is not None
        super().abandon(step, reason)
        if ran:
            what = f"step (request {step.request_id!r}) {reason}"
            inc, version = step.seen
            keys = (self.redis_key(step),)
            mark = self._send(("EVALSHA", "abandon", len(keys), *keys, inc, version, what))
            mark.add_done_callback(lambda f: f.cancelled() or f.exception())  # best effort: a failure is logged

    # -- local log ----------------------------------------------------------------------------------------------

    def _after_commit(self, step: Step, turn: Turn, done: asyncio.Future) -> None:
        sequence = step.sequence
        if sequence.resolved >= step.place:
            return
        if done.cancelled() or done.exception() is not None:
            # The write may or may not have reached Redis: nothing after it here may assume either.
            sequence.broken = (f"step (request {step.request_id!r}) could not be confirmed by the sequence store "
                               f"{self.name} ({type(done.exception()).__name__ if not done.cancelled() else 'cancelled'})")
        elif done.result()[0] == b"ok":
            sequence.step = turn.step
            sequence.last_request = step.request_id
            sequence.broken = ""
            sequence.ended = f"step {turn.step} (request {step.request_id!r})" if step.control.end else ""
        self._resolve(step)

    def _raise_refusal(self, step: Step, turn: Turn, reply: list) -> None:
        what, *rest = [r.decode() if isinstance(r, bytes) else str(r) for r in reply]
        sid = step.control.id
        if what == "ok":
            return
        if what == "full":
            raise ResourceExhausted(f"sequence {sid!r}: {rest[0]} sequences are live in the sequence store {self.name} "
                                    f"(all replicas), the limit is {self.max_sequences} (max_sequences); end or let "
                                    "some expire first")
        if what == "owner":
            raise PermissionDenied(f"sequence {sid!r}: started by another client identity, so this one "
                                   f"({step.owner or 'unauthenticated'!r}) may not continue, restart or end it")
        if what == "gone":
            raise FailedPrecondition(f"sequence {sid!r}: ended or expired elsewhere while this step ran (it is no "
                                     f"longer in the sequence store {self.name}); its result is discarded; start it "
                                     "again with sequence_start")
        if what == "moved":
            raise Aborted(f"sequence {sid!r} advanced elsewhere: while this step ran on step {turn.step - 1}'s state, "
                          f"another replica or worker applied step {rest[0]} (request {rest[1]!r}); this step's result "
                          "is discarded so the state is not forked; send the next step after the answer to the last")
        raise Aborted(f"sequence {sid!r}: {rest[0]}; this request would run on the state from before it, so it is "
                      "refused; start the sequence again with sequence_start")

    def _resolve(self, step: Step) -> None:
        super()._resolve(step)
        sequence = step.sequence
        # Only steps in flight (and aborted logs, for their reason) stay here: the state itself lives in Redis.
        if not sequence.busy and not sequence.broken and self._live.get(sequence.key) is sequence:
            del self._live[sequence.key]

    def __len__(self) -> int:
        """Sequences this process holds: with steps in flight, or aborted here (the live count is Redis's)."""
        return len(self._live)

    def redis_key(self, step: Step) -> str:
        model, version, sid = step.sequence.key
        kind = "i" if isinstance(sid, int) else "s"
        return f"{self.prefix}seq:{model}:{version}:{kind}{sid}"

    # -- Redis: one pipeline per event-loop turn ----------------------------------------------------------------

    def _send(self, command: tuple) -> asyncio.Future:
        """Queue one command, for its reply; what is queued in this turn of the event loop, or while a pipeline is
        in flight, goes in one pipeline. EVALSHA names its script ("commit", "abandon"). A future, not a task:
        no task per command."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queued.append((command, future))
        if self._idle and not self._starting:
            self._starting = True
            loop.create_task(self._write(self._idle.pop()))
        return future

    async def _write(self, connection) -> None:
        try:
            await asyncio.sleep(0)  # let the rest of this loop turn queue its commands too
            self._starting = False
            while self._queued:
                queued, self._queued = self._queued, []
                await self._execute(connection, queued)
        finally:
            self._starting = False
            self._idle.append(connection)
        if self._queued and not self._starting:  # queued after this writer's last look
            self._starting = True
            asyncio.get_running_loop().create_task(self._write(self._idle.pop()))

    async def _execute(self, connection, queued: list[tuple[tuple, asyncio.Future]]) -> None:
        try:
            if not self._sha:
                await self._load_scripts()
            replies = await self._pipeline(connection, [c for c, _ in queued])
            if any(isinstance(r, redis_errors.NoScriptError) for r in replies):  # Redis restarted: scripts are gone
                await self._load_scripts()
                replies = await self._pipeline(connection, [c for c, _ in queued])
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            await connection.disconnect()
            self._sha = {}
            self._set_health(False, exc)
            error = Unavailable(f"sequence store {self.name}: unreachable ({type(exc).__name__}: {exc}); sequence "
                                "requests fail until it is back, stateless ones are served")
            for _, future in queued:
                if not future.done():
                    future.set_exception(error)
            return
        except BaseException as exc:
            for _, future in queued:
                if not future.done():
                    future.set_exception(exc)
            raise
        self._set_health(True)
        for (_, future), reply in zip(queued, replies):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(Unavailable(f"sequence store {self.name}: {reply}"))
            else:
                future.set_result(reply)

    async def _pipeline(self, connection, commands: list[tuple]) -> list:
        """One round trip: every command written at once, then every reply read (an error reply in its place)."""
        commands = [("EVALSHA", self._sha[c[1]], *c[2:]) if c[0] == "EVALSHA" else c for c in commands]
        self.round_trips += 1
        self.commands += len(commands)
        self.pipeline_sizes[len(commands)] += 1
        # redis-py packs the commands (the issue: no hand-written protocol); hiredis parses the replies.
        await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
        replies = []
        for _ in commands:
            try:
                replies.append(await connection.read_response())
            except redis_errors.ResponseError as exc:
                replies.append(exc)
        return replies

    async def _load_scripts(self) -> None:
        self._sha = {"commit": await self.redis.script_load(COMMIT), "abandon": await self.redis.script_load(ABANDON)}

    # -- health -------------------------------------------------------------------------------------------------

    def _set_health(self, healthy: bool, exc: BaseException | None = None) -> None:
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if healthy:
            log.info("sequence store reachable", extra={"fields": {"store": self.name}})
        else:
            log.warning("sequence store unreachable", extra={"fields": {"store": self.name, "error": str(exc)}})
        if self.on_health is not None:
            self.on_health(healthy)

    async def check(self) -> bool:
        """PING Redis (reconnecting when needed); updates `healthy` and returns it."""
        try:
            await self.redis.ping()
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            self._set_health(False, exc)
        else:
            self._set_health(True)
        return bool(self.healthy)

    async def live_count(self) -> int:
        """Live sequences over all replicas (the bounded set, expired entries left out)."""
        t = await self.redis.time()
        now_ms = t[0] * 1000 + t[1] // 1000
        return await self.redis.zcount(self._live_key, now_ms, "+inf")

    async def close(self) -> None:
        for connection in self._connections:
            await connection.disconnect()
        await self.redis.aclose()


def open_store(spec: str, max_sequences: int, idle_timeout_s: float,
               idle_timeouts: dict[str, float] | None = None, max_per_client: int = 0) -> SequenceStore:
    """The store --sequence-store names: `memory`, or a redis:// / rediss:// URL (password from the environment)."""
    if spec == "memory":
        return SequenceStore(max_sequences, idle_timeout_s, idle_timeouts=idle_timeouts, max_per_client=max_per_client)
    return RedisSequenceStore(spec, max_sequences, idle_timeout_s, idle_timeouts=idle_timeouts)
