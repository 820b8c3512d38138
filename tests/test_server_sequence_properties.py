"""Property test: random interleavings of start, continue, end, cancel and deadline on 1-8 concurrent clients per
sequence id, over ModelInfer and ModelStreamInfer. Every OK answer equals in-process onnxruntime over the steps the
server says were applied (sequence_previous_id back to the start), and every refusal names its reason."""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "tiny_lstm"
ATOL = 1e-5
REFUSALS = {  # status -> words its message must hold
    grpc.StatusCode.ABORTED: ("before it was applied", "sequence_start"),
    grpc.StatusCode.FAILED_PRECONDITION: ("ended by", "sequence_start"),
    grpc.StatusCode.INVALID_ARGUMENT: ("unknown", "sequence_start"),
}
_ids = itertools.count()


@dataclass(frozen=True)
class Op:
    kind: str  # start | continue | end
    steps: int  # time steps in the chunk
    fate: str  # none | cancel | deadline
    after_s: float  # cancel delay, or the deadline


@dataclass
class Record:
    """One request as sent, and what came back: an answer (step, previous id, outputs) or a status."""

    request_id: str
    sequence: str
    x: np.ndarray
    op: Op
    code: grpc.StatusCode | None = None  # None: OK
    details: str = ""
    step: int = 0
    previous: str = ""
    outputs: dict = field(default_factory=dict)


ops = st.builds(Op, st.sampled_from(["start", "continue", "continue", "end"]), st.integers(1, 3),
                st.sampled_from(["none", "none", "cancel", "deadline"]), st.floats(0.0005, 0.01))
client = st.tuples(st.sampled_from(["unary", "stream"]), st.lists(ops, min_size=1, max_size=4))
scenario = st.lists(st.lists(client, min_size=1, max_size=8), min_size=1, max_size=2)  # ids -> clients


@pytest.fixture(scope="module")
def server(tiny_repository):
    from lstm_onnx.server.app import BackgroundServer
    from lstm_onnx.server.settings import ServerSettings

    with BackgroundServer(ServerSettings(model_repository=str(tiny_repository), grpc_port=0, http_port=-1, metrics_port=-1)) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(tiny_repository):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(tiny_repository / MODEL / "1" / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        zeros = np.zeros((x.shape[0], 2, 8), np.float32)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, {"input": x, "h0": zeros, "c0": zeros})))

    return run


def _request(record: Record):
    from lstm_onnx.protocol.codec import SequenceControl, encode_request

    control = SequenceControl(record.sequence, record.op.kind == "start", record.op.kind == "end")
    return encode_request(MODEL, {"input": record.x}, sequence=control, request_id=record.request_id)


def _answer(record: Record, response) -> None:
    from lstm_onnx.protocol.codec import decode_response, decode_sequence_step

    record.outputs = decode_response(response)
    record.step, record.previous = decode_sequence_step(response)


async def _unary(stub, records: list[Record]) -> None:
    for record in records:
        timeout = record.op.after_s if record.op.fate == "deadline" else 30
        call = stub.ModelInfer(_request(record), timeout=timeout)
        if record.op.fate == "cancel":
            asyncio.get_running_loop().call_later(record.op.after_s, call.cancel)
        try:
            _answer(record, await call)
        except asyncio.CancelledError:
            record.code = grpc.StatusCode.CANCELLED
        except grpc.aio.AioRpcError as exc:
            record.code, record.details = exc.code(), exc.details()


async def _stream(stub, records: list[Record]) -> None:
    """All of a client's requests on one stream; its first cancel or deadline ends the stream there."""
    fates = [r for r in records if r.op.fate != "none"]
    timeout = fates[0].op.after_s if fates and fates[0].op.fate == "deadline" else 30
    call = stub.ModelStreamInfer(iter([_request(r) for r in records]), timeout=timeout)
    if fates and fates[0].op.fate == "cancel":
        asyncio.get_running_loop().call_later(fates[0].op.after_s, call.cancel)
    answered = 0
    try:
        async for response in call:
            record = records[answered]
            answered += 1
            if response.error_message:
                record.code = _code_of(response.error_message)
                record.details = response.error_message
            else:
                _answer(record, response.infer_response)
    except asyncio.CancelledError:
        pass
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if fates and code == grpc.StatusCode.INTERNAL and exc.details() == "Internal error from Core":
            # grpc.aio's client reports its own deadline or cancel this way while it is still writing the
            # request iterator; the server's INTERNAL always carries its own message.
            code = grpc.StatusCode.CANCELLED
        for record in records[answered:]:
            record.code, record.details = code, exc.details()
        return
    for record in records[answered:]:
        record.code = grpc.StatusCode.CANCELLED


def _code_of(message: str) -> grpc.StatusCode:
    for code in REFUSALS:
        if message.startswith("sequence ") and {
                grpc.StatusCode.ABORTED: "before it was applied", grpc.StatusCode.FAILED_PRECONDITION: "ended by",
                grpc.StatusCode.INVALID_ARGUMENT: "unknown"}[code] in message:
            return code
    return grpc.StatusCode.UNKNOWN


