"""3 shards behind 2 routers: placement follows the ring, Batch keeps request order,
ListSessions pages through every shard once, and plain generated stubs work against a router.
"""

from __future__ import annotations

import collections
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from shardstate.common import errors
from shardstate.v1 import admin_pb2, state_pb2, types_pb2
from tests.procs import Procs
from tests.routercluster import RouterCluster, Stubs, T, cluster_fixture, owners_by_reading_shards
from tests.stubs import expect_error, uid, wait_until

# Every test runs against routers with the coalesced Pipeline links to the shards (the default)
# and against routers forwarding unary calls and unary Batch (--no-shard-pipeline).
cluster = cluster_fixture(router_variants=((), ("--no-shard-pipeline",)))


# ---- placement ----


def test_sessions_spread_over_all_shards_and_live_on_the_ring_owner(cluster: RouterCluster) -> None:
    sids = [f"spread-{i:04d}" for i in range(1000)]
    routers = [cluster.stub(r) for r in cluster.routers]

    def write(part: int) -> None:
        for i in range(part, len(sids), 4):
            resp = routers[i % 2].put(sids[i], "k", f"v{i}".encode())
            assert resp.applied

    threads = [threading.Thread(target=write, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    view = routers[0].view()
    assert view.epoch >= 1 and sorted(s.id for s in view.pb.shards) == ["s1", "s2", "s3"]
    assert routers[1].view().pb == view.pb
    found = owners_by_reading_shards(cluster, sids, "k")
    for s in sids:
        assert found[s] == [view.owner("", s).id], s
    share = collections.Counter(found[s][0] for s in sids)
    assert set(share) == {"s1", "s2", "s3"}
    for shard_id, n in share.items():
        assert 0.20 <= n / len(sids) <= 0.47, (shard_id, n)

    # A unary read straight to a non-owner is refused with a typed WrongShard naming the owner.
    for s in sids[:30]:
        owner = view.owner("", s)
        for other in (x for x in ("s1", "s2", "s3") if x != owner.id):
            exc = expect_error(grpc.StatusCode.FAILED_PRECONDITION, cluster.shard_stub(other).get, s, "k")
            assert isinstance(exc, errors.WrongShardError)
            assert exc.detail.owner == owner.id and exc.detail.owner_address == owner.primary
        assert cluster.shard_stub(owner.id).get(s, "k").record.value == f"v{sids.index(s)}".encode()


def test_both_routers_read_what_the_other_wrote(cluster: RouterCluster) -> None:
    a, b = (cluster.stub(r) for r in cluster.routers)
    for i in range(30):
        sid = uid("cross")
        v = a.put(sid, "k", b"x%d" % i).version
        got = b.get(sid, "k")
        assert got.found and got.record.version == v and got.record.value == b"x%d" % i


# ---- batch ----


def test_batch_across_shards_returns_results_in_request_order(cluster: RouterCluster) -> None:
    r = cluster.stub(cluster.routers[0])
    sids = [uid("batch") for _ in range(40)]
    view = r.view()
    assert len({view.owner("", s).id for s in sids}) == 3
    puts = [state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=s, key="k", value=s.encode())) for s in sids]
    resp = r.state.Batch(state_pb2.BatchRequest(ops=puts), timeout=T)
    assert [x.code for x in resp.results] == [0] * len(sids)
    assert all(x.put.applied for x in resp.results)
    assert [x.put.header.shard_id for x in resp.results] == [view.owner("", s).id for s in sids]

    # Interleave reads, counters, a bad op and an empty op: each result sits at its op's index.
    ops: list[state_pb2.BatchOp] = []
    expect: list[tuple[str, Any]] = []
    for i, s in enumerate(reversed(sids)):
        ops.append(state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=s, key="k")))
        expect.append(("get", s.encode()))
        if i % 5 == 0:
            ops.append(state_pb2.BatchOp(increment=state_pb2.IncrementRequest(session_id=s, key="n", delta=i + 1)))
            expect.append(("incr", i + 1))
        if i % 7 == 0:
            ops.append(state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=s, key="")))
            expect.append(("invalid", "key"))
    ops.insert(3, state_pb2.BatchOp())
    expect.insert(3, ("invalid", "op"))
    resp = r.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=T)
    assert len(resp.results) == len(ops)
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for (kind, want), x in zip(expect, resp.results, strict=True):
        if kind == "get":
            assert x.code == 0 and x.get.record.value == want, x
        elif kind == "incr":
            assert x.code == 0 and x.increment.value == want, x
        else:
            assert x.code == invalid and want in x.message, x


