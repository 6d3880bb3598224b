"""Idempotent retries on a real shard: the same request_id gets the stored response back with
header.replayed=true and the mutation applies once (Put, Append, Increment, Delete, Txn).
"""

from __future__ import annotations

import threading

import grpc
import pytest

from tests.stubs import CALL_TIMEOUT_S, Conn, shard_fixture, state_pb2, uid

shard = shard_fixture("s1")
T = CALL_TIMEOUT_S


def test_retried_append_applies_once(shard: Conn) -> None:
    sid = uid()
    req = state_pb2.AppendRequest(
        session_id=sid, stream="m", entries=[b"a", b"b"], request_id="r-append-1"
    )
    first = shard.state.Append(req, timeout=T)
    assert not first.header.replayed and list(first.seqs) == [1, 2]
    again = shard.state.Append(req, timeout=T)
    assert again.header.replayed
    assert list(again.seqs) == [1, 2] and again.revision == first.revision
    assert [e.data for e in shard.read_log(sid, "m").entries] == [b"a", b"b"]
    # a new request id is a new append
    other = shard.append(sid, "m", b"c", request_id="r-append-2")
    assert not other.header.replayed and list(other.seqs) == [3]
    assert shard.state.Append(req, timeout=T).header.replayed
    assert [e.seq for e in shard.read_log(sid, "m").entries] == [1, 2, 3]


def test_retried_increment_applies_once(shard: Conn) -> None:
    sid = uid()
    req = state_pb2.IncrementRequest(session_id=sid, key="n", delta=5, request_id="r-inc")
    first = shard.state.Increment(req, timeout=T)
    assert first.value == 5 and not first.header.replayed
    for _ in range(3):
        again = shard.state.Increment(req, timeout=T)
        assert again.header.replayed
        assert (again.value, again.version) == (5, first.version)
    g = shard.get(sid, "n")
    assert (g.record.value, g.record.version) == (b"5", first.version)
    shard.state.Increment(state_pb2.IncrementRequest(session_id=sid, key="n", delta=1), timeout=T)
    # the stored response stays the one of the first attempt
    assert shard.state.Increment(req, timeout=T).value == 5
    assert shard.get(sid, "n").record.value == b"6"


def test_retried_put_applies_once_even_after_later_writes(shard: Conn) -> None:
    sid = uid()
    first = shard.put(sid, "k", b"v1", request_id="r-put")
    assert first.applied and not first.header.replayed
    again = shard.put(sid, "k", b"v1", request_id="r-put")
    assert again.header.replayed and again.applied and again.version == first.version
    assert shard.get(sid, "k").record.version == first.version
    later = shard.put(sid, "k", b"v2")
    # a late retry of the first put must not overwrite v2
    late = shard.put(sid, "k", b"v1", request_id="r-put")
    assert late.header.replayed and late.version == first.version
    g = shard.get(sid, "k")
    assert (g.record.value, g.record.version) == (b"v2", later.version)


def test_retried_cas_put_returns_the_original_outcome(shard: Conn) -> None:
    sid = uid()
    created = shard.put(sid, "k", b"v1", expected_version=0, request_id="r-cas")
    assert created.applied
    # retried create-only would now mismatch; the stored response says it applied
    again = shard.put(sid, "k", b"v1", expected_version=0, request_id="r-cas")
    assert again.header.replayed and again.applied and again.version == created.version


def test_request_ids_are_per_session(shard: Conn) -> None:
    a, b = uid(), uid()
    ra = shard.append(a, "m", b"x", request_id="same-id")
    rb = shard.append(b, "m", b"y", request_id="same-id")
    assert not ra.header.replayed and not rb.header.replayed
    assert [e.data for e in shard.read_log(b, "m").entries] == [b"y"]


