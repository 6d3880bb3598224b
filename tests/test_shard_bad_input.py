"""Bad input against a real shard: the status code of docs/design.md §3, a message naming the field and
the limit, nothing written, and a server that keeps serving with its data intact.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from shardstate.common import errors
from tests.stubs import CALL_TIMEOUT_S, Conn, expect_error, shard_fixture, state_pb2, types_pb2, uid

T = CALL_TIMEOUT_S
MiB = 1024 * 1024
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

shard = shard_fixture("s1")
# tiny limits and change-log retention make those boundaries cheap to reach
tight = shard_fixture(
    "s2", "--changelog-retention", "5", "--max-keys-per-session", "5", "--max-session-bytes", "4096"
)


class Sentinel:
    """Data written before any bad input; `check()` proves it is intact and the shard serves."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.sid = uid("sentinel")
        self.version = conn.put(self.sid, "k", b"precious").version
        conn.append(self.sid, "log", b"a", b"b")

    def check(self) -> None:
        g = self.conn.get(self.sid, "k")
        assert (g.record.value, g.record.version) == (b"precious", self.version)
        assert [e.data for e in self.conn.read_log(self.sid, "log").entries] == [b"a", b"b"]
        assert self.conn.proc.alive() and self.conn.proc.healthy()
        assert self.conn.put(uid(), "still", b"serving").applied


@pytest.fixture(scope="module")
def sentinel(shard: Conn) -> Iterator[Sentinel]:
    s = Sentinel(shard)
    yield s
    s.check()


# ---- ids, keys, stream names ----


@pytest.mark.parametrize(
    "call", ["put", "get", "append", "scan", "touch", "delete_session", "increment"]
)
def test_empty_session_id_is_invalid(shard: Conn, sentinel: Sentinel, call: str) -> None:
    fn: dict[str, Any] = {
        "put": lambda: shard.put("", "k", b"v"),
        "get": lambda: shard.get("", "k"),
        "append": lambda: shard.append("", "s", b"e"),
        "scan": lambda: shard.state.Scan(state_pb2.ScanRequest(session_id=""), timeout=T),
        "touch": lambda: shard.state.Touch(
            state_pb2.TouchRequest(session_id="", ttl_ms=5), timeout=T
        ),
        "delete_session": lambda: shard.state.DeleteSession(
            state_pb2.DeleteSessionRequest(session_id=""), timeout=T
        ),
        "increment": lambda: shard.state.Increment(
            state_pb2.IncrementRequest(session_id="", key="n"), timeout=T
        ),
    }
    err = expect_error(INVALID, fn[call])
    assert "session" in err.message.lower(), err.message
    sentinel.check()


@pytest.mark.parametrize("sid", ["x" * 257, "é" * 129], ids=["257-ascii", "258-bytes-utf8"])
def test_oversize_session_id_is_invalid_and_names_the_limit(
    shard: Conn, sentinel: Sentinel, sid: str
) -> None:
    err = expect_error(INVALID, shard.put, sid, "k", b"v")
    assert "session" in err.message.lower() and "256" in err.message, err.message
    err = expect_error(INVALID, shard.get, sid, "k")
    assert "256" in err.message
    sentinel.check()


def test_session_id_at_the_limit_is_fine(shard: Conn) -> None:
    for sid in ("x" * 256, "é" * 128):
        assert shard.put(sid, "k", b"v").applied
        assert shard.get(sid, "k").record.value == b"v"


def test_empty_and_oversize_key(shard: Conn, sentinel: Sentinel) -> None:
    sid = uid()
    err = expect_error(INVALID, shard.put, sid, "", b"v")
    assert "key" in err.message.lower(), err.message
    err = expect_error(INVALID, shard.put, sid, "k" * 1025, b"v")
    assert "key" in err.message.lower() and "1024" in err.message, err.message
    err = expect_error(INVALID, shard.get, sid, "k" * 1025)
    assert "1024" in err.message
    expect_error(
        INVALID, shard.state.Delete, state_pb2.DeleteRequest(session_id=sid, key=""), timeout=T
    )
    expect_error(
        INVALID,
        shard.state.Increment,
        state_pb2.IncrementRequest(session_id=sid, key=""),
        timeout=T,
    )
    assert shard.put(sid, "k" * 1024, b"v").applied
    assert [
        r.key for r in shard.state.Scan(state_pb2.ScanRequest(session_id=sid), timeout=T).records
    ] == ["k" * 1024]
    sentinel.check()


