"""Concurrent cancellation and races on shared sequence ids: many clients start, continue, end, cancel and let
deadlines pass on the same few ids, over ModelInfer and ModelStreamInfer. Every answer is checked against
onnxruntime run step by step over the log the server says it applied (sequence_previous_id), and every refusal
for its reason."""
from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from lstm_onnx.protocol.codec import SequenceControl, decode_response, decode_sequence_step, encode_request
from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

ATOL = 1e-5
REASONS = {  # refusal -> words its message must hold
    grpc.StatusCode.ABORTED: "before it was applied",
    grpc.StatusCode.FAILED_PRECONDITION: "ended by",
    grpc.StatusCode.INVALID_ARGUMENT: "unknown",
}
GAVE_UP = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)  # the client's own doing
WINDOW_S = 5.0  # a lost step's predecessor ran within this of it (the ids are busy); bounds the search only
MAX_LOST_IN_A_ROW = 12  # the longest run of lost answers the search follows back
MAX_STATES = 4096  # distinct candidate states kept per lost step
MAX_PASSES = 8  # rounds of the check's fixed point (each resolves the steps the previous ones made reachable)


@dataclass
class Op:
    """One request as sent, and what came back."""

    rid: str
    seq: str
    x: np.ndarray
    kind: str  # start | continue | end
    fate: str  # none | cancel | deadline
    sent_at: float = 0.0
    ended_at: float = 0.0
    code: grpc.StatusCode | None = None  # None: answered
    details: str = ""
    step: int = 0
    previous: str = ""
    outputs: dict = field(default_factory=dict)


@dataclass
class RaceResult:
    """What the race run saw, and what the check found."""

    sent: int = 0
    answered: int = 0
    refused: int = 0
    gave_up: int = 0
    wrong: int = 0  # answers that match no log the server's answers allow, refusals without a reason, other errors
    unverified: int = 0  # answers after lost ones that no log in the search explains (counted as errors)
    seconds: float = 0.0
    samples: list[str] = field(default_factory=list)

    def note(self, line: str) -> None:
        if len(self.samples) < 10:
            self.samples.append(line)


