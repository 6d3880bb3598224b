"""Every State RPC of one real shard process, read back through the wire contract (docs/design.md §3).

Keys, counters, scans, logs, sessions, Batch and Pipeline; one shard shared by the module.
"""

from __future__ import annotations

from typing import Any

import grpc

from shardstate.common.pagetoken import decode_token
from tests.stubs import Conn, expect_error, shard_fixture, state_pb2, uid

shard = shard_fixture("s1")
T = 30.0


# ---- keys ----


def test_put_get_reads_back_value_and_versions(shard: Conn) -> None:
    sid = uid()
    p1 = shard.put(sid, "k", b"v1")
    assert p1.applied and p1.version > 0
    assert p1.header.shard_id == "s1"
    assert p1.header.revision >= p1.version
    g = shard.get(sid, "k")
    assert g.found
    assert (g.record.key, g.record.value, g.record.version) == ("k", b"v1", p1.version)
    assert g.record.create_version == p1.version
    assert g.record.updated_at_ms > 0 and g.record.expires_at_ms == 0
    p2 = shard.put(sid, "k", b"v2")
    assert p2.applied and p2.version > p1.version
    g = shard.get(sid, "k")
    assert (g.record.value, g.record.version, g.record.create_version) == (
        b"v2",
        p2.version,
        p1.version,
    )


def test_get_absent_key_is_found_false_not_an_error(shard: Conn) -> None:
    g = shard.get(uid(), "nothing")
    assert not g.found
    assert g.record.version == 0
    assert g.header.shard_id == "s1"


def test_empty_namespace_is_default(shard: Conn) -> None:
    sid = uid()
    p = shard.put(sid, "k", b"x", ns="")
    g = shard.get(sid, "k", ns="default")
    assert g.found and g.record.version == p.version
    assert not shard.get(sid, "k", ns="other").found


def test_namespaces_and_sessions_are_separate(shard: Conn) -> None:
    sid = uid()
    shard.put(sid, "k", b"a", ns="n1")
    shard.put(sid, "k", b"b", ns="n2")
    shard.put(sid + "x", "k", b"c", ns="n1")
    assert shard.get(sid, "k", ns="n1").record.value == b"a"
    assert shard.get(sid, "k", ns="n2").record.value == b"b"
    assert shard.get(sid + "x", "k", ns="n1").record.value == b"c"


def test_binary_values_and_nul_in_ids_round_trip(shard: Conn) -> None:
    sid = uid() + "\x00tail"
    value = bytes(range(256)) * 4
    p = shard.put(sid, "a\x00b", value)
    assert shard.get(sid, "a\x00b").record.value == value
    assert not shard.get(sid, "a").found
    assert shard.get(sid, "a\x00b").record.version == p.version


def test_delete_existing_and_absent(shard: Conn) -> None:
    sid = uid()
    p = shard.put(sid, "k", b"v")
    d = shard.state.Delete(state_pb2.DeleteRequest(session_id=sid, key="k"), timeout=T)
    assert d.applied and d.existed and d.revision > p.version
    assert not shard.get(sid, "k").found
    d2 = shard.state.Delete(state_pb2.DeleteRequest(session_id=sid, key="k"), timeout=T)
    assert d2.applied and not d2.existed


def test_delete_cas_mismatch_keeps_the_key(shard: Conn) -> None:
    sid = uid()
    p = shard.put(sid, "k", b"v")
    d = shard.state.Delete(
        state_pb2.DeleteRequest(session_id=sid, key="k", expected_version=p.version + 1), timeout=T
    )
    assert not d.applied
    assert d.current.version == p.version and d.current.value == b"v"
    assert shard.get(sid, "k").record.version == p.version
    d = shard.state.Delete(
        state_pb2.DeleteRequest(session_id=sid, key="k", expected_version=p.version), timeout=T
    )
    assert d.applied and d.existed
    assert not shard.get(sid, "k").found


def test_key_ttl_sets_expiry(shard: Conn) -> None:
    sid = uid()
    shard.put(sid, "k", b"v", ttl_ms=600_000)
    r = shard.get(sid, "k").record
    assert r.expires_at_ms > r.updated_at_ms