def test_empty_and_oversize_stream_name(shard: Conn, sentinel: Sentinel) -> None:
    sid = uid()
    err = expect_error(INVALID, shard.append, sid, "", b"e")
    assert "stream" in err.message.lower(), err.message
    err = expect_error(INVALID, shard.append, sid, "s" * 257, b"e")
    assert "stream" in err.message.lower() and "256" in err.message, err.message
    assert list(shard.append(sid, "s" * 256, b"e").seqs) == [1]
    sentinel.check()


# ---- sizes and counts ----


def test_oversize_value_is_resource_exhausted_and_names_the_limit(
    shard: Conn, sentinel: Sentinel
) -> None:
    sid = uid()
    shard.put(sid, "k", b"small")
    err = expect_error(EXHAUSTED, shard.put, sid, "k", b"x" * (MiB + 1))
    assert isinstance(err, errors.LimitExceededError)
    assert err.limit == "max_value_bytes"
    assert (err.detail.value, err.detail.actual) == (MiB, MiB + 1)
    assert "max_value_bytes" in err.message and str(MiB) in err.message, err.message
    assert shard.get(sid, "k").record.value == b"small"
    err = expect_error(EXHAUSTED, shard.append, sid, "s", b"ok", b"x" * (MiB + 1))
    assert err.limit == "max_value_bytes"  # type: ignore[attr-defined]
    expect_error(grpc.StatusCode.NOT_FOUND, shard.read_log, sid, "s")  # not even the first entry
    assert shard.put(sid, "k", b"x" * MiB).applied  # exactly the limit is fine
    assert len(shard.get(sid, "k").record.value) == MiB
    sentinel.check()


def test_oversize_request_is_refused(shard: Conn, sentinel: Sentinel) -> None:
    sid = uid()
    ops = [
        state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key=f"k{i}", value=b"x" * MiB))
        for i in range(5)
    ]
    expect_error(EXHAUSTED, shard.state.Batch, state_pb2.BatchRequest(ops=ops), timeout=T)
    assert not shard.get(sid, "k0").found
    sentinel.check()


def test_too_many_ops_in_a_batch(shard: Conn, sentinel: Sentinel) -> None:
    sid = uid()

    def ops(n: int) -> list[state_pb2.BatchOp]:
        return [
            state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key=f"k{i}", value=b"v"))
            for i in range(n)
        ]

    err = expect_error(
        EXHAUSTED, shard.state.Batch, state_pb2.BatchRequest(ops=ops(1001)), timeout=T
    )
    assert isinstance(err, errors.LimitExceededError) and err.limit == "max_batch_ops"
    assert "1000" in err.message and "1001" in err.message, err.message
    assert not shard.get(sid, "k0").found
    resp = shard.state.Batch(state_pb2.BatchRequest(ops=ops(1000)), timeout=T)
    assert len(resp.results) == 1000 and all(r.code == 0 for r in resp.results)
    sentinel.check()


def test_too_many_entries_or_txn_ops(shard: Conn, sentinel: Sentinel) -> None:
    sid = uid()
    err = expect_error(EXHAUSTED, shard.append, sid, "s", *[b"e"] * 1001)
    assert err.limit == "max_batch_ops"  # type: ignore[attr-defined]
    ops = [state_pb2.TxnOp(put=state_pb2.PutRequest(key=f"k{i}", value=b"v")) for i in range(1001)]
    err = expect_error(
        EXHAUSTED, shard.state.Txn, state_pb2.TxnRequest(session_id=sid, success=ops), timeout=T
    )
    assert err.limit == "max_batch_ops"  # type: ignore[attr-defined]
    assert not shard.get(sid, "k0").found
    expect_error(grpc.StatusCode.NOT_FOUND, shard.read_log, sid, "s")
    sentinel.check()