class Reference:
    """In-process onnxruntime, one chunk at a time with the state carried, as the server runs a sequence."""

    def __init__(self, model_path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.state_inputs = {a.name: tuple(a.shape[1:]) for a in self.session.get_inputs() if a.name != "input"}

    def zeros(self) -> dict[str, np.ndarray]:
        return {name: np.zeros((1, *dims), np.float32) for name, dims in self.state_inputs.items()}

    def run(self, x: np.ndarray, state: dict[str, np.ndarray]) -> tuple[dict, dict]:
        outputs = dict(zip(self.names, self.session.run(self.names, {"input": x, **state})))
        after = {name: outputs[name.replace("0", "n")] for name in self.state_inputs}  # h0 <- hn, c0 <- cn
        return outputs, after


def _request(model: str, op: Op):
    control = SequenceControl(op.seq, op.kind == "start", op.kind == "end")
    return encode_request(model, {"input": op.x}, sequence=control, request_id=op.rid)


def _code_of(message: str) -> grpc.StatusCode:
    for code, words in REASONS.items():
        if message.startswith("sequence ") and words in message:
            return code
    return grpc.StatusCode.UNKNOWN


class RaceClients:
    """`clients` coroutines on `ids` shared sequence ids until `operations` requests are sent."""

    def __init__(self, url: str, model: str, features: int, ids: int = 16, channels: int = 4):
        self.url, self.model, self.features, self.ids, self.channels = url, model, features, ids, channels
        self._rids = itertools.count()

    async def run(self, clients: int, operations: int, seed: int, time_limit_s: float = 1800) -> list[Op]:
        ops: list[Op] = []
        channels = [grpc.aio.insecure_channel(self.url) for _ in range(self.channels)]
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
        deadline = time.monotonic() + time_limit_s
        try:
            await asyncio.gather(*(self._client(stubs[i % len(stubs)], random.Random(seed * 1000 + i), ops,
                                                operations, deadline, seed) for i in range(clients)))
        finally:
            for channel in channels:
                await channel.close()
        return ops

    def _op(self, rng: random.Random, seq: str) -> Op:
        kind = rng.choices(["start", "continue", "end"], [0.15, 0.7, 0.15])[0]
        fate = rng.choices(["none", "cancel", "deadline"], [0.7, 0.15, 0.15])[0]
        x = np.random.default_rng(rng.getrandbits(32)).standard_normal((1, rng.randint(1, 3), self.features))
        return Op(f"q{next(self._rids)}", seq, x.astype(np.float32), kind, fate)

    async def _client(self, stub, rng: random.Random, ops: list[Op], operations: int, deadline: float,
                      seed: int) -> None:
        while len(ops) < operations and time.monotonic() < deadline:
            seq = f"race-{seed}-{rng.randrange(self.ids)}"
            if rng.random() < 0.3:
                mine = [self._op(rng, seq) for _ in range(rng.randint(1, 3))]
                ops += mine
                await self._stream(stub, mine, rng)
            else:
                op = self._op(rng, seq)
                ops.append(op)
                await self._unary(stub, op, rng)

    async def _unary(self, stub, op: Op, rng: random.Random) -> None:
        op.sent_at = time.monotonic()
        call = stub.ModelInfer(_request(self.model, op), timeout=rng.uniform(0.001, 0.005) if op.fate == "deadline"
                               else 60)
        if op.fate == "cancel":
            asyncio.get_running_loop().call_later(rng.uniform(0, 0.003), call.cancel)
        try:
            response = await call
            op.outputs = decode_response(response)
            op.step, op.previous = decode_sequence_step(response)
        except asyncio.CancelledError:
            op.code = grpc.StatusCode.CANCELLED
        except grpc.aio.AioRpcError as exc:
            op.code, op.details = exc.code(), exc.details() or ""
        op.ended_at = time.monotonic()

    async def _stream(self, stub, mine: list[Op], rng: random.Random) -> None:
        """The ops on one stream, in order; the first one's fate is the stream's (cancel or deadline ends it)."""
        fate = mine[0].fate
        for op in mine:
            op.fate, op.sent_at = fate, time.monotonic()
        call = stub.ModelStreamInfer(iter([_request(self.model, op) for op in mine]),
                                     timeout=rng.uniform(0.001, 0.005) if fate == "deadline" else 60)
        if fate == "cancel":
            asyncio.get_running_loop().call_later(rng.uniform(0, 0.003), call.cancel)
        answered = 0
        code, details = grpc.StatusCode.CANCELLED, ""
        try:
            async for response in call:
                op = mine[answered]
                answered += 1
                op.ended_at = time.monotonic()
                if response.error_message:
                    op.code, op.details = _code_of(response.error_message), response.error_message
                else:
                    op.outputs = decode_response(response.infer_response)
                    op.step, op.previous = decode_sequence_step(response.infer_response)
        except asyncio.CancelledError:
            pass
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if fate != "none" and code == grpc.StatusCode.INTERNAL and details == "Internal error from Core":
                code = grpc.StatusCode.CANCELLED  # grpc.aio's client, cancelled while writing its requests
        for op in mine[answered:]:
            op.code, op.details, op.ended_at = code, details, time.monotonic()


def check(ops: list[Op], reference: Reference) -> RaceResult:
    """Count answers, refusals and give-ups; an answer is wrong unless it equals onnxruntime over a log its
    sequence_previous_id chain allows (a step whose client gave up may have been applied unheard)."""
    result = RaceResult(sent=len(ops))
    by_id = {op.rid: op for op in ops}
    by_seq: dict[str, list[Op]] = {}
    for op in ops:
        by_seq.setdefault(op.seq, []).append(op)
    named = {op.previous for op in ops if op.code is None and op.kind != "start"}  # steps with a known successor
    after: dict[str, dict | None] = {}  # rid -> the state it left (None: not known)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20 * len(ops) + 1000))

    def matches(op: Op, state: dict) -> dict | None:
        outputs, left = reference.run(op.x, state)
        ok = all(float(np.max(np.abs(op.outputs[n] - outputs[n]))) <= ATOL for n in outputs)
        return left if ok else None

    reachable: dict[tuple[str, int], list[dict]] = {}
    pending: set[str] = set()  # steps whose check is in progress up the stack: their state is not known yet
    pending_keys: set[tuple[str, int]] = set()
    partial: list[bool] = [False]  # a search below met one of them, so its result must not be kept

    def lost_after(lost: Op, step: int, depth: int) -> list[dict]:
        """States a step whose answer was lost may have left, as step `step` of its sequence: on a start, on an
        answered step with no known successor (step - 1, run just before it), or on another lost step. Memoised
        per (step, place in the log), so a run of many lost steps in a row costs a search per step, not a tree."""
        key = (lost.rid, step)
        if key in reachable:
            return reachable[key]
        if lost.kind == "start":  # a start runs on zeros, whatever came before it
            reachable[key] = [reference.run(lost.x, reference.zeros())[1]] if step == 1 else []
            return reachable[key]
        if step <= 1 or depth == 0:
            return []
        if key in pending_keys:  # a cycle: this search is already running up the stack
            partial[0] = True
            return []
        pending_keys.add(key)
        outer, partial[0] = partial[0], False
        found: list[dict] = []
        seen: set[bytes] = set()

        def add(state: dict) -> None:
            digest = b"".join(np.round(state[n], 5).tobytes() for n in sorted(state))
            if digest not in seen:
                seen.add(digest)
                found.append(state)

        for c in by_seq[lost.seq]:
            if len(found) >= MAX_STATES or c is lost or c.kind == "end" or not (
                    c.sent_at < lost.ended_at + WINDOW_S and c.ended_at > lost.sent_at - WINDOW_S):
                continue
            if c.code is None and c.step == step - 1 and c.rid not in named:
                if c.rid in pending:  # its check is in progress up the stack: not known yet
                    partial[0] = True
                    continue
                state = state_after(c)
                if state is not None:
                    add(reference.run(lost.x, state)[1])
            elif c.code in GAVE_UP:
                for state in lost_after(c, step - 1, depth - 1)[:MAX_STATES - len(found)]:
                    add(reference.run(lost.x, state)[1])
        pending_keys.discard(key)
        if not partial[0]:
            reachable[key] = found
        partial[0] = partial[0] or outer
        return found

    def state_after(op: Op) -> dict | None:
        """The state an answered step left, checking its answer on the way."""
        if op.rid in after:
            return after[op.rid]
        pending.add(op.rid)
        try:
            return _state_after(op)
        finally:
            pending.discard(op.rid)

    def _state_after(op: Op) -> dict | None:
        after[op.rid] = None
        left, why = None, ""
        if op.kind == "start":
            left = matches(op, reference.zeros()) if (op.step, op.previous) == (1, "") else None
            why = "differs from a fresh start" if left is None else ""
        else:
            before = by_id.get(op.previous)
            if before is None or before.seq != op.seq or before.kind == "end" or (
                    before.code is not None and before.code not in GAVE_UP):
                why = f"continues {op.previous!r}, which it cannot ({before.code.name if before and before.code else before})"
            elif before.code is None:
                state = state_after(before)
                if state is None:
                    after[op.rid] = None
                    return None  # the predecessor's problem is counted there
                left = matches(op, state)
                why = "differs from onnxruntime over its applied steps" if left is None else ""
            else:  # its predecessor's answer was lost: find what that step was applied on
                for mid in lost_after(before, op.step - 1, MAX_LOST_IN_A_ROW):
                    left = matches(op, mid)
                    if left is not None:
                        break
                if left is None:
                    if counting[0]:
                        result.unverified += 1
                        result.note(f"{op.rid} (step {op.step} of {op.seq}) after {before.rid} ({before.kind}, "
                                    f"{before.code.name}): no log found")
                    after[op.rid] = None
                    return None
        if left is None and counting[0]:
            result.wrong += 1
            result.note(f"{op.rid} (step {op.step} of {op.seq}, after {op.previous!r}): {why}")
        after[op.rid] = left
        return left

    # The searches meet steps whose own check is still in progress up the stack (step numbers repeat after each
    # restart, so a window holds other incarnations' steps too), and find nothing through them yet. So resolve
    # to a fixed point: each pass keeps the states found and retries the rest; the last pass counts.
    answered = [op for op in ops if op.code is None]
    counting = [False]
    for _ in range(MAX_PASSES):
        known = sum(after.get(op.rid) is not None for op in answered)
        for key in [k for k, v in after.items() if v is None]:
            del after[key]
        reachable.clear()
        for op in answered:
            state_after(op)
        if sum(after.get(op.rid) is not None for op in answered) == known:
            break
    for key in [k for k, v in after.items() if v is None]:
        del after[key]
    reachable.clear()
    counting[0] = True
    for op in ops:
        if op.code is None:
            result.answered += 1
            state_after(op)
        elif op.code in REASONS:
            result.refused += 1
            if REASONS[op.code] not in op.details or op.seq not in op.details:
                result.wrong += 1
                result.note(f"{op.rid}: {op.code.name} without its reason: {op.details!r}")
        elif op.code in GAVE_UP:
            result.gave_up += 1
        else:
            result.wrong += 1
            result.note(f"{op.rid}: {op.code.name}: {op.details!r}")
    return result