# ---- counters ----


def test_increment_creates_adds_and_stores_ascii(shard: Conn) -> None:
    sid = uid()

    def inc(delta: int) -> state_pb2.IncrementResponse:
        return shard.state.Increment(
            state_pb2.IncrementRequest(session_id=sid, key="c", delta=delta), timeout=T
        )

    a = inc(5)
    assert a.value == 5 and a.version > 0
    b = inc(-7)
    assert b.value == -2 and b.version > a.version
    g = shard.get(sid, "c")
    assert g.record.value == b"-2" and g.record.version == b.version
    shard.put(sid, "c", b"40")
    assert inc(2).value == 42


def test_increment_non_integer_is_invalid_argument_and_writes_nothing(shard: Conn) -> None:
    sid = uid()
    p = shard.put(sid, "c", b"not a number")
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        shard.state.Increment,
        state_pb2.IncrementRequest(session_id=sid, key="c", delta=1),
        timeout=T,
    )
    g = shard.get(sid, "c")
    assert (g.record.value, g.record.version) == (b"not a number", p.version)


# ---- scan ----


def test_scan_prefix_paging_start_after_keys_only(shard: Conn) -> None:
    sid = uid()
    want = [f"a/{i:03d}" for i in range(25)]
    versions = {k: shard.put(sid, k, k.encode()).version for k in want}
    for k in ("b/1", "a", "0"):
        shard.put(sid, k, b"other")

    got: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = shard.state.Scan(
            state_pb2.ScanRequest(session_id=sid, prefix="a/", limit=10, page_token=token),
            timeout=T,
        )
        pages += 1
        for r in resp.records:
            assert r.value == r.key.encode() and r.version == versions[r.key]
        got += [r.key for r in resp.records]
        token = resp.next_page_token
        if not token:
            break
        assert token == resp.records[-1].key  # contract: the page token is the last key returned
        assert pages < 10
    assert got == want
    assert pages in (3, 4)  # 10 + 10 + 5, possibly an empty last page

    resp = shard.state.Scan(
        state_pb2.ScanRequest(session_id=sid, prefix="a/", start_after="a/019"), timeout=T
    )
    assert [r.key for r in resp.records] == want[20:]
    assert resp.next_page_token == ""

    resp = shard.state.Scan(state_pb2.ScanRequest(session_id=sid, keys_only=True), timeout=T)
    assert [r.key for r in resp.records] == sorted([*want, "b/1", "a", "0"])
    assert all(r.value == b"" for r in resp.records)
    assert all(r.version > 0 for r in resp.records)


def test_scan_default_limit_is_100(shard: Conn) -> None:
    sid = uid()
    ops = [
        state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key=f"k{i:04d}", value=b"v"))
        for i in range(150)
    ]
    resp = shard.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=T)
    assert all(r.code == 0 for r in resp.results)
    page = shard.state.Scan(state_pb2.ScanRequest(session_id=sid), timeout=T)
    assert len(page.records) == 100 and page.next_page_token == "k0099"
    rest = shard.state.Scan(
        state_pb2.ScanRequest(session_id=sid, page_token=page.next_page_token), timeout=T
    )
    assert [r.key for r in rest.records] == [f"k{i:04d}" for i in range(100, 150)]
    assert rest.next_page_token == ""


def test_scan_of_unknown_session_is_empty(shard: Conn) -> None:
    resp = shard.state.Scan(state_pb2.ScanRequest(session_id=uid()), timeout=T)
    assert list(resp.records) == [] and resp.next_page_token == ""


# ---- logs ----