def test_bad_ops_inside_a_batch_fail_alone(shard: Conn, sentinel: Sentinel) -> None:
    sid = uid()
    ops = [
        state_pb2.BatchOp(put=state_pb2.PutRequest(session_id="x" * 300, key="k", value=b"v")),
        state_pb2.BatchOp(
            put=state_pb2.PutRequest(session_id=sid, key="k", value=b"x" * (MiB + 1))
        ),
        state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key="ok", value=b"v")),
        state_pb2.BatchOp(),  # no op at all
    ]
    r = shard.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=T).results
    assert r[0].code == INVALID.value[0] and "256" in r[0].message
    assert r[1].code == EXHAUSTED.value[0] and r[1].limit_exceeded.limit == "max_value_bytes"
    assert r[2].code == 0 and r[2].put.applied
    assert r[3].code == INVALID.value[0]
    assert not shard.get(sid, "k").found
    sentinel.check()


def test_keys_per_session_and_session_bytes_limits(tight: Conn) -> None:
    sid = uid()
    for i in range(5):
        tight.put(sid, f"k{i}", b"v")
    err = expect_error(EXHAUSTED, tight.put, sid, "k5", b"v")
    assert err.limit == "max_keys_per_session" and "5" in err.message  # type: ignore[attr-defined]
    assert not tight.get(sid, "k5").found
    assert tight.put(sid, "k0", b"overwrite is fine").applied
    r = tight.state.Batch(
        state_pb2.BatchRequest(
            ops=[state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key="k6", value=b"v"))]
        ),
        timeout=T,
    ).results[0]
    assert r.code == EXHAUSTED.value[0] and r.limit_exceeded.limit == "max_keys_per_session"
    assert tight.get_session(sid).session.key_count == 5

    big = uid()
    assert tight.put(big, "a", b"x" * 3000).applied
    err = expect_error(EXHAUSTED, tight.put, big, "b", b"x" * 2000)
    assert err.limit == "max_session_bytes" and "4096" in err.message  # type: ignore[attr-defined]
    err = expect_error(EXHAUSTED, tight.append, big, "s", b"x" * 2000)
    assert err.limit == "max_session_bytes"  # type: ignore[attr-defined]
    assert not tight.get(big, "b").found
    expect_error(grpc.StatusCode.NOT_FOUND, tight.read_log, big, "s")
    assert tight.put(big, "a", b"x" * 100).applied  # shrinking is always allowed
    assert tight.put(big, "b", b"x" * 2000).applied  # and frees room


# ---- unknown stream, compacted history ----


def test_unknown_stream_is_not_found_naming_it(shard: Conn, sentinel: Sentinel) -> None:
    sid = sentinel.sid
    err = expect_error(grpc.StatusCode.NOT_FOUND, shard.read_log, sid, "no-such-stream")
    assert "no-such-stream" in err.message or "stream" in err.message.lower(), err.message
    sentinel.check()


def test_watch_from_a_compacted_revision_is_out_of_range(tight: Conn) -> None:
    sid = uid()
    first = tight.put(sid, "k", b"0").version
    last = first
    for i in range(1, 30):
        last = tight.put(sid, "k", str(i).encode()).version

    def watch_error() -> errors.ShardstateError | None:
        call = tight.state.Watch(
            state_pb2.WatchRequest(session_id=sid, from_revision=first), timeout=5
        )
        try:
            next(iter(call))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.OUT_OF_RANGE:  # type: ignore[attr-defined]
                return errors.from_rpc_error(e)
            raise
        finally:
            call.cancel()
        return None  # still retained: retention may be enforced in the background

    deadline = time.monotonic() + 20
    err = watch_error()
    while err is None and time.monotonic() < deadline:
        time.sleep(0.25)
        err = watch_error()
    assert err is not None, "history of 30 writes was never trimmed to --changelog-retention 5"
    assert isinstance(err, errors.HistoryCompactedError)
    assert first < err.oldest_revision <= last
    assert str(err.oldest_revision) in err.message or "compact" in err.message.lower(), err.message
    # resuming from what is retained works
    call = tight.state.Watch(state_pb2.WatchRequest(session_id=sid, from_revision=last), timeout=10)
    try:
        for resp in call:
            if resp.events:
                ev = resp.events[0]
                assert (ev.type, ev.revision, ev.record.value) == (types_pb2.PUT, last, b"29")
                break
    finally:
        call.cancel()