async def _play(url: str, plan, rng: np.random.Generator) -> list[Record]:
    from lstm_onnx.protos import grpc_service_pb2_grpc as pb_grpc

    records, jobs, sole = [], [], []
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for clients in plan:
            sequence = f"prop-{next(_ids)}"
            for via, client_ops in clients:
                mine = [Record(f"r{next(_ids)}", sequence,
                               rng.standard_normal((1, op.steps, 1)).astype(np.float32), op) for op in client_ops]
                records += mine
                if len(clients) == 1:
                    sole.append(mine)
                jobs.append(_unary(stub, mine) if via == "unary" else _stream(stub, mine))
        await asyncio.gather(*jobs)
    return records, sole


def _check_sole(mine: list[Record]) -> None:
    """A client alone on its id knows the log's order: an answered step continues its own request just before
    it, so no step is skipped (one abandoned before it means a refusal, never the older state)."""
    for before, r in itertools.pairwise(mine):
        if r.code is None and r.op.kind != "start":
            assert r.previous == before.request_id, (
                f"{r.request_id}: continues {r.previous!r}, expected {before.request_id!r} (sent just before it, "
                f"{before.code.name if before.code else 'OK'}): a step was skipped")


UNANSWERED = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)  # may have been applied


def _chains(r: Record, by_id: dict[str, Record], by_sequence: dict[str, list[Record]]):
    """Every log the server's answers allow for `r`: r, the step it says it continued, and so on to a start, with
    r.step steps. An answered step names its predecessor; one whose client gave up (cancelled, deadline) may have
    been applied without the client hearing, and then any step of its sequence may have preceded it."""

    def walk(at: Record, chain: list[Record]):
        if len(chain) > r.step:
            return
        if at.op.kind == "start":
            if len(chain) == r.step:
                yield chain
            return
        if at.code is None:
            before = by_id.get(at.previous)
            assert before is not None, f"{at.request_id}: continues {at.previous!r}, which nobody sent"
            assert before.sequence == at.sequence, f"{at.request_id} continues a step of another sequence"
            assert before.code is None or before.code in UNANSWERED, (
                f"{at.request_id}: continues {before.request_id}, which was refused ({before.code.name})")
            assert before.op.kind != "end", f"{at.request_id}: continues {before.request_id}, a sequence_end"
            candidates = [before]
        else:
            candidates = [p for p in by_sequence[at.sequence] if p not in chain and p.op.kind != "end"
                          and (p.code is None or p.code in UNANSWERED)]
        for before in candidates:
            yield from walk(before, [*chain, before])

    yield from walk(r, [r])


def _check(records: list[Record], reference) -> None:
    by_id = {r.request_id: r for r in records}
    by_sequence: dict[str, list[Record]] = {}
    for r in records:
        by_sequence.setdefault(r.sequence, []).append(r)
    continued: dict[str, str] = {}
    for r in records:
        if r.code is None:
            if r.op.kind == "start":
                assert (r.step, r.previous) == (1, ""), f"{r.request_id}: a start says step {r.step}, after {r.previous!r}"
            else:
                assert r.previous not in continued, (f"{r.request_id} and {continued.get(r.previous)} both continue "
                                                     f"{r.previous}: the log forked")
                continued[r.previous] = r.request_id
            best = np.inf
            for chain in itertools.islice(_chains(r, by_id, by_sequence), 2000):
                want = reference(np.concatenate([c.x for c in reversed(chain)], axis=1))
                best = min(best, max(float(np.max(np.abs(r.outputs[n] - want[n]))) for n in ("output", "hn", "cn")))
                if best <= ATOL:
                    break
            assert best <= ATOL, (f"{r.request_id} (step {r.step} of {r.sequence}, after {r.previous!r}): differs "
                                  f"from onnxruntime over every log the answers allow by at least {best:.3g}")
        elif r.code in REFUSALS:
            assert all(w in r.details for w in REFUSALS[r.code]) and r.sequence in r.details, (
                f"{r.request_id}: refusal {r.code.name} without its reason: {r.details!r}")
        else:
            assert r.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED), (
                f"{r.request_id}: got {r.code.name} {r.details!r}, expected an answer, a refusal with its reason, "
                "or the client's own cancel/deadline")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(plan=scenario, seed=st.integers(0, 2**16))
def test_every_answer_matches_onnxruntime_over_the_applied_steps(server, reference, plan, seed):
    records, sole = asyncio.run(_play(server.url, plan, np.random.default_rng(seed)))
    _check(records, reference)
    for mine in sole:
        _check_sole(mine)
    store = server.running.scheduler.sequences
    server.call(_settled(store))


async def _settled(store) -> None:
    """No step of any sequence is left pending once every client is done (each leaves the store in order)."""
    for _ in range(2000):
        if not any(s.busy for s in store._live.values()):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"steps still pending: {[(s.key, s.issued, s.resolved) for s in store._live.values() if s.busy]}")