def test_batch_cas_conflict_is_a_normal_result(cluster: RouterCluster) -> None:
    r = cluster.stub(cluster.routers[1])
    sid = uid("cas")
    v = r.put(sid, "k", b"1").version
    ops = [
        state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key="k", value=b"2", expected_version=v + 1)),
        state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key="k", value=b"3", expected_version=v)),
    ]
    res = r.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=T).results
    assert res[0].code == 0 and not res[0].put.applied and res[0].put.current.version == v
    assert res[1].code == 0 and res[1].put.applied and res[1].put.version > v


def test_pipeline_through_the_router_answers_every_id(cluster: RouterCluster) -> None:
    r = cluster.stub(cluster.routers[0])
    sids = [uid("pipe") for _ in range(12)]

    def requests() -> Iterator[state_pb2.PipelineRequest]:
        for n in range(1, 31):
            ops = [state_pb2.BatchOp(increment=state_pb2.IncrementRequest(session_id=s, key="c", delta=1)) for s in sids]
            yield state_pb2.PipelineRequest(id=n, batch=state_pb2.BatchRequest(ops=ops))

    got = {}
    for resp in r.state.Pipeline(requests(), timeout=T):
        assert resp.code == 0, resp.message
        assert len(resp.batch.results) == len(sids)
        assert all(x.code == 0 for x in resp.batch.results)
        got[resp.id] = [x.increment.value for x in resp.batch.results]
    assert sorted(got) == list(range(1, 31))
    for s in sids:
        assert r.get(s, "c").record.value == b"30"
    # Values of one session grew 1..30 across the pipeline.
    assert sorted(v[0] for v in got.values()) == list(range(1, 31))


# ---- ListSessions ----


def test_list_sessions_pages_of_7_over_3_shards_every_session_once_sorted(cluster: RouterCluster) -> None:
    ns = uid("ns")
    sids = [f"l-{uuid.uuid4().hex[:8]}" for _ in range(100)]
    r = cluster.stub(cluster.routers[0])
    for s in sids:
        r.put(s, "k", b"v", ns=ns)
    view = r.view()
    assert len({view.owner(ns, s).id for s in sids}) == 3
    for router in cluster.routers:
        pages = cluster.stub(router).list_all(ns=ns, limit=7)
        assert all(len(p) == 7 for p in pages[:-1]) and 1 <= len(pages[-1]) <= 7
        flat = [s for p in pages for s in p]
        assert flat == sorted(sids)
    # Prefix filters on every shard; the last page has no token.
    sub = sorted(s for s in sids if s.startswith("l-a"))
    flat = [s for p in r.list_all(ns=ns, prefix="l-a", limit=3) for s in p]
    assert flat == sub
    resp = r.state.ListSessions(state_pb2.ListSessionsRequest(namespace=ns, limit=1000), timeout=T)
    assert [s.session_id for s in resp.sessions] == sorted(sids) and resp.next_page_token == ""
    assert {s.shard_id for s in resp.sessions} == {"s1", "s2", "s3"}
    empty = r.state.ListSessions(state_pb2.ListSessionsRequest(namespace=uid("none")), timeout=T)
    assert list(empty.sessions) == [] and empty.next_page_token == ""


def test_list_sessions_pages_every_session_once_when_shards_serve_smaller_pages(procs: Procs) -> None:
    """Shards whose --max-page is below the caller's page size answer short pages; the
    router's page must not run past what a short-paged shard has shown, or the sessions it
    had not yet returned are skipped."""
    shards = [procs.shard(f"s{i}", "--max-page", "3") for i in (1, 2)]
    router = procs.router([s.address for s in shards])
    r = Stubs(router.address)
    try:
        ns = uid("ns")
        sids = [f"p-{i:03d}" for i in range(40)]
        for s in sids:
            r.put(s, "k", b"v", ns=ns)
        assert len({r.view().owner(ns, s).id for s in sids}) == 2
        flat = [s for p in r.list_all(ns=ns, limit=10) for s in p]
        assert flat == sids
    finally:
        r.close()


def test_list_sessions_bad_page_token_is_invalid_argument(cluster: RouterCluster) -> None:
    r = cluster.stub(cluster.routers[0])
    exc = expect_error(grpc.StatusCode.INVALID_ARGUMENT, r.state.ListSessions,
                       state_pb2.ListSessionsRequest(page_token="not-a-token!"), timeout=T)
    assert "page_token" in exc.message


# ---- a plain generated stub uses the whole API through the router ----


