"""A batch's answer has a byte budget (BatchRequest.max_response_bytes): many callers' large
answers coalesced into one message never add up to more than the caller can receive. Ops past
the budget are answered `unprocessed` (not run, writes not applied); the client library sends
them again itself, so every caller gets its own answer.

Real shard and router processes; the clients use a small max_message_bytes (2 MiB: a budget of
512 KiB) so that a few values of 400 KiB are enough to pass it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from shardstate import AsyncClient, Client
from shardstate.common import budget
from shardstate.common.errors import ConflictError
from shardstate.pipeline import Pending, _encode
from shardstate.router.shardlink import pipeline_request
from shardstate.router.wire import RawPipelineRequest, unprocessed
from shardstate.v1 import state_pb2, state_pb2_grpc, types_pb2
from tests.procs import Proc, Procs
from tests.routercluster import RouterCluster
from tests.stubs import run, uid

T = 30.0
VALUE = b"v" * (400 * 1024)
SMALL_CLIENT = 2 * 1024 * 1024  # max_message_bytes of the clients under test: budget 512 KiB
N = 12  # values of 400 KiB: ~4.8 MiB of answer, over the small client's limit in one message
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
SHARD_CAP = 1_000_000  # --max-response-bytes of the second shard
THREADS, THREAD_ROUNDS = 16, 3  # sync Client: 16 threads reading at once, 3 times


# ---- the budget arithmetic (no processes) ----


def test_budget_arithmetic() -> None:
    assert budget.effective(0, 100) == 100  # 0 asks for the server's default
    assert budget.effective(30, 100) == 30
    assert budget.effective(300, 100) == 100  # capped by the server's limit
    assert budget.client_budget(64 * 1024 * 1024) == 16 * 1024 * 1024
    assert budget.client_budget(-1) == 0 and budget.client_budget(0) == 0  # unlimited: the server's
    assert budget.client_budget(3) == 1
    assert budget.for_channel([("grpc.max_receive_message_length", 8), ("x", 1),
                               ("grpc.max_receive_message_length", 40)]) == 10  # the last one wins
    assert budget.for_channel([]) == 1024 * 1024  # gRPC's default of 4 MiB
    assert budget.share(100, 1) == 100
    assert budget.share(100, 3) == 33 and 3 * budget.share(100, 3) <= 100
    assert budget.share(2, 5) == 1  # never 0, which would ask for the default
    assert budget.share(0, 2) == 1 and budget.share(-5, 2) == 1

    r = budget.unprocessed_result(1000, 1200)
    assert r.unprocessed and r.code == RESOURCE_EXHAUSTED
    assert "max_response_bytes=1000" in r.message
    assert r.limit_exceeded == types_pb2.LimitExceeded(limit="max_response_bytes", value=1000, actual=1200)
    raw = r.SerializeToString()
    assert unprocessed(raw)
    assert not unprocessed(state_pb2.BatchResult(code=RESOURCE_EXHAUSTED, message="over").SerializeToString())
    assert not unprocessed(state_pb2.BatchResult().SerializeToString())


def test_batches_carry_their_budget_on_the_wire() -> None:
    async def body() -> None:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        get = state_pb2.GetRequest(session_id="s", key="k")
        pending: list[Pending] = [("get", get, fut, None, float("inf"))] * 3
        batches = _encode(pending, max_bytes=15, tail=budget.wire_tail(12345))
        assert len(batches) > 1
        for ops, data in batches:
            req = state_pb2.BatchRequest.FromString(data)
            assert len(req.ops) == len(ops) and req.max_response_bytes == 12345
        assert state_pb2.BatchRequest.FromString(_encode(pending, tail=budget.wire_tail(0))[0][1]).max_response_bytes == 0
        fut.cancel()

    run(body())
    op = state_pb2.BatchOp(get=state_pb2.GetRequest(session_id="s", key="k")).SerializeToString()
    req = RawPipelineRequest.FromString(pipeline_request(7, [op, op], 999))
    assert req.id == 7 and len(req.batch.ops) == 2 and req.batch.max_response_bytes == 999
    assert RawPipelineRequest.FromString(pipeline_request(8, [op])).batch.max_response_bytes == 0


# ---- processes ----


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    p = Procs(tmp_path_factory.mktemp("budget"))
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def shards(procs: Procs) -> dict[str, Proc]:
    """One shard as `shardstate dev` runs it, one with --fsync (sessions run concurrently) and
    a smaller --max-response-bytes."""
    return {"grouped": procs.shard("b1"),
            "concurrent": procs.shard("b2", "--fsync", "--max-response-bytes", str(SHARD_CAP))}


@pytest.fixture(scope="module")
def cluster(procs: Procs) -> Iterator[RouterCluster]:
    c = RouterCluster(procs, shards=2, routers=1)
    yield c
    c.close()


def _stub(address: str) -> state_pb2_grpc.StateStub:
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    return state_pb2_grpc.StateStub(channel)


def _get(sid: str, key: str = "v") -> state_pb2.BatchOp:
    return state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=sid, key=key))


def _put(sid: str, key: str, value: bytes, **kw: Any) -> state_pb2.BatchOp:
    return state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key=key, value=value, **kw))


def _fill(address: str, sids: list[str]) -> None:
    with Client(address, batching=False) as c:
        for sid in sids:
            c.session(sid).put("v", VALUE)


# (a) concurrent single ops of an AsyncClient whose answers add up to more than it can receive


def _concurrent_gets(address: str) -> None:
    sids = [uid("big") for _ in range(N)]
    _fill(address, sids)

    async def body() -> None:
        async with AsyncClient(address, max_message_bytes=SMALL_CLIENT, timeout=T) as c:
            got = await asyncio.gather(*[c.session(s).get("v") for s in sids])
            assert [r.value if r is not None else None for r in got] == [VALUE] * N
            # A CAS that does not match answers with the current record: big answers too.
            conflicts = await asyncio.gather(*[c.session(s).put("v", b"new", expect=999) for s in sids],
                                             return_exceptions=True)
            assert all(isinstance(e, ConflictError) and e.current is not None and e.current.value == VALUE
                       for e in conflicts), conflicts
            assert sum(s["unprocessed"] for s in c.batching_stats().values()) > 0  # the path ran

    run(body())


def test_async_client_concurrent_big_gets_direct_to_a_shard(shards: dict[str, Proc]) -> None:
    _concurrent_gets(shards["grouped"].address)


def test_async_client_concurrent_big_gets_on_an_fsync_shard(shards: dict[str, Proc]) -> None:
    _concurrent_gets(shards["concurrent"].address)


def test_async_client_concurrent_big_gets_through_a_router(cluster: RouterCluster) -> None:
    _concurrent_gets(cluster.routers[0].address)


def test_sync_client_threads_big_gets_through_a_router(cluster: RouterCluster) -> None:
    """Threads' calls made while others are under way share Pipeline messages (syncbatch)."""
    address = cluster.routers[0].address
    sids = [uid("thr") for _ in range(THREADS)]
    _fill(address, sids)
    start = threading.Barrier(THREADS)

    def reads(sid: str) -> list[bytes | None]:
        out = []
        for _ in range(THREAD_ROUNDS):
            start.wait(10)  # together, so that they meet
            rec = c.session(sid).get("v")
            out.append(rec.value if rec is not None else None)
        return out

    with Client(address, max_message_bytes=SMALL_CLIENT, timeout=T) as c, \
            concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        got = list(pool.map(reads, sids))
    assert got == [[VALUE] * THREAD_ROUNDS] * THREADS