def test_append_gives_consecutive_seqs_from_1(shard: Conn) -> None:
    sid = uid()
    a = shard.append(sid, "messages", b"m1", b"m2", b"m3")
    assert list(a.seqs) == [1, 2, 3] and a.revision > 0
    b = shard.append(sid, "messages", b"m4")
    assert list(b.seqs) == [4] and b.revision > a.revision
    c = shard.append(sid, "events", b"e1")
    assert list(c.seqs) == [1]  # streams count separately
    log = shard.read_log(sid, "messages")
    assert [(e.seq, e.data) for e in log.entries] == [
        (1, b"m1"),
        (2, b"m2"),
        (3, b"m3"),
        (4, b"m4"),
    ]
    assert [e.revision for e in log.entries] == [a.revision] * 3 + [b.revision]
    assert all(e.appended_at_ms > 0 for e in log.entries)
    assert log.stream.name == "messages"
    assert (log.stream.first_seq, log.stream.last_seq, log.stream.count, log.stream.next_seq) == (
        1,
        4,
        4,
        5,
    )
    assert not log.more


def test_read_log_range_after_last_limit(shard: Conn) -> None:
    sid = uid()
    shard.append(sid, "s", *[f"e{i}".encode() for i in range(1, 11)])

    def seqs(**kw: Any) -> list[int]:
        return [e.seq for e in shard.read_log(sid, "s", **kw).entries]

    assert seqs() == list(range(1, 11))
    assert seqs(from_seq=3, to_seq=5) == [3, 4, 5]
    assert seqs(from_seq=8) == [8, 9, 10]
    assert seqs(to_seq=2) == [1, 2]
    assert seqs(after_seq=7) == [8, 9, 10]
    assert seqs(after_seq=7, from_seq=2) == [8, 9, 10]  # after_seq overrides from_seq
    assert seqs(after_seq=10) == []
    assert seqs(last=3) == [8, 9, 10]  # newest N, oldest first
    assert seqs(last=3, to_seq=5) == [3, 4, 5]
    assert seqs(last=50) == list(range(1, 11))
    page = shard.read_log(sid, "s", limit=4)
    assert [e.seq for e in page.entries] == [1, 2, 3, 4] and page.more
    page = shard.read_log(sid, "s", after_seq=8, limit=4)
    assert [e.seq for e in page.entries] == [9, 10] and not page.more
    page = shard.read_log(sid, "s", from_seq=2, to_seq=6, limit=5)
    assert [e.seq for e in page.entries] == [2, 3, 4, 5, 6] and not page.more
    assert [e.data for e in shard.read_log(sid, "s", from_seq=10).entries] == [b"e10"]


def test_trim_log_before_and_keep_last(shard: Conn) -> None:
    sid = uid()
    shard.append(sid, "s", *[b"x"] * 10)
    t = shard.state.TrimLog(
        state_pb2.TrimLogRequest(session_id=sid, stream="s", before_seq=4), timeout=T
    )
    assert t.removed == 3
    assert (t.stream.first_seq, t.stream.last_seq, t.stream.count) == (4, 10, 7)
    assert [e.seq for e in shard.read_log(sid, "s").entries] == list(range(4, 11))
    t = shard.state.TrimLog(
        state_pb2.TrimLogRequest(session_id=sid, stream="s", keep_last=2), timeout=T
    )
    assert t.removed == 5
    assert (t.stream.first_seq, t.stream.last_seq, t.stream.count) == (9, 10, 2)
    assert [e.seq for e in shard.read_log(sid, "s").entries] == [9, 10]
    # trimming never gives a seq back
    assert list(shard.append(sid, "s", b"y").seqs) == [11]


def test_pop_last_is_atomic_and_never_reuses_seqs(shard: Conn) -> None:
    sid = uid()
    shard.append(sid, "s", b"a", b"b", b"c")

    def pop() -> state_pb2.PopLastResponse:
        return shard.state.PopLast(state_pb2.PopLastRequest(session_id=sid, stream="s"), timeout=T)

    p = pop()
    assert p.found and (p.entry.seq, p.entry.data) == (3, b"c")
    assert [e.seq for e in shard.read_log(sid, "s").entries] == [1, 2]
    assert list(shard.append(sid, "s", b"d").seqs) == [4]  # PopLast does not give seq 3 back
    assert (pop().entry.seq, pop().entry.seq, pop().entry.seq) == (4, 2, 1)
    empty = pop()
    assert not empty.found
    log = shard.read_log(sid, "s")
    assert list(log.entries) == [] and log.stream.count == 0
    assert list(shard.append(sid, "s", b"e").seqs) == [5]


