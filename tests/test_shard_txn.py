"""Txn on one real shard: compares on version, value, existence and log length decide between
the success and the failure ops, atomically (etcd-style, docs/design.md §3).
"""

from __future__ import annotations

import grpc

from tests.stubs import CALL_TIMEOUT_S, Conn, expect_error, shard_fixture, state_pb2, uid

shard = shard_fixture("s1")
T = CALL_TIMEOUT_S
C = state_pb2.Compare


def put_op(key: str, value: bytes) -> state_pb2.TxnOp:
    return state_pb2.TxnOp(put=state_pb2.PutRequest(key=key, value=value))


def txn(
    shard: Conn,
    sid: str,
    compares: list[state_pb2.Compare],
    success: list[state_pb2.TxnOp],
    failure: list[state_pb2.TxnOp] | None = None,
) -> state_pb2.TxnResponse:
    req = state_pb2.TxnRequest(
        session_id=sid, compares=compares, success=success, failure=failure or []
    )
    return shard.state.Txn(req, timeout=T)


def test_success_ops_run_atomically_at_one_revision(shard: Conn) -> None:
    sid = uid()
    v = shard.put(sid, "guard", b"g").version
    shard.put(sid, "old", b"bye")
    shard.put(sid, "n", b"10")
    resp = txn(
        shard,
        sid,
        [C(key="guard", version=v)],
        [
            put_op("a", b"A"),
            state_pb2.TxnOp(increment=state_pb2.IncrementRequest(key="n", delta=5)),
            state_pb2.TxnOp(append=state_pb2.AppendRequest(stream="s", entries=[b"e1", b"e2"])),
            state_pb2.TxnOp(delete=state_pb2.DeleteRequest(key="old")),
            state_pb2.TxnOp(get=state_pb2.GetRequest(key="a")),
        ],
    )
    assert resp.succeeded and resp.revision > v
    kinds = [r.WhichOneof("result") for r in resp.results]
    assert kinds == ["put", "increment", "append", "delete", "get"]
    put, inc, app, dele, get = resp.results
    assert put.put.applied and put.put.version == resp.revision
    assert inc.increment.value == 15 and inc.increment.version == resp.revision
    assert list(app.append.seqs) == [1, 2]
    assert dele.delete.existed
    assert get.get.found and get.get.record.value == b"A"  # ops see the earlier ops of the Txn
    assert shard.get(sid, "a").record.version == resp.revision
    assert shard.get(sid, "n").record.value == b"15"
    assert not shard.get(sid, "old").found
    assert [e.data for e in shard.read_log(sid, "s").entries] == [b"e1", b"e2"]


def test_failed_compare_runs_failure_ops_and_none_of_success(shard: Conn) -> None:
    sid = uid()
    v = shard.put(sid, "guard", b"g").version
    shard.put(sid, "n", b"1")
    resp = txn(
        shard,
        sid,
        [C(key="guard", version=v + 1)],
        [
            put_op("a", b"A"),
            state_pb2.TxnOp(increment=state_pb2.IncrementRequest(key="n", delta=5)),
            state_pb2.TxnOp(append=state_pb2.AppendRequest(stream="s", entries=[b"e"])),
            state_pb2.TxnOp(delete=state_pb2.DeleteRequest(key="guard")),
        ],
        [put_op("lost", b"yes"), state_pb2.TxnOp(get=state_pb2.GetRequest(key="guard"))],
    )
    assert not resp.succeeded
    assert [r.WhichOneof("result") for r in resp.results] == ["put", "get"]
    assert resp.results[1].get.record.version == v
    assert not shard.get(sid, "a").found
    assert shard.get(sid, "n").record.value == b"1"
    assert shard.get(sid, "guard").record.version == v
    assert shard.get(sid, "lost").record.value == b"yes"
    expect_error(grpc.StatusCode.NOT_FOUND, shard.read_log, sid, "s")


def test_one_false_compare_among_true_ones_fails_the_txn(shard: Conn) -> None:
    sid = uid()
    v = shard.put(sid, "a", b"1").version
    resp = txn(shard, sid, [C(key="a", version=v), C(key="a", value=b"2")], [put_op("x", b"x")])
    assert not resp.succeeded and list(resp.results) == []
    assert not shard.get(sid, "x").found