# (b) a plain stub's Batch over its budget


@pytest.mark.parametrize("kind", ["grouped", "concurrent"])
def test_plain_batch_over_budget_answers_the_tail_unprocessed(shards: dict[str, Proc], kind: str) -> None:
    address = shards[kind].address
    a, b, c, d = (uid("pb") for _ in range(4))
    _fill(address, [a, b])
    stub = _stub(address)
    ops = [
        _put(c, "ran", b"1"),  # a write that runs: answered and in the store
        _get(a),  # 400 KiB
        _put(a, "v", b"x", expected_version=999),  # a CAS that does not apply: the current record, 400 KiB
        _put(c, "late", b"2"),  # the answer holds 800 KiB: not run
        _get(b),
        _put(d, "late", b"3", request_id=uid("rid")),
    ]
    resp = stub.Batch(state_pb2.BatchRequest(ops=ops, max_response_bytes=600 * 1024), timeout=T)
    r = list(resp.results)
    assert [x.unprocessed for x in r] == [False, False, False, True, True, True]
    assert r[0].code == 0 and r[0].put.applied
    assert r[1].code == 0 and r[1].get.record.value == VALUE
    assert r[2].code == 0 and not r[2].put.applied and r[2].put.current.value == VALUE
    for x in r[3:]:
        assert x.code == RESOURCE_EXHAUSTED and "max_response_bytes=614400" in x.message
        assert x.limit_exceeded.limit == "max_response_bytes" and x.WhichOneof("result") is None
    # The ops that ran are in the store, the unprocessed writes are not.
    got = stub.Batch(state_pb2.BatchRequest(ops=[_get(c, "ran"), _get(c, "late"), _get(d, "late")]), timeout=T)
    assert [(x.get.found, x.get.record.value) for x in got.results] == [(True, b"1"), (False, b""), (False, b"")]

    # Sent again, they run: the first op of a batch always does, and a write that applied
    # answers a few bytes, which do not count; the get's answer then fills the 1 byte.
    again = stub.Batch(state_pb2.BatchRequest(ops=ops[3:], max_response_bytes=1), timeout=T)
    assert [x.unprocessed for x in again.results] == [False, False, True]
    assert again.results[0].put.applied and again.results[1].get.record.value == VALUE