def test_unknown_stream_is_not_found(shard: Conn) -> None:
    sid = uid()
    shard.put(sid, "k", b"v")  # the session exists, the stream does not
    expect_error(grpc.StatusCode.NOT_FOUND, shard.read_log, sid, "nope")
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        shard.state.TrimLog,
        state_pb2.TrimLogRequest(session_id=sid, stream="nope", before_seq=2),
        timeout=T,
    )
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        shard.state.PopLast,
        state_pb2.PopLastRequest(session_id=sid, stream="nope"),
        timeout=T,
    )
    expect_error(grpc.StatusCode.NOT_FOUND, shard.read_log, uid(), "nope")  # nor the session


# ---- sessions ----


def test_get_session_counts_keys_streams_bytes(shard: Conn) -> None:
    sid = uid()
    p1 = shard.put(sid, "a", b"12345")
    shard.put(sid, "b", b"x" * 100)
    a = shard.append(sid, "log", b"e1", b"e2")
    info = shard.get_session(sid).session
    assert info.session_id == sid and info.namespace in ("", "default")
    assert info.key_count == 2
    assert info.bytes >= 5 + 100 + 4 + 2  # keys + values + log entries
    assert info.created_at_ms > 0 and info.updated_at_ms >= info.created_at_ms
    assert info.expires_at_ms == 0
    assert info.max_version >= a.revision > p1.version
    streams = {s.name: s for s in info.streams}
    assert set(streams) == {"log"}
    assert (streams["log"].first_seq, streams["log"].last_seq, streams["log"].count) == (1, 2, 2)


def test_get_session_unknown_is_not_found(shard: Conn) -> None:
    expect_error(grpc.StatusCode.NOT_FOUND, shard.get_session, uid())


def test_touch_sets_and_removes_session_ttl(shard: Conn) -> None:
    sid = uid()
    shard.put(sid, "k", b"v")
    t = shard.state.Touch(state_pb2.TouchRequest(session_id=sid, ttl_ms=600_000), timeout=T)
    assert t.expires_at_ms > 0
    assert shard.get_session(sid).session.expires_at_ms == t.expires_at_ms
    t2 = shard.state.Touch(state_pb2.TouchRequest(session_id=sid, ttl_ms=900_000), timeout=T)
    assert t2.expires_at_ms >= t.expires_at_ms + 299_000
    t3 = shard.state.Touch(state_pb2.TouchRequest(session_id=sid, ttl_ms=0), timeout=T)
    assert t3.expires_at_ms == 0
    assert shard.get_session(sid).session.expires_at_ms == 0


def test_touch_unknown_session_is_not_found(shard: Conn) -> None:
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        shard.state.Touch,
        state_pb2.TouchRequest(session_id=uid(), ttl_ms=1000),
        timeout=T,
    )


def test_put_with_session_ttl_sets_session_expiry(shard: Conn) -> None:
    sid = uid()
    shard.put(sid, "k", b"v", session_ttl_ms=600_000)
    info = shard.get_session(sid).session
    assert info.expires_at_ms > info.updated_at_ms


def test_delete_session_cascades(shard: Conn) -> None:
    sid = uid()
    for k in ("a", "b", "c"):
        shard.put(sid, k, b"v")
    shard.append(sid, "s1", b"1", b"2")
    shard.append(sid, "s2", b"3")
    d = shard.state.DeleteSession(state_pb2.DeleteSessionRequest(session_id=sid), timeout=T)
    assert d.existed and d.keys_deleted == 3 and d.log_entries_deleted == 3
    assert not shard.get(sid, "a").found
    assert list(shard.state.Scan(state_pb2.ScanRequest(session_id=sid), timeout=T).records) == []
    expect_error(grpc.StatusCode.NOT_FOUND, shard.read_log, sid, "s1")
    expect_error(grpc.StatusCode.NOT_FOUND, shard.get_session, sid)
    again = shard.state.DeleteSession(state_pb2.DeleteSessionRequest(session_id=sid), timeout=T)
    assert not again.existed and again.keys_deleted == 0
    # a recreated session starts empty, its log from seq 1
    shard.put(sid, "z", b"new")
    assert [
        r.key for r in shard.state.Scan(state_pb2.ScanRequest(session_id=sid), timeout=T).records
    ] == ["z"]
    assert list(shard.append(sid, "s1", b"again").seqs) == [1]