def test_compare_version_results(shard: Conn) -> None:
    sid = uid()
    v = shard.put(sid, "a", b"1").version

    def holds(c: state_pb2.Compare) -> bool:
        return txn(shard, sid, [c], []).succeeded

    assert holds(C(key="a", version=v))
    assert not holds(C(key="a", version=v - 1))
    assert holds(C(key="a", result=C.NOT_EQUAL, version=v - 1))
    assert holds(C(key="a", result=C.GREATER, version=v - 1))
    assert not holds(C(key="a", result=C.GREATER, version=v))
    assert holds(C(key="a", result=C.LESS, version=v + 1))
    assert holds(C(key="absent", version=0))  # version 0 = absent
    assert not holds(C(key="a", version=0))


def test_compare_value_results(shard: Conn) -> None:
    sid = uid()
    shard.put(sid, "a", b"bbb")

    def holds(c: state_pb2.Compare) -> bool:
        return txn(shard, sid, [c], []).succeeded

    assert holds(C(key="a", value=b"bbb"))
    assert not holds(C(key="a", value=b"bb"))
    assert holds(C(key="a", result=C.NOT_EQUAL, value=b"x"))
    assert holds(C(key="a", result=C.GREATER, value=b"bba"))
    assert holds(C(key="a", result=C.LESS, value=b"bbc"))
    assert not holds(C(key="absent", value=b""))  # an absent key never matches EQUAL


def test_compare_exists_results(shard: Conn) -> None:
    sid = uid()
    shard.put(sid, "a", b"1")

    def holds(c: state_pb2.Compare) -> bool:
        return txn(shard, sid, [c], []).succeeded

    assert holds(C(key="a", exists=True))
    assert not holds(C(key="a", exists=False))
    assert holds(C(key="absent", exists=False))
    assert holds(C(key="absent", result=C.NOT_EQUAL, exists=True))
    # create-if-absent, the classic use
    first = txn(shard, sid, [C(key="lock", exists=False)], [put_op("lock", b"me")])
    second = txn(shard, sid, [C(key="lock", exists=False)], [put_op("lock", b"you")])
    assert first.succeeded and not second.succeeded
    assert shard.get(sid, "lock").record.value == b"me"


def test_compare_log_length_results(shard: Conn) -> None:
    sid = uid()
    shard.append(sid, "s", b"1", b"2", b"3")

    def holds(c: state_pb2.Compare) -> bool:
        return txn(shard, sid, [c], []).succeeded

    assert holds(C(key="s", log_length=3))
    assert not holds(C(key="s", log_length=2))
    assert holds(C(key="s", result=C.GREATER, log_length=2))
    assert holds(C(key="s", result=C.LESS, log_length=4))
    assert holds(C(key="nostream", log_length=0))
    # append only if nobody appended since we read (optimistic log append)
    ok = txn(
        shard,
        sid,
        [C(key="s", log_length=3)],
        [state_pb2.TxnOp(append=state_pb2.AppendRequest(stream="s", entries=[b"4"]))],
    )
    late = txn(
        shard,
        sid,
        [C(key="s", log_length=3)],
        [state_pb2.TxnOp(append=state_pb2.AppendRequest(stream="s", entries=[b"4bis"]))],
    )
    assert ok.succeeded and not late.succeeded
    assert [e.data for e in shard.read_log(sid, "s").entries] == [b"1", b"2", b"3", b"4"]


def test_txn_with_a_failing_op_applies_nothing(shard: Conn) -> None:
    sid = uid()
    shard.put(sid, "text", b"abc")
    rev_before = shard.get_session(sid).session.max_version
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        txn,
        shard,
        sid,
        [],
        [
            put_op("a", b"A"),
            state_pb2.TxnOp(append=state_pb2.AppendRequest(stream="s", entries=[b"e"])),
            state_pb2.TxnOp(
                increment=state_pb2.IncrementRequest(key="text", delta=1)
            ),  # not an integer
            put_op("b", b"B"),
        ],
    )
    assert not shard.get(sid, "a").found and not shard.get(sid, "b").found
    assert shard.get(sid, "text").record.value == b"abc"
    expect_error(grpc.StatusCode.NOT_FOUND, shard.read_log, sid, "s")
    assert shard.get_session(sid).session.max_version == rev_before


def test_txn_op_naming_another_session_is_invalid(shard: Conn) -> None:
    sid = uid()
    op = state_pb2.TxnOp(put=state_pb2.PutRequest(session_id="elsewhere", key="a", value=b"x"))
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, txn, shard, sid, [], [op])
    assert not shard.get(sid, "a").found and not shard.get("elsewhere", "a").found