def test_the_shard_caps_the_budget_asked(shards: dict[str, Proc]) -> None:
    address = shards["concurrent"].address  # --max-response-bytes 1000000
    sids = [uid("cap") for _ in range(5)]
    _fill(address, sids)
    stub = _stub(address)
    for asked in (0, 50 * 1024 * 1024):  # the default, and an ask over the cap
        resp = stub.Batch(state_pb2.BatchRequest(ops=[_get(s) for s in sids], max_response_bytes=asked), timeout=T)
        # one session each, so they run one after the other as in request order
        done = [x for x in resp.results if not x.unprocessed]
        assert all(x.get.record.value == VALUE for x in done)
        assert len(done) == 3  # 400 KiB, 800 KiB, then 1.2 MB >= the cap
        assert all(f"max_response_bytes={SHARD_CAP}" in x.message for x in resp.results if x.unprocessed)


def test_big_read_log_pages_count_toward_the_budget(shards: dict[str, Proc]) -> None:
    address = shards["grouped"].address
    sid, other = uid("log"), uid("log")
    stub = _stub(address)
    stub.Append(state_pb2.AppendRequest(session_id=sid, stream="s", entries=[VALUE, VALUE]), timeout=T)
    ops = [state_pb2.BatchOp(read_log=state_pb2.ReadLogRequest(session_id=sid, stream="s")),
           _put(other, "k", b"1")]
    resp = stub.Batch(state_pb2.BatchRequest(ops=ops, max_response_bytes=500 * 1024), timeout=T)
    assert len(resp.results[0].read_log.entries) == 2
    assert resp.results[1].unprocessed
    assert not stub.Get(state_pb2.GetRequest(session_id=other, key="k"), timeout=T).found