def test_plain_stub_full_api_through_the_router(cluster: RouterCluster) -> None:
    st = cluster.stub(cluster.routers[1]).state
    sid, ns = uid("plain"), "agents"
    put = st.Put(state_pb2.PutRequest(namespace=ns, session_id=sid, key="state", value=b"v1", expected_version=0), timeout=T)
    assert put.applied and put.version > 0 and put.header.shard_id in ("s1", "s2", "s3")
    again = st.Put(state_pb2.PutRequest(namespace=ns, session_id=sid, key="state", value=b"x", expected_version=0), timeout=T)
    assert not again.applied and again.current.value == b"v1"
    got = st.Get(state_pb2.GetRequest(namespace=ns, session_id=sid, key="state"), timeout=T)
    assert got.found and got.record.version == put.version
    inc = st.Increment(state_pb2.IncrementRequest(namespace=ns, session_id=sid, key="steps", delta=5), timeout=T)
    assert inc.value == 5
    app = st.Append(state_pb2.AppendRequest(namespace=ns, session_id=sid, stream="m", entries=[b"a", b"b", b"c"]), timeout=T)
    assert list(app.seqs) == [1, 2, 3]
    log = st.ReadLog(state_pb2.ReadLogRequest(namespace=ns, session_id=sid, stream="m", last=2), timeout=T)
    assert [e.data for e in log.entries] == [b"b", b"c"]
    pop = st.PopLast(state_pb2.PopLastRequest(namespace=ns, session_id=sid, stream="m"), timeout=T)
    assert pop.found and pop.entry.data == b"c"
    trim = st.TrimLog(state_pb2.TrimLogRequest(namespace=ns, session_id=sid, stream="m", keep_last=1), timeout=T)
    assert trim.removed == 1
    txn = st.Txn(state_pb2.TxnRequest(
        namespace=ns, session_id=sid,
        compares=[state_pb2.Compare(key="state", version=put.version)],
        success=[state_pb2.TxnOp(put=state_pb2.PutRequest(key="state", value=b"v2"))],
        failure=[state_pb2.TxnOp(get=state_pb2.GetRequest(key="state"))],
    ), timeout=T)
    assert txn.succeeded
    scan = st.Scan(state_pb2.ScanRequest(namespace=ns, session_id=sid), timeout=T)
    assert [r.key for r in scan.records] == ["state", "steps"]
    touch = st.Touch(state_pb2.TouchRequest(namespace=ns, session_id=sid, ttl_ms=600_000), timeout=T)
    assert touch.expires_at_ms > 0
    info = st.GetSession(state_pb2.GetSessionRequest(namespace=ns, session_id=sid), timeout=T)
    assert info.session.key_count == 2 and info.session.expires_at_ms == touch.expires_at_ms
    dele = st.Delete(state_pb2.DeleteRequest(namespace=ns, session_id=sid, key="steps"), timeout=T)
    assert dele.applied and dele.existed
    drop = st.DeleteSession(state_pb2.DeleteSessionRequest(namespace=ns, session_id=sid), timeout=T)
    assert drop.existed
    expect_error(grpc.StatusCode.NOT_FOUND, st.GetSession,
                 state_pb2.GetSessionRequest(namespace=ns, session_id=sid), timeout=T)


def test_watch_through_the_router(cluster: RouterCluster) -> None:
    r = cluster.stub(cluster.routers[0])
    sid = uid("watch")
    first = r.put(sid, "a", b"1").version
    stream = r.state.Watch(state_pb2.WatchRequest(session_id=sid, from_revision=first), timeout=T)
    r.put(sid, "b", b"2")
    seen: list[tuple[int, str]] = []
    for resp in stream:
        seen += [(e.type, e.record.key) for e in resp.events]
        if len(seen) >= 2:
            break
    stream.cancel()
    assert seen[:2] == [(types_pb2.PUT, "a"), (types_pb2.PUT, "b")]


def test_watch_deadline_propagates_through_the_router(cluster: RouterCluster) -> None:
    r = cluster.stub(cluster.routers[0])
    stream = r.state.Watch(state_pb2.WatchRequest(session_id=uid("wd")), timeout=1.5)
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]


# ---- bad input gets the status and message the shard gives ----