def test_retried_delete_txn_pop_touch(shard: Conn) -> None:
    sid = uid()
    shard.put(sid, "k", b"v")
    shard.append(sid, "s", b"1", b"2", b"3")

    d_req = state_pb2.DeleteRequest(session_id=sid, key="k", request_id="r-del")
    d1 = shard.state.Delete(d_req, timeout=T)
    shard.put(sid, "k", b"recreated")
    d2 = shard.state.Delete(d_req, timeout=T)
    assert d2.header.replayed and d2.existed and d2.revision == d1.revision
    assert shard.get(sid, "k").record.value == b"recreated"

    t_req = state_pb2.TxnRequest(
        session_id=sid,
        success=[state_pb2.TxnOp(increment=state_pb2.IncrementRequest(key="n", delta=1))],
        request_id="r-txn",
    )
    t1 = shard.state.Txn(t_req, timeout=T)
    t2 = shard.state.Txn(t_req, timeout=T)
    assert t2.header.replayed and t2.revision == t1.revision
    assert shard.get(sid, "n").record.value == b"1"

    p_req = state_pb2.PopLastRequest(session_id=sid, stream="s", request_id="r-pop")
    p1 = shard.state.PopLast(p_req, timeout=T)
    p2 = shard.state.PopLast(p_req, timeout=T)
    assert p2.header.replayed and p2.entry.seq == p1.entry.seq == 3
    assert [e.seq for e in shard.read_log(sid, "s").entries] == [1, 2]

    tr_req = state_pb2.TrimLogRequest(session_id=sid, stream="s", before_seq=2, request_id="r-trim")
    tr1 = shard.state.TrimLog(tr_req, timeout=T)
    tr2 = shard.state.TrimLog(tr_req, timeout=T)
    assert tr1.removed == 1 and tr2.header.replayed and tr2.removed == 1
    assert [e.seq for e in shard.read_log(sid, "s").entries] == [2]


def test_concurrent_retries_of_one_request_apply_once(shard: Conn) -> None:
    sid = uid()
    req = state_pb2.IncrementRequest(session_id=sid, key="n", delta=1, request_id="r-race")
    results: list[state_pb2.IncrementResponse] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(shard.state.Increment(req, timeout=T))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert {r.value for r in results} == {1}
    assert sum(not r.header.replayed for r in results) == 1
    assert shard.get(sid, "n").record.value == b"1"


def test_replay_survives_a_batch(shard: Conn) -> None:
    sid = uid()
    op = state_pb2.BatchOp(
        increment=state_pb2.IncrementRequest(session_id=sid, key="n", delta=2, request_id="r-b")
    )
    first = shard.state.Batch(state_pb2.BatchRequest(ops=[op]), timeout=T).results[0]
    again = shard.state.Batch(state_pb2.BatchRequest(ops=[op]), timeout=T).results[0]
    assert first.code == 0 and again.code == 0
    assert again.increment.value == first.increment.value == 2
    assert again.increment.header.replayed and not first.increment.header.replayed
    assert shard.get(sid, "n").record.value == b"2"


def test_a_request_id_reused_for_other_arguments_is_refused(shard: Conn) -> None:
    """The same request_id with a different request of the same kind: INVALID_ARGUMENT naming
    it, nothing written; the first request's retry still replays (as DynamoDB's
    ClientRequestToken refuses with IdempotentParameterMismatch)."""
    sid = uid()
    first = shard.put(sid, "k", b"v1", request_id="r-reuse")
    assert first.applied
    with pytest.raises(grpc.RpcError) as e:
        shard.put(sid, "k", b"v2", request_id="r-reuse")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'r-reuse'" in (e.value.details() or "") and "different request" in (e.value.details() or "")
    g = shard.get(sid, "k")
    assert (g.record.value, g.record.version) == (b"v1", first.version)
    again = shard.put(sid, "k", b"v1", request_id="r-reuse")
    assert again.header.replayed and again.version == first.version

    inc = state_pb2.IncrementRequest(session_id=sid, key="n", delta=1, request_id="r-inc-reuse")
    assert shard.state.Increment(inc, timeout=T).value == 1
    other = state_pb2.IncrementRequest(session_id=sid, key="n", delta=5, request_id="r-inc-reuse")
    # in a Batch the refusal is that op's own result; the op beside it runs
    ops = [state_pb2.BatchOp(increment=other),
           state_pb2.BatchOp(increment=state_pb2.IncrementRequest(session_id=sid, key="m", delta=1))]
    results = shard.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=T).results
    assert results[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "different request" in results[0].message
    assert results[1].code == 0 and results[1].increment.value == 1
    assert shard.get(sid, "n").record.value == b"1"
    replay = shard.state.Batch(state_pb2.BatchRequest(ops=[state_pb2.BatchOp(increment=inc)]), timeout=T)
    assert replay.results[0].increment.header.replayed and replay.results[0].increment.value == 1