def test_plain_batch_through_a_router_keeps_within_its_budget(cluster: RouterCluster) -> None:
    address = cluster.routers[0].address
    sids = [uid("rb") for _ in range(8)]
    _fill(address, sids)
    stub = _stub(address)
    ops = [op for s in sids for op in (_get(s), _put(s, "w", b"1"))]
    asked = 600 * 1024
    resp = stub.Batch(state_pb2.BatchRequest(ops=ops, max_response_bytes=asked), timeout=T)
    r = list(resp.results)
    assert len(r) == len(ops) and any(x.unprocessed for x in r) and not all(x.unprocessed for x in r)
    # Each of the two shards had half the budget: its part holds at most that plus one result.
    assert resp.ByteSize() < asked + 2 * (len(VALUE) + 4096) + len(ops) * 200
    view = cluster.stub(cluster.routers[0]).view()
    for i, s in enumerate(sids):
        got, put = r[2 * i], r[2 * i + 1]
        if not got.unprocessed:
            assert got.code == 0 and got.get.record.value == VALUE
        if got.unprocessed:
            assert put.unprocessed  # a session's ops keep their order: nothing after a skipped one runs
        stored = stub.Get(state_pb2.GetRequest(session_id=s, key="w"), timeout=T)
        assert stored.found == (not put.unprocessed), (s, view.owner("default", s).id)


def test_router_unary_calls_never_see_unprocessed(cluster: RouterCluster) -> None:
    """A unary Get rides the router's coalesced shard messages: when other callers' answers
    fill one, the router sends the Get again itself."""
    address = cluster.routers[0].address
    sids = [uid("un") for _ in range(N)]
    _fill(address, sids)
    stub = _stub(address)
    for _ in range(3):
        big = stub.Batch.future(state_pb2.BatchRequest(ops=[_get(s) for s in sids], max_response_bytes=1), timeout=T)
        gets = [stub.Get.future(state_pb2.GetRequest(session_id=s, key="v"), timeout=T) for s in sids]
        assert [g.result().record.value for g in gets] == [VALUE] * N
        assert all(x.unprocessed or x.get.record.value == VALUE for x in big.result().results)


# (c) an explicit batch() over the budget returns every result


def test_async_client_batch_over_budget_returns_every_result(shards: dict[str, Proc]) -> None:
    address = shards["grouped"].address
    sids = [uid("ab") for _ in range(N)]
    _fill(address, sids)

    async def body() -> None:
        async with AsyncClient(address, max_message_bytes=SMALL_CLIENT, timeout=T) as c:
            b = c.batch()
            for s in sids:
                b.get(s, "v").incr(s, "n")
            got = await b.execute()
            assert [r.value for r in got[::2]] == [VALUE] * N
            assert got[1::2] == [1] * N

    run(body())


def test_sync_client_batch_over_budget_through_a_router(cluster: RouterCluster) -> None:
    address = cluster.routers[0].address
    sids = [uid("sb") for _ in range(N)]
    _fill(address, sids)
    with Client(address, max_message_bytes=SMALL_CLIENT, timeout=T) as c:
        b = c.batch()
        for s in sids:
            b.get(s, "v").put(s, "w", b"1")
        got = b.execute()
        assert [r.value for r in got[::2]] == [VALUE] * N
        assert all(isinstance(v, int) and v > 0 for v in got[1::2])
        assert all(c.session(s).get("w").value == b"1" for s in sids)


# a single op's own answer


def test_a_txn_answer_stays_within_max_request_bytes(shards: dict[str, Proc]) -> None:
    address = shards["grouped"].address
    sid = uid("txn")
    stub = _stub(address)
    stub.Put(state_pb2.PutRequest(session_id=sid, key="v", value=VALUE), timeout=T)
    many = [state_pb2.TxnOp(get=state_pb2.GetRequest(key="v")) for _ in range(11)]  # ~4.4 MiB of answer
    txn = state_pb2.TxnRequest(session_id=sid, success=[state_pb2.TxnOp(put=state_pb2.PutRequest(key="w", value=b"1")),
                                                        *many])
    with pytest.raises(grpc.RpcError) as info:
        stub.Txn(txn, timeout=T)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "max_request_bytes" in (info.value.details() or "")  # type: ignore[attr-defined]
    assert not stub.Get(state_pb2.GetRequest(session_id=sid, key="w"), timeout=T).found  # nothing written
    fewer = state_pb2.TxnRequest(session_id=sid, success=many[:3])
    assert [x.get.record.value for x in stub.Txn(fewer, timeout=T).results] == [VALUE] * 3