# ---- malformed bytes on the wire ----

GARBAGE = [
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a tag varint that never ends
    b"\x12\x40ab",  # field 2 claims 64 bytes, has 2
]
# session_id (field 2) that is not UTF-8; for Batch, inside ops[0].put
BAD_UTF8 = b"\x12\x02\xff\xfe"


@pytest.mark.parametrize("method", ["Put", "Get", "Batch", "Append", "Txn"])
def test_malformed_protobuf_is_rejected_and_server_keeps_serving(
    shard: Conn, sentinel: Sentinel, method: str
) -> None:
    raw = shard.channel.unary_unary(f"/shardstate.v1.State/{method}")
    for garbage in [*GARBAGE, *([] if method == "Batch" else [BAD_UTF8])]:
        with pytest.raises(grpc.RpcError) as info:
            raw(garbage, timeout=T)
        # grpc-python's own deserializer failure would say INTERNAL; bad input is INVALID_ARGUMENT
        assert info.value.code() == INVALID, (garbage, info.value.code(), info.value.details())  # type: ignore[attr-defined]
    if method != "Batch":
        with pytest.raises(grpc.RpcError) as info:
            raw(BAD_UTF8, timeout=T)
        assert "session_id is not valid UTF-8" in info.value.details()  # type: ignore[attr-defined]
    sentinel.check()


def _op_bytes(op: state_pb2.BatchOp) -> bytes:
    return op.SerializeToString()


def _batch_bytes(ops: list[bytes]) -> bytes:
    return b"".join(b"\x0a" + bytes([len(o)]) + o for o in ops)  # every op < 128 bytes


def _bad_sid_put() -> bytes:
    """A BatchOp{put{session_id=<not UTF-8>, key="k"}}: valid framing, invalid string."""
    put = b"\x12\x02\xff\xfe\x1a\x01k"
    return b"\x12" + bytes([len(put)]) + put


def test_a_bad_op_in_a_batch_fails_alone_and_the_others_run(shard: Conn, sentinel: Sentinel) -> None:
    sid = uid("batch-neighbour")
    good = [_op_bytes(state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key=f"k{i}", value=b"v")))
            for i in range(3)]
    truncated = good[0][:-3]
    ops = [good[0], _bad_sid_put(), good[1], truncated, good[2]]
    raw = shard.channel.unary_unary("/shardstate.v1.State/Batch")
    resp = state_pb2.BatchResponse.FromString(raw(_batch_bytes(ops), timeout=T))
    codes = [r.code for r in resp.results]
    assert codes == [0, INVALID.value[0], 0, INVALID.value[0], 0], resp
    assert "ops[1].put: session_id is not valid UTF-8" in resp.results[1].message
    assert "ops[3]" in resp.results[3].message
    for i in range(3):
        assert shard.get(sid, f"k{i}").record.value == b"v"
    sentinel.check()


def test_pipeline_bad_ops_and_bad_messages_fail_alone_and_the_stream_goes_on(
    shard: Conn, sentinel: Sentinel
) -> None:
    sid = uid("pipe-neighbour")
    good = _op_bytes(state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key="k", value=b"v")))
    mixed = _batch_bytes([good, _bad_sid_put()])
    msgs = [
        b"\x08\x01\x12" + bytes([len(mixed)]) + mixed,  # id 1: one good op, one bad op
        b"\x08\x02\x12\x40ab",  # id 2: its batch claims 64 bytes, has 2
        state_pb2.PipelineRequest(id=3, batch=state_pb2.BatchRequest(
            ops=[state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=sid, key="k"))])).SerializeToString(),
    ]
    pipe = shard.channel.stream_stream("/shardstate.v1.State/Pipeline")
    got = {r.id: r for r in map(state_pb2.PipelineResponse.FromString, pipe(iter(msgs), timeout=T))}
    assert sorted(got) == [1, 2, 3]
    assert got[1].code == 0 and [r.code for r in got[1].batch.results] == [0, INVALID.value[0]]
    assert got[2].code == INVALID.value[0] and not got[2].batch.results
    assert got[3].code == 0 and got[3].batch.results[0].get.record.value == b"v"
    sentinel.check()