def test_list_sessions_sorted_paged_prefixed(shard: Conn) -> None:
    ns = uid("ns")
    sids = [f"sess-{i:02d}" for i in range(7)] + ["other-1"]
    for sid in reversed(sids):
        shard.put(sid, "k", b"v", ns=ns)
    got: list[str] = []
    token = ""
    for _ in range(10):
        resp = shard.state.ListSessions(
            state_pb2.ListSessionsRequest(namespace=ns, limit=3, page_token=token), timeout=T
        )
        assert len(resp.sessions) <= 3
        got += [s.session_id for s in resp.sessions]
        assert all(s.key_count == 1 for s in resp.sessions)
        token = resp.next_page_token
        if not token:
            break
        # one token format at shards and routers (server/storage/validation.py)
        assert decode_token(token).after == resp.sessions[-1].session_id
    assert got == sorted(sids)
    resp = shard.state.ListSessions(
        state_pb2.ListSessionsRequest(namespace=ns, prefix="sess-"), timeout=T
    )
    assert [s.session_id for s in resp.sessions] == sorted(sids[:7])
    assert resp.next_page_token == ""
    empty = shard.state.ListSessions(state_pb2.ListSessionsRequest(namespace=uid("ns")), timeout=T)
    assert list(empty.sessions) == []


# ---- Batch and Pipeline ----


def test_batch_runs_in_order_with_per_op_errors(shard: Conn) -> None:
    sid, sid2 = uid(), uid()
    shard.put(sid, "text", b"abc")
    ops = [
        state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key="a", value=b"1")),
        state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=sid, key="a")),
        state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key="", value=b"bad")),
        state_pb2.BatchOp(
            increment=state_pb2.IncrementRequest(session_id=sid, key="text", delta=1)
        ),
        state_pb2.BatchOp(increment=state_pb2.IncrementRequest(session_id=sid2, key="n", delta=3)),
        state_pb2.BatchOp(read_log=state_pb2.ReadLogRequest(session_id=sid, stream="missing")),
        state_pb2.BatchOp(
            append=state_pb2.AppendRequest(session_id=sid, stream="s", entries=[b"x"])
        ),
        state_pb2.BatchOp(read_log=state_pb2.ReadLogRequest(session_id=sid, stream="s")),
        state_pb2.BatchOp(delete=state_pb2.DeleteRequest(session_id=sid, key="a")),
        state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=sid, key="a")),
        state_pb2.BatchOp(
            put=state_pb2.PutRequest(session_id=sid, key="c", value=b"v", expected_version=12345)
        ),
        state_pb2.BatchOp(scan=state_pb2.ScanRequest(session_id=sid)),
        state_pb2.BatchOp(touch=state_pb2.TouchRequest(session_id=sid2, ttl_ms=600_000)),
        state_pb2.BatchOp(get_session=state_pb2.GetSessionRequest(session_id=sid2)),
        state_pb2.BatchOp(get_session=state_pb2.GetSessionRequest(session_id=uid())),
    ]
    resp = shard.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=T)
    r = list(resp.results)
    assert len(r) == len(ops)
    kinds = [x.WhichOneof("result") for x in r]
    codes = [x.code for x in r]
    INVALID, NOT_FOUND = (
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.NOT_FOUND.value[0],
    )
    assert codes == [0, 0, INVALID, INVALID, 0, NOT_FOUND, 0, 0, 0, 0, 0, 0, 0, 0, NOT_FOUND]
    assert kinds[:2] == ["put", "get"]
    assert "key" in r[2].message.lower()
    assert r[0].put.applied and r[1].get.found and r[1].get.record.version == r[0].put.version
    assert r[4].increment.value == 3
    assert list(r[6].append.seqs) == [1]
    assert [e.data for e in r[7].read_log.entries] == [b"x"]
    assert r[8].delete.existed and not r[9].get.found
    assert kinds[10] == "put" and not r[10].put.applied and not r[10].put.HasField("current")
    assert [x.key for x in r[11].scan.records] == ["text"]
    assert (
        r[12].touch.expires_at_ms > 0
        and r[13].get_session.session.expires_at_ms == r[12].touch.expires_at_ms
    )
    assert r[13].get_session.session.key_count == 1
    # the failing ops wrote nothing
    assert shard.get(sid, "text").record.value == b"abc"