def test_bad_input_through_the_router(cluster: RouterCluster) -> None:
    r = cluster.stub(cluster.routers[0])
    exc = expect_error(grpc.StatusCode.INVALID_ARGUMENT, r.put, "", "k", b"v")
    assert "session_id" in exc.message
    exc = expect_error(grpc.StatusCode.INVALID_ARGUMENT, r.put, "s" * 257, "k", b"v")
    assert "session_id" in exc.message and "256" in exc.message
    exc = expect_error(grpc.StatusCode.INVALID_ARGUMENT, r.put, uid(), "", b"v")
    assert "key" in exc.message
    exc = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, r.put, uid(), "k", b"x" * (1024 * 1024 + 1))
    assert isinstance(exc, errors.LimitExceededError) and exc.limit == "max_value_bytes"
    sid = uid()
    r.put(sid, "word", b"hello")
    exc = expect_error(grpc.StatusCode.INVALID_ARGUMENT, r.state.Increment,
                       state_pb2.IncrementRequest(session_id=sid, key="word", delta=1), timeout=T)
    assert "integer" in exc.message
    exc = expect_error(grpc.StatusCode.NOT_FOUND, r.state.ReadLog,
                       state_pb2.ReadLogRequest(session_id=sid, stream="nope"), timeout=T)
    ops = [state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=uid(), key="k"))] * 1001
    exc = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, r.state.Batch, state_pb2.BatchRequest(ops=ops), timeout=T)
    assert isinstance(exc, errors.LimitExceededError) and exc.limit == "max_batch_ops"
    # Not a protobuf message of the method at all: refused without reaching a shard.
    raw = r.channel.unary_unary("/shardstate.v1.State/Get")
    exc = expect_error(grpc.StatusCode.INVALID_ARGUMENT, raw, b"\xff\xff\xff", timeout=T)
    assert "Get request" in exc.message


def test_admin_status_lists_router_and_every_shard(cluster: RouterCluster) -> None:
    st = cluster.stub(cluster.routers[0]).admin.Status(admin_pb2.StatusRequest(), timeout=T)
    roles = collections.Counter(n.role for n in st.nodes)
    assert roles[admin_pb2.ROUTER] == 1 and roles[admin_pb2.PRIMARY] == 3
    shards = {n.shard_id: n for n in st.nodes if n.role == admin_pb2.PRIMARY}
    assert set(shards) == {"s1", "s2", "s3"}
    for s in cluster.shards:
        n = shards[s.args[1]]
        assert n.up and n.address == s.address and n.epoch == st.cluster_map.epoch
    assert st.cluster_map.epoch >= 1 and len(st.cluster_map.shards) == 3
    exc = expect_error(grpc.StatusCode.UNAVAILABLE, cluster.stub(cluster.routers[0]).admin.AddShard,
                       admin_pb2.AddShardRequest(id="s9", primary="127.0.0.1:1"), timeout=T)
    assert "127.0.0.1:1 does not answer" in exc.message and "nothing changed" in exc.message


def test_router_serves_health_and_reflection(cluster: RouterCluster, tmp_path: Path) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    r = cluster.routers[0]
    assert r.healthy("") and r.healthy("shardstate.v1.State")
    stub = reflection_pb2_grpc.ServerReflectionStub(cluster.stub(r).channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    services = {s.name for resp in stub.ServerReflectionInfo(iter([req]), timeout=T)
                for s in resp.list_services_response.service}
    assert {"shardstate.v1.State", "shardstate.v1.Admin", "grpc.health.v1.Health"} <= services


def test_watch_through_the_router_survives_a_shard_restart(procs: Procs) -> None:
    c = RouterCluster(procs, shards=2, routers=1)
    try:
        r = c.stub(c.routers[0])
        sid = uid("wr")
        owner = r.view().owner("", sid).id
        shard = next(p for p in c.shards if p.args[1] == owner)
        r.put(sid, "k", b"0")
        stream = r.state.Watch(state_pb2.WatchRequest(session_id=sid), timeout=120)
        keys: list[bytes] = []
        it = iter(stream)
        next(it)  # the watch is in place
        r.put(sid, "k", b"1")
        while not keys:
            keys += [e.record.value for e in next(it).events]
        assert shard.terminate() == 0
        shard.start()
        wait_until(lambda: _put_ok(r, sid, b"2"))
        r.put(sid, "k", b"3")
        while len(keys) < 3:
            keys += [e.record.value for e in next(it).events]
        stream.cancel()
        assert keys == [b"1", b"2", b"3"]  # no gap, no repeat across the restart
    finally:
        c.close()


def _put_ok(r: Stubs, sid: str, value: bytes) -> bool:
    try:
        # One request_id for every attempt: a retry never applies twice.
        return bool(r.put(sid, "k", value, request_id=f"{sid}-{value!r}").applied)
    except grpc.RpcError:
        return False