def test_malformed_protobuf_on_streams(shard: Conn, sentinel: Sentinel) -> None:
    pipe = shard.channel.stream_stream("/shardstate.v1.State/Pipeline")
    # A message that cannot be taken apart fails under id 0; the stream stays usable.
    ok = state_pb2.PipelineRequest(id=9, batch=state_pb2.BatchRequest()).SerializeToString()
    got = [state_pb2.PipelineResponse.FromString(r) for r in pipe(iter([GARBAGE[0], ok]), timeout=T)]
    assert [(r.id, r.code) for r in got] == [(0, INVALID.value[0]), (9, 0)], got
    watch = shard.channel.unary_stream("/shardstate.v1.State/Watch")
    with pytest.raises(grpc.RpcError) as info:
        list(watch(GARBAGE[1], timeout=T))
    assert info.value.code() == INVALID, info.value.details()  # type: ignore[attr-defined]
    sentinel.check()


# ---- namespace, consistency, page tokens ----


def test_namespace_has_a_length_limit(shard: Conn, sentinel: Sentinel) -> None:
    assert shard.put(uid(), "k", b"v", ns="n" * 256).applied
    for ns in ["n" * 257, "x" * 3_000_000]:
        err = expect_error(INVALID, shard.put, uid(), "k", b"v", ns=ns)
        assert "namespace" in err.message and "max_namespace_bytes=256" in err.message, err.message
        err = expect_error(INVALID, shard.state.ListSessions, state_pb2.ListSessionsRequest(namespace=ns), timeout=T)
        assert "max_namespace_bytes" in err.message
    assert not [s for s in shard.state.ListSessions(state_pb2.ListSessionsRequest(), timeout=T).sessions
                if len(s.namespace) > 256]
    sentinel.check()


@pytest.mark.parametrize("method", ["Get", "Scan", "ReadLog", "GetSession"])
def test_unknown_consistency_is_invalid_naming_the_field(shard: Conn, sentinel: Sentinel, method: str) -> None:
    sid = uid()
    req: Any = {
        "Get": state_pb2.GetRequest(session_id=sid, key="k", consistency=7),  # type: ignore[arg-type]
        "Scan": state_pb2.ScanRequest(session_id=sid, consistency=7),  # type: ignore[arg-type]
        "ReadLog": state_pb2.ReadLogRequest(session_id=sid, stream="s", consistency=7),  # type: ignore[arg-type]
        "GetSession": state_pb2.GetSessionRequest(session_id=sid, consistency=7),  # type: ignore[arg-type]
    }[method]
    err = expect_error(INVALID, getattr(shard.state, method), req, timeout=T)
    assert "consistency 7" in err.message and "EVENTUAL" in err.message, err.message
    sentinel.check()


def test_list_sessions_page_tokens_are_checked_and_page_through(shard: Conn, sentinel: Sentinel) -> None:
    for bad in ["garbage!", "eyJ2IjoyfQ", "x" * 40]:
        err = expect_error(INVALID, shard.state.ListSessions,
                           state_pb2.ListSessionsRequest(page_token=bad), timeout=T)
        assert "page_token" in err.message
    ns = uid("pages")
    sids = sorted(uid() for _ in range(7))
    for s in sids:
        shard.put(s, "k", b"v", ns=ns)
    seen, token = [], ""
    while True:
        resp = shard.state.ListSessions(state_pb2.ListSessionsRequest(namespace=ns, limit=3, page_token=token), timeout=T)
        seen += [s.session_id for s in resp.sessions]
        token = resp.next_page_token
        if not token:
            break
    assert seen == sids
    sentinel.check()


def test_unknown_compare_result_is_invalid_whether_or_not_the_key_exists(shard: Conn, sentinel: Sentinel) -> None:
    sid = uid()
    shard.put(sid, "present", b"v")
    for key in ["present", "absent"]:
        req = state_pb2.TxnRequest(
            session_id=sid, compares=[state_pb2.Compare(result=9, key=key, version=1)],  # type: ignore[arg-type]
            success=[state_pb2.TxnOp(put=state_pb2.PutRequest(key="w", value=b"x"))])
        err = expect_error(INVALID, shard.state.Txn, req, timeout=T)
        assert "compares[0].result 9" in err.message, err.message
    assert not shard.get(sid, "w").found
    sentinel.check()


