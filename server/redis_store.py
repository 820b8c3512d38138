"""Sequences in Redis, shared by replicas: one hash per live sequence and model version, compare-and-set per step.

Within one process a sequence's steps still queue in a local log (the memory store's `reserve`/`turn`), so two
requests of one sequence never run at once here. Across processes the order is the order of commits: a step reads
the sequence's (incarnation, version) with its state, runs, and writes back with a Lua compare-and-set on both;
a step whose sequence advanced elsewhere meanwhile is refused (ABORTED) and its result discarded, so the state is
never forked. The idle timeout is the key's TTL; sequence_end deletes the key; a sorted set of live keys (score:
expiry) bounds live sequences across all replicas, and one per client bounds its share. Reads and writes made in one
event-loop turn (the commits of a merged batch, the reads of requests that arrived together) go to Redis in one
pipeline: one round trip.

A step whose predecessor was committed by this process needs no read: the process keeps what it wrote, and Redis
tells it when any other process writes that key (CLIENT TRACKING, redirected to a connection subscribed to
`__redis__:invalidate`), so a step of a sequence that stays on one replica costs one round trip, its
compare-and-set. The compare-and-set still guards every step: a copy that is stale for any reason can only cost
an ABORTED, never a forked state.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import select
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

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

from .clients import ANONYMOUS
from .redis_wire import ABANDON, COMMIT, FIELDS, decode_state, encode_state, redact
from .sequences import Sequence, SequenceStore, State, Step, Turn, check_step

log = logging.getLogger("lstm_onnx.server")

PASSWORD_ENV = "LSTM_ONNX_SEQUENCE_STORE_PASSWORD"  # never a flag: it would show in `ps`
PREFIX = "lstm-onnx:"
# Redis being down must fail a request in about a second, not hang it: these bound every connect and reply.
CONNECT_TIMEOUT_S = 1.0
REPLY_TIMEOUT_S = 2.0
READ_CONNECTIONS = 3  # connections for reads, each with at most one pipeline in flight
INVALIDATIONS = "__redis__:invalidate"  # where Redis sends tracking invalidations for a RESP2 redirect target
TRACKING_PING_S = 1.0  # the invalidation connection is pinged this often; silent for 3 pings: copies are dropped


@dataclass
class _Copy:
    """What this process last committed for a sequence, valid while Redis has not said another process wrote it."""

    seen: tuple  # (incarnation, version) as Redis holds them
    step: int
    last: str
    owner: str
    state: State
    expires: float  # monotonic: a little before the key's TTL ends


class _Lane:
    """Connections that each carry at most one pipeline at a time: what queues meanwhile goes in the next, as the
    batcher merges runs, and no pool is consulted per command."""

    def __init__(self, store: RedisSequenceStore, connections: list):
        self.store = store
        self.connections = connections
        self.idle = list(connections)
        self.starting = False  # a writer is scheduled and has not taken the queue yet
        self.queued: list[tuple[tuple, asyncio.Future]] = []
        self.stale: set = set()  # connections to reconnect before their next pipeline (Redis went away meanwhile)

    def send(self, command: tuple) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queued.append((command, future))
        if self.idle and not self.starting:
            self.starting = True
            loop.create_task(self._write(self.idle.pop()))
        return future

    async def _write(self, connection) -> None:
        try:
            await asyncio.sleep(0)  # let the rest of this loop turn queue its commands too
            self.starting = False
            if connection in self.stale:
                self.stale.discard(connection)
                await connection.disconnect()
            while self.queued:
                queued, self.queued = self.queued, []
                await self.store._execute(self, connection, queued)
        finally:
            self.starting = False
            self.idle.append(connection)
        if self.queued and not self.starting:  # queued after this writer's last look
            self.starting = True
            asyncio.get_running_loop().create_task(self._write(self.idle.pop()))

class RedisSequenceStore(SequenceStore):
    """The memory store's four calls over Redis: the state lives in Redis, only steps in flight (and copies of
    what this process last wrote) live here."""

    def __init__(self, url: str, max_sequences: int, idle_timeout_s: float, idle_timeouts: dict[str, float] | None = None,
                 password: str | None = None, prefix: str = PREFIX, max_per_client: int = 0, copies: bool = True):
        super().__init__(max_sequences, idle_timeout_s, idle_timeouts=idle_timeouts, max_per_client=max_per_client)
        self.url = url
        self.name = redact(url)
        self.prefix = prefix
        password = password if password is not None else os.environ.get(PASSWORD_ENV) or None
        options = dict(password=password, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=REPLY_TIMEOUT_S,
                       retry=Retry(NoBackoff(), 0))
        # No retries: a compare-and-set sent again after a lost reply would find its own write and report it lost.
        self.redis = aioredis.from_url(url, **options)  # health checks, script loading, counts
        # Reads go over a few connections of their own; compare-and-sets and abandon marks over one more, which
        # tracks the keys it writes (so Redis tells this process when another writes them), and whose replies come
        # in commit order. A read never waits behind a batch's compare-and-sets.
        pool = aioredis.ConnectionPool.from_url(url, **options)
        self._reads = _Lane(self, [pool.make_connection() for _ in range(READ_CONNECTIONS)])
        self._writes = _Lane(self, [pool.make_connection()])
        # The invalidations' connection speaks RESP2, as a subscriber that CLIENT TRACKING REDIRECT can target.
        self._tracker_pool = aioredis.ConnectionPool.from_url(url, protocol=2, **options)
        self._tracker = None
        self._tracker_tasks: list[asyncio.Task] = []
        self._tracking = 0  # the tracking session: > 0 while invalidations are known to reach this process
        self._sessions = 0
        self._last_pong = 0.0
        self.copies_enabled = copies  # False: every step reads Redis (and when Redis refuses CLIENT TRACKING)
        self._copies: OrderedDict[str, _Copy] = OrderedDict()
        self._committing: dict[str, int] = {}  # key -> compare-and-sets in flight
        self._invalidated: set[str] = set()  # keys invalidated while a compare-and-set of theirs was in flight
        self._session_of: dict[asyncio.Future, int] = {}  # a write's reply -> the tracking session it was sent under
        self._live_key = f"{prefix}live"
        self._clients_prefix = f"{prefix}clients:"
        self._incarnations = f"{prefix}incarnations"
        self._sha: dict[str, str] = {}
        self.healthy: bool | None = None  # None until the first check
        self.on_health: Callable[[bool], None] | None = None
        # The store's own counters: round trips to Redis, commands sent, commands per round trip, and steps that
        # ran on this process's copy (no read) or read Redis.
        self.round_trips = 0
        self.commands = 0
        self.pipeline_sizes: Counter = Counter()
        self.copy_hits = 0
        self.reads = 0

    # -- the four calls -----------------------------------------------------------------------------------------

    def reserve(self, model: str, control, request_id: str = "", client=None, version: int = 0) -> Step:
        """A place in this process's log of the sequence; whether the id is known is Redis's to say, at its turn.

        The owner identity and the per-client share are kept in Redis with the state and checked there, by the
        compare-and-set script, so every replica agrees."""
        key = (model, version, control.id)
        sequence = self._live.get(key)
        if sequence is None:
            sequence = self._live[key] = Sequence(key)
        sequence.issued += 1
        sequence.last_used = self._clock()
        step = Step(sequence, sequence.issued, control, request_id)
        step.owner = client.identity if client is not None else ""
        step.client = client.key if client is not None else ANONYMOUS.key
        return step

    async def turn(self, step: Step) -> Turn:
        """Wait for the earlier local steps, then the sequence's state and version: this process's copy when it
        wrote the last step and no other process has written since, else a read from Redis (not for a start)."""
        await self._wait_turn(step)
        if step.control.start:
            step.seen = ("", "")
            return Turn(None, None, 1, "")
        self._refuse_if_broken(step)
        key = self.redis_key(step)
        try:
            copy = await self._copy(key)
            if copy is not None:
                self._check_owner(step, copy.owner)
                check_step(step, copy.step, copy.last)
                self.copy_hits += 1
                step.seen = copy.seen
                return Turn(copy.state, copy.seen, copy.step + 1, copy.last)
            self.reads += 1
            values = await self._reads.send(("HMGET", key, *FIELDS))
            inc, version, number, last, broken, blob, owner = values
            if owner:
                self._check_owner(step, owner.decode())
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

    def _check_owner(self, step: Step, owner: str) -> None:
        if owner and owner != step.owner:
            raise PermissionDenied(f"sequence {step.control.id!r} for model '{step.sequence.key[0]}': started by "
                                   f"another client identity, so this one ({step.owner or 'unauthenticated'!r}) "
                                   "may not continue, read or end it")

    async def commit(self, step: Step, turn: Turn, state: State) -> None:
        """Write the step's state with a compare-and-set on what its turn read; a cancellation does not interrupt it."""
        model = step.sequence.key[0]
        ttl_s = self.idle_timeouts.get(model, self.idle_timeout_s)
        ttl_ms = int(ttl_s * 1000)
        inc, version = step.seen
        key = self.redis_key(step)
        args = (int(step.control.start), int(step.control.end), inc, version,
                b"" if step.control.end else encode_state(state), step.request_id, ttl_ms, self.max_sequences,
                turn.step, step.owner, self.max_per_client, step.client, self._clients_prefix)
        keys = (key, self._live_key, self._incarnations)
        self._committing[key] = self._committing.get(key, 0) + 1
        done = self._writes.send(("EVALSHA", "commit", len(keys), *keys, *args))
        done.add_done_callback(lambda f: self._after_commit(step, turn, f, key, state, ttl_s))
        reply = await asyncio.shield(done)
        self._raise_refusal(step, turn, reply)

    def abandon(self, step: Step, reason: str) -> None:
        """As in memory; a step that had read Redis also marks the sequence aborted there, for every replica."""
        ran = step.sequence.resolved == step.place - 1 and step.seen is not None
        super().abandon(step, reason)
        if ran:
            what = f"step (request {step.request_id!r}) {reason}"
            inc, version = step.seen
            key = self.redis_key(step)
            self._copies.pop(key, None)
            mark = self._writes.send(("EVALSHA", "abandon", 1, key, inc, version, what))
            mark.add_done_callback(self._after_abandon)

    def _after_abandon(self, done: asyncio.Future) -> None:
        """Best effort: a mark that failed is logged by the store's health; its exception is retrieved here."""
        self._session_of.pop(done, None)
        if not done.cancelled():
            done.exception()

    # -- this process's copies ----------------------------------------------------------------------------------

    async def _copy(self, key: str) -> _Copy | None:
        """The copy of `key` this process may run on: only while invalidations reach it, and after reading every
        invalidation already on its way in (Redis sent it before it answered the write that caused it, so a
        client that saw that answer and then sent this step finds the copy already dropped)."""
        if not self._tracking or key not in self._copies:
            return None
        for _ in range(64):
            if not self._invalidations_unread():
                break
            await asyncio.sleep(0)  # the tracker's reader takes them
        else:
            self._copies.pop(key, None)
            return None
        copy = self._copies.get(key)
        if copy is None or not self._tracking:
            return None
        if copy.expires <= time.monotonic():
            del self._copies[key]
            return None
        self._copies.move_to_end(key)
        return copy

    def _invalidations_unread(self) -> bool:
        """Whether bytes from Redis wait on the invalidations' connection (buffered, or in the socket)."""
        tracker = self._tracker
        reader = getattr(tracker, "_reader", None)
        writer = getattr(tracker, "_writer", None)
        if reader is None or writer is None:
            return True  # cannot tell: the caller does not trust the copy
        if len(getattr(reader, "_buffer", b"x")):
            return True
        sock = writer.get_extra_info("socket")
        if sock is None:
            return True
        try:
            return bool(select.select([sock.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def _keep_copy(self, key: str, session: int, copy: _Copy) -> None:
        if not self.copies_enabled or not session or session != self._tracking or key in self._invalidated:
            self._copies.pop(key, None)
            return
        self._copies[key] = copy
        self._copies.move_to_end(key)
        while len(self._copies) > self.max_sequences:
            self._copies.popitem(last=False)

    def _invalidate(self, keys) -> None:
        """Redis says another connection wrote these keys (None: everything, e.g. FLUSHALL)."""
        if keys is None:
            self._copies.clear()
            self._invalidated.update(self._committing)
            return
        for raw in keys:
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            self._copies.pop(key, None)
            if key in self._committing:
                self._invalidated.add(key)

    async def _start_tracking(self, connection) -> None:
        """Subscribe a connection to invalidations and have `connection` (the writes' one) redirect its tracking
        there, NOLOOP (its own writes are not news). Raises what reaching Redis raises; a Redis that refuses
        CLIENT TRACKING (older than 6, or a managed one that renames CLIENT) turns the copies off, with a log line."""
        self._stop_tracking()
        tracker = self._tracker_pool.make_connection()
        try:
            await connection.disconnect()  # tracking is per connection: start on a fresh one, never on a stale one
            await tracker.connect()
            await tracker.send_command("CLIENT", "ID")
            tracker_id = int(await tracker.read_response())
            await tracker.send_command("SUBSCRIBE", INVALIDATIONS)
            await tracker.read_response()
            await connection.connect()
            await connection.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", tracker_id, "NOLOOP")
            await connection.read_response()
        except redis_errors.ResponseError as exc:
            await tracker.disconnect()
            self.copies_enabled = False
            log.warning("sequence store refuses CLIENT TRACKING: every step reads its state from Redis",
                        extra={"fields": {"store": self.name, "error": str(exc)}})
            return
        except BaseException:
            await tracker.disconnect()
            raise
        self._sessions += 1
        session = self._sessions
        self._tracker = tracker
        self._tracking = session
        self._last_pong = time.monotonic()
        loop = asyncio.get_running_loop()
        self._tracker_tasks = [loop.create_task(self._read_invalidations(tracker, session)),
                               loop.create_task(self._ping_tracker(tracker, session))]

    def _stop_tracking(self) -> None:
        """Invalidations may no longer reach this process: drop every copy and the tracker."""
        self._tracking = 0  # a write in flight now confirms under no session, so it keeps no copy
        self._copies.clear()
        tasks, self._tracker_tasks = self._tracker_tasks, []
        for task in tasks:
            if task is not asyncio.current_task():
                task.cancel()
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            asyncio.get_running_loop().create_task(tracker.disconnect(nowait=True))

    async def _read_invalidations(self, tracker, session: int) -> None:
        try:
            while True:
                message = await tracker.read_response(timeout=math.inf)
                if not isinstance(message, list) or not message:
                    continue
                kind = message[0]
                if kind == b"message" and len(message) == 3:
                    self._invalidate(message[2])
                elif kind == b"pong":
                    self._last_pong = time.monotonic()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the connection is gone: nothing tells this process of writes any more
            if self._tracking == session:
                log.info("sequence store invalidations lost; copies dropped",
                         extra={"fields": {"store": self.name, "error": f"{type(exc).__name__}: {exc}"}})
                self._stop_tracking()

    async def _ping_tracker(self, tracker, session: int) -> None:
        """A subscriber hears nothing when nothing is written: a ping shows it is still connected."""
        try:
            while self._tracking == session:
                await asyncio.sleep(TRACKING_PING_S)
                if time.monotonic() - self._last_pong > 3 * TRACKING_PING_S:
                    log.info("sequence store invalidations silent; copies dropped", extra={"fields": {"store": self.name}})
                    self._stop_tracking()
                    return
                await tracker.send_packed_command(tracker.pack_command("PING"), check_health=False)
        except asyncio.CancelledError:
            raise
        except BaseException:
            if self._tracking == session:
                self._stop_tracking()

    # -- local log ----------------------------------------------------------------------------------------------

    def _after_commit(self, step: Step, turn: Turn, done: asyncio.Future, key: str, state: State, ttl_s: float) -> None:
        session = self._session_of.pop(done, 0)  # the tracking session the compare-and-set ran under (0: none)
        left = self._committing.get(key, 1) - 1
        if left:
            self._committing[key] = left
        else:
            self._committing.pop(key, None)
        applied = not done.cancelled() and done.exception() is None and done.result()[0] == b"ok"
        if applied and not step.control.end:
            inc, version = done.result()[1:3]
            # Kept a little short of the key's TTL, so that a copy never outlives the key it copies.
            self._keep_copy(key, session, _Copy((inc, version), turn.step, step.request_id, step.owner, state,
                                                time.monotonic() + ttl_s * 0.9))
        else:
            self._copies.pop(key, None)
        if not left:
            self._invalidated.discard(key)
        sequence = step.sequence
        if sequence.resolved >= step.place:
            return
        if done.cancelled() or done.exception() is not None:
            # The write may or may not have reached Redis: nothing after it here may assume either.
            sequence.broken = (f"step (request {step.request_id!r}) could not be confirmed by the sequence store "
                               f"{self.name} ({type(done.exception()).__name__ if not done.cancelled() else 'cancelled'})")
        elif applied:
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
        if what == "share":
            raise ResourceExhausted(f"sequence {sid!r}: this client ({step.client}) holds {rest[0]} live sequences in "
                                    f"the sequence store {self.name} (all replicas), its share is "
                                    f"{self.max_per_client} (max_sequences_per_client); end or let some expire first")
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

    async def _execute(self, lane: _Lane, connection, queued: list[tuple[tuple, asyncio.Future]]) -> None:
        try:
            if not self._sha:
                await self._load_scripts()
            if lane is self._writes and self.copies_enabled and not self._tracking:
                await self._start_tracking(connection)
            replies = await self._pipeline(connection, [c for c, _ in queued])
            if any(isinstance(r, redis_errors.NoScriptError) for r in replies):  # Redis restarted: scripts are gone
                await self._load_scripts()
                replies = await self._pipeline(connection, [c for c, _ in queued])
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            await connection.disconnect()
            if lane is self._writes:
                self._stop_tracking()  # a new connection tracks nothing: copies could go stale unseen
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
        session = self._tracking if lane is self._writes else 0
        for (_, future), reply in zip(queued, replies):
            if future.done():
                continue
            if session:
                self._session_of[future] = session
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
        if not healthy:
            # Connections not in use now may be to a Redis that went away: their next pipeline starts afresh.
            for lane in (self._reads, self._writes):
                lane.stale.update(lane.idle)
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
        tasks, tracker = self._tracker_tasks, self._tracker
        self._tracker = None  # closed here, not in the background
        self._stop_tracking()
        if tracker is not None:
            await tracker.disconnect()
        for task in tasks:
            try:
                await task
            except BaseException:
                pass
        for connection in self._reads.connections + self._writes.connections:
            await connection.disconnect()
        await self.redis.aclose()


def open_store(spec: str, max_sequences: int, idle_timeout_s: float,
               idle_timeouts: dict[str, float] | None = None, max_per_client: int = 0,
               copies: bool = True) -> SequenceStore:
    """The store --sequence-store names: `memory`, or a redis:// / rediss:// URL (password from the environment)."""
    if spec == "memory":
        return SequenceStore(max_sequences, idle_timeout_s, idle_timeouts=idle_timeouts, max_per_client=max_per_client)
    return RedisSequenceStore(spec, max_sequences, idle_timeout_s, idle_timeouts=idle_timeouts,
                              max_per_client=max_per_client, copies=copies)
