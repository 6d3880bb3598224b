"""A router facing a dead shard: UNAVAILABLE naming the shard and its address, the other
shards' work still done, Status showing it down, and service back once the shard returns.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator

import grpc
import pytest

from shardstate.common import errors
from shardstate.v1 import admin_pb2, state_pb2
from tests.procs import Procs
from tests.routercluster import RouterCluster, T
from tests.stubs import expect_error, uid, wait_until


def test_dead_shard_gives_unavailable_naming_it_and_recovers(procs: Procs) -> None:
    c = RouterCluster(procs, shards=3, routers=1)
    try:
        r = c.stub(c.routers[0])
        view = r.view()
        sids = [uid("dead") for _ in range(60)]
        for s in sids:
            r.put(s, "k", b"before")
        victim = c.shards[1]
        vid = victim.args[1]
        on_victim = [s for s in sids if view.owner("", s).id == vid]
        elsewhere = [s for s in sids if view.owner("", s).id != vid]
        assert on_victim and elsewhere
        victim.kill()

        exc = expect_error(grpc.StatusCode.UNAVAILABLE, r.get, on_victim[0], "k")
        assert isinstance(exc, errors.UnavailableError)
        assert vid in exc.message and victim.address in exc.message
        exc = expect_error(grpc.StatusCode.UNAVAILABLE, r.put, on_victim[1], "k", b"x")
        assert vid in exc.message
        # Sessions elsewhere are unaffected.
        assert all(r.get(s, "k").record.value == b"before" for s in elsewhere)

        # A Batch still runs the other shards' ops; the victim's ops carry UNAVAILABLE.
        ops = [state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=s, key="k")) for s in sids]
        res = r.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=T).results
        for s, x in zip(sids, res, strict=True):
            if s in on_victim:
                assert x.code == grpc.StatusCode.UNAVAILABLE.value[0] and vid in x.message and victim.address in x.message
            else:
                assert x.code == 0 and x.get.record.value == b"before"

        exc = expect_error(grpc.StatusCode.UNAVAILABLE, r.state.ListSessions, state_pb2.ListSessionsRequest(), timeout=T)
        assert vid in exc.message

        st = r.admin.Status(admin_pb2.StatusRequest(), timeout=T)
        down = [n for n in st.nodes if not n.up]
        assert [(n.shard_id, n.address) for n in down] == [(vid, victim.address)]
        assert down[0].error
        assert sum(1 for n in st.nodes if n.up and n.role == admin_pb2.PRIMARY) == 2

        victim.start()  # same port: the map still names it

        def back() -> bool:
            try:
                return r.get(on_victim[0], "k").record.value == b"before"
            except grpc.RpcError:
                return False

        wait_until(back)
        assert r.put(on_victim[1], "k", b"after").applied
        assert all(x.code == 0 for x in r.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=T).results)
    finally:
        c.close()


def test_router_waits_for_seeds_before_bootstrapping(procs: Procs) -> None:
    shards = [procs.shard(f"s{i}", start=False) for i in (1, 2)]
    shards[0].start()
    # The second seed is not up: the router must not build a one-shard map without it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    shards[1].port = free
    router = procs.router([shards[0].address, f"127.0.0.1:{free}"], start=False)
    router.start(wait=False)
    c = RouterCluster.__new__(RouterCluster)
    c.procs, c.shards, c.routers, c.stubs = procs, shards, [router], {}
    try:
        seed0 = c.stub(shards[0])
        wait_until(lambda: "waiting for the cluster map" in router.log_tail())
        assert router.alive() and not router.port_file.exists() and seed0.view().epoch == 0
        shards[1].start()
        router.wait_ready()
        view = c.stub(router).view()
        assert sorted(s.id for s in view.pb.shards) == ["s1", "s2"]
        assert seed0.view().pb == view.pb
    finally:
        c.close()


def test_hung_shard_gives_the_caller_deadline_exceeded_and_others_carry_on(procs: Procs) -> None:
    c = RouterCluster(procs, shards=3, routers=1)
    hung = c.shards[0]
    try:
        r = c.stub(c.routers[0])
        view = r.view()
        sids = [uid("hang") for _ in range(30)]
        on_hung = [s for s in sids if view.owner("", s).id == hung.args[1]]
        elsewhere = [s for s in sids if view.owner("", s).id != hung.args[1]]
        assert hung.popen is not None
        hung.popen.send_signal(signal.SIGSTOP)
        try:
            # Get rides the coalesced shard link; PopLast is forwarded as a unary call.
            expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, r.state.Get,
                         state_pb2.GetRequest(session_id=on_hung[0], key="k"), timeout=1.5)
            expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, r.state.PopLast,
                         state_pb2.PopLastRequest(session_id=on_hung[0], stream="m"), timeout=1.5)
            assert all(not r.get(s, "k").found for s in elsewhere)
        finally:
            hung.popen.send_signal(signal.SIGCONT)
        assert r.put(on_hung[0], "k", b"v").applied  # the backlog cleared, the link still works
        assert r.get(on_hung[0], "k").record.value == b"v"
    finally:
        c.close()


def test_router_sigterm_answers_in_flight_then_ends_streams_unavailable(procs: Procs) -> None:
    c = RouterCluster(procs, shards=2, routers=1)
    try:
        router = c.routers[0]
        r = c.stub(router)
        sid = uid("drain")
        watch = r.state.Watch(state_pb2.WatchRequest(session_id=sid), timeout=120)
        watch_it = iter(watch)
        next(watch_it)  # in place
        sent = threading.Event()
        release = threading.Event()

        def requests() -> Iterator[state_pb2.PipelineRequest]:
            for n in range(1, 4):
                op = state_pb2.BatchOp(increment=state_pb2.IncrementRequest(session_id=sid, key="n", delta=1))
                yield state_pb2.PipelineRequest(id=n, batch=state_pb2.BatchRequest(ops=[op]))
            sent.set()
            release.wait(60)  # keep our side open, as a long-lived client does

        answers: list[int] = []
        with pytest.raises(grpc.RpcError) as info:
            for resp in r.state.Pipeline(requests(), timeout=120):
                assert resp.code == 0 and resp.batch.results[0].code == 0
                answers.append(resp.id)
                if len(answers) == 3:
                    assert router.popen is not None
                    router.popen.send_signal(signal.SIGTERM)
        release.set()
        assert sorted(answers) == [1, 2, 3]
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as winfo:
            for _ in watch_it:
                pass
        assert winfo.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert "shutting down" in winfo.value.details()  # type: ignore[attr-defined]
        assert router.popen is not None and router.popen.wait(60) == 0
    finally:
        c.close()


# ---- bad input through a router (issue 13: defects 2, 3, 7) ----

BAD_SID_PUT = b"\x12\x02\xff\xfe\x1a\x01k"  # PutRequest{session_id=<not UTF-8>, key="k"}
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_one_callers_malformed_ops_fail_only_themselves(procs: Procs) -> None:
    """Raw Puts with a session id that is not UTF-8, and Batches with ops that do not parse,
    sent while other callers write through the same router (whose shard link coalesces
    callers' ops): the bad ones get INVALID_ARGUMENT alone, every good op succeeds."""
    c = RouterCluster(procs, shards=2, routers=1)
    try:
        r = c.stub(c.routers[0])
        raw_put = r.channel.unary_unary("/shardstate.v1.State/Put")
        raw_batch = r.channel.unary_unary("/shardstate.v1.State/Batch")
        good_errors: list[str] = []
        acked: dict[tuple[str, str], bytes] = {}
        stop = threading.Event()

        def writer(w: int) -> None:
            sid = uid(f"good{w}")
            for i in range(150):
                if stop.is_set():
                    return
                try:
                    r.put(sid, f"k{i}", b"v%d" % i)
                    acked[(sid, f"k{i}")] = b"v%d" % i
                except grpc.RpcError as e:
                    good_errors.append(f"{e.code()}: {e.details()}")  # type: ignore[attr-defined]

        bad_codes: list[grpc.StatusCode] = []

        def poison() -> None:
            good = state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=uid("pb"), key="k", value=b"v"))
            batch = state_pb2.BatchRequest(ops=[good]).SerializeToString() + b"\x0a\x03\x12\x09a"  # ops[1] truncated
            for _ in range(150):
                try:
                    raw_put(BAD_SID_PUT, timeout=T)
                except grpc.RpcError as e:
                    bad_codes.append(e.code())  # type: ignore[attr-defined]
                resp = state_pb2.BatchResponse.FromString(raw_batch(batch, timeout=T))
                assert [x.code for x in resp.results] == [0, INVALID.value[0]], resp
                assert "ops[1] is not a valid shardstate.v1.BatchOp" in resp.results[1].message

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)] + [threading.Thread(target=poison)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stop.set()
        assert good_errors == []
        assert bad_codes == [INVALID] * 150
        assert len(acked) == 600
        for (sid, key), value in acked.items():
            assert r.get(sid, key).record.value == value
        err = expect_error(INVALID, raw_put, BAD_SID_PUT, timeout=T)
        assert "session_id is not valid UTF-8" in err.message
        # The shard gives the same answer to the same bytes.
        shard_put = c.stub(c.shards[0]).channel.unary_unary("/shardstate.v1.State/Put")
        assert "session_id is not valid UTF-8" in expect_error(INVALID, shard_put, BAD_SID_PUT, timeout=T).message
        assert "Task exception was never retrieved" not in c.routers[0].log_tail(10_000)
    finally:
        c.close()


def test_router_and_shards_validate_alike_before_routing(procs: Procs) -> None:
    c = RouterCluster(procs, shards=2, routers=1)
    try:
        r = c.stub(c.routers[0])
        view = r.view()
        s1 = c.shard_stub("s1")
        other = next(s for s in (uid("o") for _ in range(100)) if view.owner("", s).id == "s2")
        expect_error(grpc.StatusCode.FAILED_PRECONDITION, s1.put, other, "k", b"v")  # s1 holds the map
        long_sid = next(s for s in ("x" * 300 + str(i) for i in range(100)) if view.owner("", s).id == "s2")
        for target in (r, s1):
            err = expect_error(INVALID, target.put, long_sid, "k", b"v")  # not WrongShard at s1
            assert "max_session_id_bytes=256" in err.message
            err = expect_error(INVALID, target.put, uid(), "k", b"v", ns="n" * 257)
            assert "max_namespace_bytes=256" in err.message
            err = expect_error(INVALID, target.state.Get, state_pb2.GetRequest(
                session_id=other, key="k", consistency=9), timeout=T)  # type: ignore[arg-type]
            assert "consistency 9" in err.message
            err = expect_error(INVALID, target.state.ListSessions,
                               state_pb2.ListSessionsRequest(page_token="garbage"), timeout=T)
            assert "page_token" in err.message
        for i in range(5):
            r.put(uid(f"list{i}"), "k", b"v", ns="lst")
        via_router = [s for page in r.list_all(ns="lst", limit=2) for s in page]
        via_shards = [s for sh in ("s1", "s2") for page in c.shard_stub(sh).list_all(ns="lst", limit=2) for s in page]
        assert len(via_router) == 5 and via_router == sorted(via_shards)
    finally:
        c.close()


def test_a_shard_that_does_not_own_the_session_answers_bad_input_as_the_owner_does(procs: Procs) -> None:
    c = RouterCluster(procs, shards=2, routers=1)
    try:
        view = c.stub(c.routers[0]).view()
        other = next(s for s in (uid("o") for _ in range(100)) if view.owner("", s).id == "s2")
        s1, s2 = c.shard_stub("s1"), c.shard_stub("s2")
        st = state_pb2
        bad: list[tuple[str, object, grpc.StatusCode, str]] = [
            ("Put", st.PutRequest(session_id=other, key="", value=b"v"), INVALID, "max_key_bytes"),
            ("Put", st.PutRequest(session_id=other, key="k", value=b"v" * (1024 * 1024 + 1)),
             grpc.StatusCode.RESOURCE_EXHAUSTED, "max_value_bytes"),
            ("Put", st.PutRequest(session_id=other, key="k", ttl_ms=2**63), INVALID, "ttl_ms"),
            ("Put", st.PutRequest(session_id=other, key="k", request_id="r" * 300), INVALID, "request_id"),
            ("Get", st.GetRequest(session_id=other, key="k" * 1025), INVALID, "max_key_bytes"),
            ("Append", st.AppendRequest(session_id=other, stream="s"), INVALID, "entries is empty"),
            ("ReadLog", st.ReadLogRequest(session_id=other, stream=""), INVALID, "max_stream_name_bytes"),
            ("Touch", st.TouchRequest(session_id=other, ttl_ms=2**63), INVALID, "ttl_ms"),
            ("Txn", st.TxnRequest(session_id=other, compares=[st.Compare(key="k")]), INVALID, "no target"),
            ("Txn", st.TxnRequest(session_id=other, failure=[st.TxnOp(delete=st.DeleteRequest(key=""))]),
             INVALID, "max_key_bytes"),
        ]
        for method, req, code, names in bad:
            answers = []
            for target in (s2, s1):  # the owner, then the other shard: the same answer, no redirect
                err = expect_error(code, getattr(target.state, method), req, timeout=T)
                assert names in err.message, (method, err.message)
                answers.append(err.message)
            assert answers[0] == answers[1], answers
        # valid input at the shard that does not own the session is still redirected
        expect_error(grpc.StatusCode.FAILED_PRECONDITION, s1.put, other, "k", b"v")
    finally:
        c.close()