@pytest.mark.parametrize("bad", [
    state_pb2.Compare(key="k", exists=True, result=state_pb2.Compare.GREATER),  # exists takes EQUAL/NOT_EQUAL
    state_pb2.Compare(key="k"),  # no target
    state_pb2.Compare(key="", version=0),  # empty key
], ids=["exists-greater", "no-target", "empty-key"])
def test_a_bad_compare_after_a_false_one_is_invalid_and_runs_no_failure_op(
    shard: Conn, sentinel: Sentinel, bad: state_pb2.Compare
) -> None:
    sid = uid()
    v = shard.put(sid, "k", b"v").version
    false = state_pb2.Compare(key="k", version=v + 1)
    for compares in ([bad, false], [false, bad]):
        req = state_pb2.TxnRequest(
            session_id=sid, compares=compares,
            failure=[state_pb2.TxnOp(put=state_pb2.PutRequest(key="ran", value=b"failure op"))])
        expect_error(INVALID, shard.state.Txn, req, timeout=T)
    assert not shard.get(sid, "ran").found
    sentinel.check()


@pytest.mark.parametrize("bad_op, code, names", [
    (state_pb2.TxnOp(put=state_pb2.PutRequest(key="", value=b"x")), INVALID, "max_key_bytes"),
    (state_pb2.TxnOp(put=state_pb2.PutRequest(key="big", value=b"x" * (MiB + 1))), EXHAUSTED, "max_value_bytes"),
    (state_pb2.TxnOp(delete=state_pb2.DeleteRequest(key="k" * 1025)), INVALID, "max_key_bytes"),
    (state_pb2.TxnOp(append=state_pb2.AppendRequest(stream="s")), INVALID, "entries is empty"),
    (state_pb2.TxnOp(increment=state_pb2.IncrementRequest(key="n", ttl_ms=2**63)), INVALID, "ttl_ms"),
], ids=["empty-key", "oversize-value", "oversize-key", "empty-append", "ttl"])
def test_a_bad_op_in_either_branch_of_a_txn_is_refused_and_nothing_runs(
    shard: Conn, sentinel: Sentinel, bad_op: state_pb2.TxnOp, code: grpc.StatusCode, names: str
) -> None:
    sid = uid()
    v = shard.put(sid, "k", b"v").version
    ran = state_pb2.TxnOp(put=state_pb2.PutRequest(key="ran", value=b"x"))
    for holds in (True, False):
        # the bad op sits in the branch that does not run: the request is still bad
        compares = [state_pb2.Compare(key="k", version=v if holds else v + 1)]
        success, failure = ([ran], [bad_op]) if holds else ([bad_op], [ran])
        req = state_pb2.TxnRequest(session_id=sid, compares=compares, success=success, failure=failure)
        err = expect_error(code, shard.state.Txn, req, timeout=T)
        assert names in err.message, err.message
    assert not shard.get(sid, "ran").found
    assert shard.get(sid, "k").record.version == v
    sentinel.check()


def test_a_txn_with_a_bad_session_ttl_is_invalid_even_when_it_writes_nothing(shard: Conn, sentinel: Sentinel) -> None:
    sid = uid()
    v = shard.put(sid, "k", b"v").version
    req = state_pb2.TxnRequest(session_id=sid, compares=[state_pb2.Compare(key="k", version=v + 1)],
                               session_ttl_ms=2**63)
    err = expect_error(INVALID, shard.state.Txn, req, timeout=T)
    assert "session_ttl_ms" in err.message, err.message
    sentinel.check()


def test_a_put_with_a_bad_session_ttl_is_invalid_whether_or_not_its_cas_matches(shard: Conn, sentinel: Sentinel) -> None:
    sid = uid()
    v = shard.put(sid, "k", b"v").version
    for expected in (v, v + 1, 0):
        err = expect_error(INVALID, shard.put, sid, "k", b"w", expected_version=expected, session_ttl_ms=2**63)
        assert "session_ttl_ms" in err.message, err.message
    assert shard.get(sid, "k").record.version == v
    sentinel.check()