def test_batch_ops_on_one_key_apply_in_request_order(shard: Conn) -> None:
    sid = uid()
    ops = [
        state_pb2.BatchOp(increment=state_pb2.IncrementRequest(session_id=sid, key="n", delta=1))
        for _ in range(50)
    ]
    resp = shard.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=T)
    assert [x.increment.value for x in resp.results] == list(range(1, 51))
    versions = [x.increment.version for x in resp.results]
    assert versions == sorted(versions) and len(set(versions)) == 50


def test_pipeline_answers_every_id_out_of_order(shard: Conn) -> None:
    sid = uid()
    ids = [7, 3, 11, 1, 42, 5]
    reqs = []
    for i in ids:
        ops = [
            state_pb2.BatchOp(
                put=state_pb2.PutRequest(session_id=sid, key=f"k{i}", value=str(i).encode())
            ),
            state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=sid, key=f"k{i}")),
        ]
        reqs.append(state_pb2.PipelineRequest(id=i, batch=state_pb2.BatchRequest(ops=ops)))
    too_big = [state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=sid, key="x"))] * 1001
    reqs.insert(2, state_pb2.PipelineRequest(id=99, batch=state_pb2.BatchRequest(ops=too_big)))
    resps = list(shard.state.Pipeline(iter(reqs), timeout=T))
    by_id = {r.id: r for r in resps}
    assert len(resps) == len(reqs) and set(by_id) == {*ids, 99}
    for i in ids:
        r = by_id[i]
        assert r.code == 0
        put, get = r.batch.results
        assert put.put.applied and get.get.record.value == str(i).encode()
        assert get.get.record.version == put.put.version
    failed = by_id[99]
    assert failed.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "max_batch_ops" in failed.message and len(failed.batch.results) == 0
    assert [
        r.key for r in shard.state.Scan(state_pb2.ScanRequest(session_id=sid), timeout=T).records
    ] == sorted(f"k{i}" for i in ids)


def test_scan_order_and_prefixes_with_nul_and_non_ascii_keys(shard: Conn) -> None:
    sid = uid()
    keys = ["a", "a\x00", "a\x00b", "a\x01", "ab", "b", "é", "\x00"]
    for k in keys:
        shard.put(sid, k, k.encode())

    def scan(**kw: str) -> list[str]:
        return [
            r.key
            for r in shard.state.Scan(
                state_pb2.ScanRequest(session_id=sid, **kw), timeout=T
            ).records
        ]

    assert scan() == sorted(keys, key=str.encode)  # byte order of UTF-8
    assert scan(prefix="a") == ["a", "a\x00", "a\x00b", "a\x01", "ab"]
    assert scan(prefix="a\x00") == ["a\x00", "a\x00b"]
    assert scan(prefix="\x00") == ["\x00"]
    assert scan(prefix="a", start_after="a\x00") == ["a\x00b", "a\x01", "ab"]


def test_scan_limit_is_capped_at_the_page_maximum(shard: Conn) -> None:
    sid = uid()
    ops = [
        state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key=f"k{i:04d}", value=b""))
        for i in range(1000)
    ]
    shard.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=T)
    shard.put(sid, "k1000", b"")
    page = shard.state.Scan(
        state_pb2.ScanRequest(session_id=sid, limit=5000, keys_only=True), timeout=T
    )
    assert len(page.records) == 1000 and page.next_page_token == "k0999"
    rest = shard.state.Scan(
        state_pb2.ScanRequest(session_id=sid, limit=5000, page_token=page.next_page_token),
        timeout=T,
    )
    assert [r.key for r in rest.records] == ["k1000"]


def test_scan_and_read_log_pages_fit_a_default_grpc_client(shard: Conn) -> None:
    """The test's plain stub takes grpc's default 4 MiB (= the default max_request_bytes) per
    message: every page fits it, whatever the keys and values, and paging reads everything."""
    sid = uid()
    for i in range(0, 1000, 100):
        shard.append(sid, "s", *[bytes([j % 256]) * 4190 for j in range(i, i + 100)])
    seqs: list[int] = []
    after = 0
    while True:
        page = shard.read_log(sid, "s", after_seq=after)
        seqs += [e.seq for e in page.entries]
        if not page.more:
            break
        after = seqs[-1]
    assert seqs == list(range(1, 1001))
    long = "k" * 1000
    for i in range(0, 900, 50):
        ops = [state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key=f"{long}{j:04d}", value=b"v" * 5000))
               for j in range(i, i + 50)]
        shard.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=T)
    keys: list[str] = []
    token = ""
    while True:
        page = shard.state.Scan(state_pb2.ScanRequest(session_id=sid, limit=1000, page_token=token), timeout=T)
        keys += [r.key for r in page.records]
        token = page.next_page_token
        if not token:
            break
    assert keys == [f"{long}{j:04d}" for j in range(900)]


def test_every_response_carries_the_header(shard: Conn) -> None:
    sid = uid()
    s = shard.state
    p = shard.put(sid, "k", b"1")
    responses = [
        p,
        shard.get(sid, "k"),
        s.Increment(state_pb2.IncrementRequest(session_id=sid, key="k", delta=1), timeout=T),
        s.Txn(state_pb2.TxnRequest(session_id=sid), timeout=T),
        s.Scan(state_pb2.ScanRequest(session_id=sid), timeout=T),
        shard.append(sid, "s", b"a", b"b"),
        shard.read_log(sid, "s"),
        s.TrimLog(state_pb2.TrimLogRequest(session_id=sid, stream="s", before_seq=2), timeout=T),
        s.PopLast(state_pb2.PopLastRequest(session_id=sid, stream="s"), timeout=T),
        s.Touch(state_pb2.TouchRequest(session_id=sid, ttl_ms=600_000), timeout=T),
        shard.get_session(sid),
        s.ListSessions(state_pb2.ListSessionsRequest(), timeout=T),
        s.Batch(state_pb2.BatchRequest(ops=[]), timeout=T),
        s.Delete(state_pb2.DeleteRequest(session_id=sid, key="k"), timeout=T),
        s.DeleteSession(state_pb2.DeleteSessionRequest(session_id=sid), timeout=T),
    ]
    revisions = [r.header.revision for r in responses]
    for r in responses:
        assert r.header.shard_id == "s1", type(r).__name__
        assert r.header.revision >= p.version, type(r).__name__
        assert not r.header.replayed
    assert revisions == sorted(revisions)  # one client, one shard: the revision never goes back


def test_batch_can_carry_a_txn(shard: Conn) -> None:
    sid = uid()
    v = shard.put(sid, "guard", b"g").version
    txn = state_pb2.TxnRequest(
        session_id=sid,
        compares=[state_pb2.Compare(key="guard", version=v)],
        success=[state_pb2.TxnOp(put=state_pb2.PutRequest(key="a", value=b"A"))],
    )
    resp = shard.state.Batch(
        state_pb2.BatchRequest(ops=[state_pb2.BatchOp(txn=txn)] * 2), timeout=T
    )
    first, second = resp.results
    assert first.code == 0 and first.txn.succeeded and first.txn.revision > v
    assert second.code == 0 and second.txn.succeeded  # the guard did not change
    assert shard.get(sid, "a").record.version == second.txn.revision
