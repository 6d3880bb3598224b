"""Unit tests of the shard storage engine on a real LevelDB in tmp_path: revisions, CAS,
versions that never repeat, Txn atomicity, idempotency, TTL hiding and the sweeper, limits,
logs, the change log and the replication API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import plyvel
import pytest

from shardstate.common.errors import (
    HistoryCompactedError,
    InvalidArgumentError,
    LimitExceededError,
    NotFoundError,
)
from shardstate.server.config import ShardConfig
from shardstate.server.storage import encoding as enc
from shardstate.server.storage import entries, idempotency, ranges, values
from shardstate.server.storage import store as store_mod
from shardstate.server.storage.engine import SWEEP_BATCH, TRIM_CHUNK, Engine
from shardstate.server.storage.revision import LOGICAL_BITS, wall_ms
from shardstate.v1 import replication_pb2, types_pb2
from shardstate.v1 import state_pb2 as s

T = TypeVar("T")


class Harness:
    """One engine on a tmp LevelDB driven by one event loop; `reopen()` simulates a restart."""

    def __init__(self, path: Path, **cfg: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.cfg = ShardConfig(id="s1", data_dir=str(path), **cfg)
        self.e = Engine(self.cfg)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def reopen(self) -> Engine:
        self.run(self.e.close())
        self.e = Engine(self.cfg)
        return self.e

    def close(self) -> None:
        self.run(self.e.close())
        self.loop.close()

    # shorthands
    def put(self, sid: str, key: str, value: bytes, **kw: Any) -> s.PutResponse:
        return self.run(self.e.put(s.PutRequest(session_id=sid, key=key, value=value, **kw)))

    def get(self, sid: str, key: str) -> s.GetResponse:
        return self.e.get(s.GetRequest(session_id=sid, key=key))

    def incr(self, sid: str, key: str, delta: int = 1, **kw: Any) -> s.IncrementResponse:
        return self.run(self.e.increment(s.IncrementRequest(session_id=sid, key=key, delta=delta, **kw)))

    def append(self, sid: str, stream: str, *entries: bytes, **kw: Any) -> s.AppendResponse:
        return self.run(self.e.append(s.AppendRequest(session_id=sid, stream=stream, entries=entries, **kw)))

    def read(self, sid: str, stream: str, **kw: Any) -> list[tuple[int, bytes]]:
        r = self.e.read_log(s.ReadLogRequest(session_id=sid, stream=stream, **kw))
        return [(x.seq, x.data) for x in r.entries]

    def raw_keys(self, tag: bytes) -> list[bytes]:
        return list(self.e.store.db.iterator(prefix=tag, include_value=False))


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "db")
    try:
        yield harness
    finally:
        harness.close()


def wait_past(ms: int) -> None:
    time.sleep(ms / 1000 + 0.02)


# ---- revisions and versions ----


def test_revisions_increase_and_follow_the_wall_clock(h: Harness) -> None:
    before = wall_ms() << LOGICAL_BITS
    versions = [h.put("a", f"k{i}", b"v").version for i in range(20)]
    assert versions == sorted(set(versions))
    assert versions[0] >= before
    assert h.e.revision() == versions[-1]
    assert h.get("a", "k3").record.version == versions[3]


def test_revision_continues_above_after_reopen(h: Harness) -> None:
    last = h.put("a", "k", b"v").version
    h.reopen()
    assert h.e.revision() == last
    assert h.get("a", "k").record.version == last
    assert h.put("a", "k", b"w").version > last


def test_cas_put_mismatch_writes_nothing(h: Harness) -> None:
    v1 = h.put("a", "k", b"one").version
    rev = h.e.revision()
    r = h.put("a", "k", b"two", expected_version=v1 + 1)
    assert not r.applied and r.current.value == b"one" and r.current.version == v1
    assert h.e.revision() == rev and len(h.e.changes_since(0, 100)) == 1
    assert not h.put("a", "new", b"x", expected_version=v1).applied  # absent: current unset
    assert not h.put("a", "new", b"x", expected_version=v1).HasField("current")
    assert h.put("a", "new", b"x", expected_version=0).applied  # create-only
    assert not h.put("a", "new", b"y", expected_version=0).applied
    r = h.put("a", "k", b"two", expected_version=v1)
    assert r.applied and r.version > v1
    assert h.get("a", "k").record.create_version == v1


def test_cas_delete(h: Harness) -> None:
    v = h.put("a", "k", b"v").version
    r = h.run(h.e.delete(s.DeleteRequest(session_id="a", key="k", expected_version=v + 5)))
    assert not r.applied and r.existed and r.current.version == v
    r = h.run(h.e.delete(s.DeleteRequest(session_id="a", key="k", expected_version=v)))
    assert r.applied and r.existed and r.revision > v
    r = h.run(h.e.delete(s.DeleteRequest(session_id="a", key="k")))
    assert r.applied and not r.existed


def test_versions_never_repeat_after_delete_session_ttl_and_reopen(h: Harness) -> None:
    seen = [h.put("a", "k", b"1").version]
    h.run(h.e.delete(s.DeleteRequest(session_id="a", key="k")))
    seen.append(h.put("a", "k", b"2").version)
    h.run(h.e.delete_session(s.DeleteSessionRequest(session_id="a")))
    seen.append(h.put("a", "k", b"3").version)
    info = h.e.get_session(s.GetSessionRequest(session_id="a")).session
    assert info.max_version == seen[-1]
    seen.append(h.put("a", "k", b"4", ttl_ms=30).version)
    wait_past(30)
    assert not h.get("a", "k").found
    seen.append(h.put("a", "k", b"5", session_ttl_ms=30).version)
    wait_past(30)
    seen.append(h.put("a", "k", b"6").version)
    h.reopen()
    seen.append(h.put("a", "k", b"7").version)
    assert seen == sorted(set(seen)), seen


def test_deleted_session_keeps_max_version_in_a_tombstone(h: Harness) -> None:
    v = h.put("a", "k", b"v").version
    d = h.run(h.e.delete_session(s.DeleteSessionRequest(session_id="a")))
    assert d.existed and d.keys_deleted == 1
    assert h.raw_keys(enc.DATA) == [] and h.raw_keys(enc.META) == []
    assert len(h.raw_keys(enc.TOMBSTONE)) == 1
    with pytest.raises(NotFoundError):
        h.e.get_session(s.GetSessionRequest(session_id="a"))
    h.put("a", "k2", b"v")
    info = h.e.get_session(s.GetSessionRequest(session_id="a")).session
    assert info.key_count == 1 and info.max_version > v
    assert h.raw_keys(enc.TOMBSTONE) == []  # folded back into the meta
    again = h.run(h.e.delete_session(s.DeleteSessionRequest(session_id="nope")))
    assert not again.existed


# ---- txn ----


def test_txn_success_failure_and_one_revision(h: Harness) -> None:
    v = h.put("a", "k", b"v").version
    req = s.TxnRequest(
        session_id="a",
        compares=[s.Compare(key="k", version=v), s.Compare(key="k", value=b"v"),
                  s.Compare(key="other", exists=False), s.Compare(key="log", log_length=0)],
        success=[s.TxnOp(put=s.PutRequest(key="k", value=b"w")), s.TxnOp(get=s.GetRequest(key="k")),
                 s.TxnOp(increment=s.IncrementRequest(key="n", delta=2)),
                 s.TxnOp(append=s.AppendRequest(stream="log", entries=[b"e"]))],
        failure=[s.TxnOp(put=s.PutRequest(key="failed", value=b"1"))],
    )
    r = h.run(h.e.txn(req))
    assert r.succeeded and r.revision > v
    assert r.results[1].get.record.value == b"w"  # later ops see earlier ones
    assert r.results[0].put.version == r.revision == r.results[2].increment.version
    assert len(h.e.changes_since(r.revision, 10)) == 1
    r2 = h.run(h.e.txn(req))  # version moved: compares fail, failure ops run
    assert not r2.succeeded and r2.results[0].put.applied
    assert h.get("a", "failed").found and h.get("a", "k").record.value == b"w"


def test_txn_is_atomic_when_an_op_fails(h: Harness) -> None:
    h.put("a", "text", b"not a number")
    rev = h.e.revision()
    req = s.TxnRequest(session_id="a", success=[
        s.TxnOp(put=s.PutRequest(key="k", value=b"x")),
        s.TxnOp(increment=s.IncrementRequest(key="text", delta=1)),
    ])
    with pytest.raises(InvalidArgumentError):
        h.run(h.e.txn(req))
    assert not h.get("a", "k").found and h.e.revision() == rev


def test_txn_rejects_op_level_session_and_cas(h: Harness) -> None:
    for op in (s.TxnOp(put=s.PutRequest(session_id="b", key="k")),
               s.TxnOp(put=s.PutRequest(key="k", expected_version=1)),
               s.TxnOp(delete=s.DeleteRequest(key="k", request_id="r"))):
        with pytest.raises(InvalidArgumentError):
            h.run(h.e.txn(s.TxnRequest(session_id="a", success=[op])))


def test_txn_value_compare_on_absent_key(h: Harness) -> None:
    def ok(result: int) -> bool:
        c = s.Compare(key="missing", value=b"x", result=result)  # type: ignore[arg-type]
        return h.run(h.e.txn(s.TxnRequest(session_id="a", compares=[c]))).succeeded

    assert not ok(s.Compare.EQUAL) and ok(s.Compare.NOT_EQUAL)
    assert not ok(s.Compare.GREATER) and not ok(s.Compare.LESS)


# ---- increment ----


def test_increment(h: Harness) -> None:
    assert h.incr("a", "n", 5).value == 5
    assert h.incr("a", "n", -7).value == -2
    assert h.get("a", "n").record.value == b"-2"
    h.put("a", "bad", b" 12")
    with pytest.raises(InvalidArgumentError):
        h.incr("a", "bad")
    h.put("a", "big", str(2**63 - 1).encode())
    with pytest.raises(InvalidArgumentError):
        h.incr("a", "big", 1)


# ---- idempotency ----


def test_retried_request_id_replays_without_applying_twice(h: Harness) -> None:
    first = h.incr("a", "n", 1, request_id="r1")
    again = h.incr("a", "n", 1, request_id="r1")
    assert again.header.replayed and not first.header.replayed
    assert (again.value, again.version) == (first.value, first.version)
    assert h.get("a", "n").record.value == b"1"
    a1 = h.append("a", "m", b"x", request_id="r2")
    a2 = h.append("a", "m", b"x", request_id="r2")
    assert a2.header.replayed and list(a2.seqs) == list(a1.seqs) == [1]
    assert h.read("a", "m") == [(1, b"x")]
    with pytest.raises(InvalidArgumentError):  # same id, different operation
        h.put("a", "k", b"v", request_id="r1")
    h.reopen()  # the records are on disk
    assert h.incr("a", "n", 1, request_id="r1").header.replayed


def test_a_request_id_reused_for_other_arguments_is_refused(h: Harness) -> None:
    first = h.put("a", "k", b"v1", request_id="r1")
    with pytest.raises(InvalidArgumentError, match="different request"):
        h.put("a", "k", b"v2", request_id="r1")
    assert h.get("a", "k").record.value == b"v1"
    h.reopen()  # the request's crc32 is stored with its reply
    with pytest.raises(InvalidArgumentError, match="different request"):
        h.put("a", "k", b"v1", request_id="r1", ttl_ms=5_000)
    again = h.put("a", "k", b"v1", request_id="r1")
    assert again.header.replayed and again.version == first.version


def test_a_record_without_a_request_crc_still_replays(h: Harness) -> None:
    """Records written before the crc was stored carry none: any request of their kind
    replays them, as before."""
    first = h.incr("a", "n", 1, request_id="old")
    ikey = next(k for k, _ in h.e.store.db.iterator(prefix=enc.IDEMPOTENCY))
    expires, kind, crc, body = values.unpack_idempotency(h.e.store.db.get(ikey))
    assert crc == idempotency.fingerprint(s.IncrementRequest(session_id="a", key="n", delta=1, request_id="old"))
    h.e.store.db.put(ikey, values.pack_idempotency(expires, kind, body))
    h.reopen()
    again = h.incr("a", "n", 7, request_id="old")
    assert again.header.replayed and again.value == first.value == 1
    assert h.get("a", "n").record.value == b"1"


def test_idempotency_window_expires_and_is_collected(h: Harness) -> None:
    h.e._window_ms = 30
    h.incr("a", "n", 1, request_id="r1")
    wait_past(30)
    r = h.incr("a", "n", 1, request_id="r1")
    assert not r.header.replayed and r.value == 2
    wait_past(30)
    done = h.run(h.e.sweep_once())
    assert done["idempotency"] == 1
    assert h.raw_keys(enc.IDEMPOTENCY) == [] and h.raw_keys(enc.IDEMPOTENCY_EXPIRY) == []


def test_idempotency_collector_takes_every_due_record_and_resumes(h: Harness) -> None:
    h.e._window_ms = 30
    n = SWEEP_BATCH + 100  # more index entries than one of its WriteBatches takes
    for i in range(n):
        h.put("a", f"k{i % 10}", b"v", request_id=f"r{i}")
    wait_past(30)
    assert h.run(h.e.sweep_once())["idempotency"] == n
    assert h.raw_keys(enc.IDEMPOTENCY) == [] and h.raw_keys(enc.IDEMPOTENCY_EXPIRY) == []
    h.e._window_ms = 60_000
    h.put("b", "k", b"v", request_id="kept")  # due in a minute
    h.e._window_ms = 30
    for i in range(5):
        h.put("c", "k", b"v", request_id=f"late{i}")
    wait_past(30)
    assert h.run(h.e.sweep_once())["idempotency"] == 5  # what expired since, and only that
    assert len(h.raw_keys(enc.IDEMPOTENCY)) == len(h.raw_keys(enc.IDEMPOTENCY_EXPIRY)) == 1
    assert h.put("b", "k", b"v", request_id="kept").header.replayed


def test_a_node_that_wrote_before_sees_what_replication_stored(tmp_path: Path) -> None:
    """A node that already served writes (and holds in-memory caches of request ids and
    records), then applied a primary's entries or a snapshot, must see what they stored."""
    primary, old = Harness(tmp_path / "p"), Harness(tmp_path / "o")
    try:
        old.put("x", "k", b"v", request_id="own")
        old.put("b", "n", b"mine")
        assert old.get("b", "n").record.value == b"mine"
        wait_past(2)
        primary.incr("b", "n", 3, request_id="rid")
        old.run(old.e.apply_changes(primary.e.changes_since(0, 1000)))
        assert old.get("b", "n").record == primary.get("b", "n").record
        assert old.incr("b", "n", 3, request_id="rid").header.replayed
        primary.incr("b", "n", 1, request_id="rid2")
        with primary.e.snapshot() as snap:
            old.e.install_snapshot_chunk(list(snap), True, snap.revision)
        assert old.get("b", "n").record == primary.get("b", "n").record
        assert old.incr("b", "n", 1, request_id="rid2").header.replayed
        cas = old.put("b", "n", b"x", expected_version=primary.get("b", "n").record.version)
        assert cas.applied
    finally:
        primary.close()
        old.close()


def test_request_id_replays_when_the_filter_is_rebuilt_before_its_write_landed(h: Harness) -> None:
    """A new request-id filter (here: after the wall clock stepped back) must also wait for
    records still held in a group, which LevelDB does not have yet."""
    assert h.e.store.begin_group()
    h.put("a", "k", b"v", request_id="held")
    assert h.e._absent is not None
    h.e._absent.since = wall_ms() + 3_600_000  # the clock "stepped back" an hour
    h.put("b", "k", b"v", request_id="other")  # makes a new filter while "held" is held
    h.e.store.end_group()
    assert h.put("a", "k", b"v", request_id="held").header.replayed


def test_absent_filter_never_forgets_a_live_record() -> None:
    f = idempotency.Absent(armed_at=1000, window_ms=100, now=500)
    assert f.valid(500) and not f.absent(b"a", 999)  # older records may still be live
    assert f.absent(b"a", 1000)
    assert f.valid(550)
    f.add(b"a")  # at 550: its record expires at 650
    for now in (550, 600, 650, 699):  # 600: a rotation; it is kept until after it expired
        assert f.valid(now) and not f.absent(b"a", max(now, 1000))
    assert f.valid(700) and f.absent(b"a", 1000)
    assert not f.valid(699)  # the clock stepped back: the engine makes a new filter


# ---- TTL ----


def test_session_ttl_hides_everything_before_the_sweeper(h: Harness) -> None:
    h.put("a", "k", b"v", session_ttl_ms=40)
    h.append("a", "m", b"e")
    h.put("b", "k", b"v")
    wait_past(40)
    assert not h.get("a", "k").found
    assert list(h.e.scan(s.ScanRequest(session_id="a")).records) == []
    with pytest.raises(NotFoundError):
        h.e.get_session(s.GetSessionRequest(session_id="a"))
    with pytest.raises(NotFoundError):
        h.read("a", "m")
    assert [x.session_id for x in h.e.list_sessions(s.ListSessionsRequest()).sessions] == ["b"]
    assert h.raw_keys(enc.DATA)  # still on disk: only hidden
    done = h.run(h.e.sweep_once())
    assert done["sessions"] == 1
    assert h.raw_keys(enc.data_prefix(b"default", b"a")) == []
    assert h.raw_keys(enc.log_prefix(b"default", b"a")) == []
    assert h.raw_keys(enc.SESSION_EXPIRY) == []
    assert h.raw_keys(enc.DATA) == [enc.data_key(b"default", b"b", b"k")]  # b untouched
    last = h.e.changes_since(h.e.revision(), 1)[0]
    assert [ev.type for ev in last.events] == [types_pb2.SESSION_EXPIRE]


def test_write_into_an_expired_session_starts_it_fresh(h: Harness) -> None:
    h.put("a", "old", b"v", session_ttl_ms=30)
    h.append("a", "m", b"e1", b"e2")
    wait_past(30)
    h.put("a", "new", b"v")
    assert not h.get("a", "old").found
    info = h.e.get_session(s.GetSessionRequest(session_id="a")).session
    assert info.key_count == 1 and info.expires_at_ms == 0 and not info.streams
    assert h.append("a", "m", b"again").seqs[0] == 1  # the stream was reclaimed with the session


def test_touch_extends_and_removes_ttl(h: Harness) -> None:
    h.put("a", "k", b"v", session_ttl_ms=60_000)
    t = h.run(h.e.touch(s.TouchRequest(session_id="a", ttl_ms=120_000)))
    assert t.expires_at_ms >= wall_ms() + 100_000
    assert len(h.raw_keys(enc.SESSION_EXPIRY)) == 1
    h.run(h.e.touch(s.TouchRequest(session_id="a", ttl_ms=0)))
    assert h.e.get_session(s.GetSessionRequest(session_id="a")).session.expires_at_ms == 0
    assert h.raw_keys(enc.SESSION_EXPIRY) == []
    with pytest.raises(NotFoundError):
        h.run(h.e.touch(s.TouchRequest(session_id="nobody", ttl_ms=5)))


def test_key_ttl_hidden_then_reclaimed(h: Harness) -> None:
    h.put("a", "tmp", b"v", ttl_ms=30)
    h.put("a", "keep", b"v")
    wait_past(30)
    assert not h.get("a", "tmp").found
    assert [r.key for r in h.e.scan(s.ScanRequest(session_id="a")).records] == ["keep"]
    assert h.run(h.e.sweep_once())["keys"] == 1
    info = h.e.get_session(s.GetSessionRequest(session_id="a")).session
    assert info.key_count == 1 and info.bytes == len(b"keep") + 1
    assert h.raw_keys(enc.KEY_EXPIRY) == []
    last = h.e.changes_since(h.e.revision(), 1)[0]
    assert [(ev.type, ev.record.key) for ev in last.events] == [(types_pb2.KEY_EXPIRE, "tmp")]


def test_put_without_ttl_clears_it_increment_keeps_it(h: Harness) -> None:
    h.put("a", "k", b"v", ttl_ms=60_000)
    h.put("a", "k", b"w")
    assert h.get("a", "k").record.expires_at_ms == 0 and h.raw_keys(enc.KEY_EXPIRY) == []
    h.incr("a", "n", 1, ttl_ms=60_000)
    exp = h.get("a", "n").record.expires_at_ms
    h.incr("a", "n", 1)
    assert h.get("a", "n").record.expires_at_ms == exp


# ---- limits and validation ----


def test_limits(tmp_path: Path) -> None:
    h = Harness(tmp_path / "db", max_value_bytes=100, max_keys_per_session=3,
                max_session_bytes=250, max_batch_ops=4)
    try:
        with pytest.raises(LimitExceededError) as e:
            h.put("a", "k", b"x" * 101)
        assert e.value.limit == "max_value_bytes"
        for i in range(3):
            h.put("a", f"k{i}", b"x")
        with pytest.raises(LimitExceededError) as e:
            h.put("a", "k3", b"x")
        assert e.value.limit == "max_keys_per_session"
        h.put("a", "k0", b"y")  # overwriting is not a new key
        with pytest.raises(LimitExceededError) as e:
            h.append("a", "m", *[b"x" * 100] * 3)
        assert e.value.limit == "max_session_bytes"
        with pytest.raises(LimitExceededError) as e:
            h.append("a", "m", *[b"x"] * 5)
        assert e.value.limit == "max_batch_ops"
        for bad in ("", "x" * 257):
            with pytest.raises(InvalidArgumentError, match="session_id"):
                h.put(bad, "k", b"v")
        for bad in ("", "k" * 1025):
            with pytest.raises(InvalidArgumentError, match="max_key_bytes"):
                h.put("a", bad, b"v")
        info = h.e.get_session(s.GetSessionRequest(session_id="a")).session
        assert info.key_count == 3 and not info.streams  # nothing of the refused writes
    finally:
        h.close()


# ---- logs ----


def test_logs_read_trim_pop(h: Harness) -> None:
    assert list(h.append("a", "m", *[f"e{i}".encode() for i in range(1, 11)]).seqs) == list(range(1, 11))
    assert [q for q, _ in h.read("a", "m", last=3)] == [8, 9, 10]
    assert [q for q, _ in h.read("a", "m", after_seq=7)] == [8, 9, 10]
    assert [q for q, _ in h.read("a", "m", from_seq=2, to_seq=4)] == [2, 3, 4]
    r = h.e.read_log(s.ReadLogRequest(session_id="a", stream="m", limit=4))
    assert [e.seq for e in r.entries] == [1, 2, 3, 4] and r.more
    t = h.run(h.e.trim_log(s.TrimLogRequest(session_id="a", stream="m", before_seq=4)))
    assert t.removed == 3 and t.stream.first_seq == 4 and t.stream.count == 7
    t = h.run(h.e.trim_log(s.TrimLogRequest(session_id="a", stream="m", keep_last=2)))
    assert t.removed == 5 and [q for q, _ in h.read("a", "m")] == [9, 10]
    p = h.run(h.e.pop_last(s.PopLastRequest(session_id="a", stream="m")))
    assert p.found and p.entry.seq == 10
    assert h.append("a", "m", b"next").seqs[0] == 11  # a popped seq is never reused
    assert [q for q, _ in h.read("a", "m")] == [9, 11]
    with pytest.raises(NotFoundError):
        h.run(h.e.pop_last(s.PopLastRequest(session_id="a", stream="nope")))
    info = h.e.get_session(s.GetSessionRequest(session_id="a")).session
    assert info.bytes == len(b"e9") + len(b"next")


def test_plyvel_reverse_iteration_drops_a_lone_key_at_the_start_bound(tmp_path: Path) -> None:
    """The trap ranges.iterate works around (plyvel 1.5.1, plyvel alone): a reverse iterator
    whose range's highest key is its start bound yields nothing. If this starts failing,
    plyvel fixed it and ranges.iterate could hand reverse reads to plyvel again."""
    db = plyvel.DB(str(tmp_path / "raw"), create_if_missing=True)
    try:
        for k in (b"a1", b"a2", b"b"):
            db.put(k, b"")
        keys = lambda **kw: list(db.iterator(include_value=False, **kw))  # noqa: E731
        assert keys(start=b"a1", stop=b"a2") == [b"a1"]  # forward: right
        assert keys(start=b"a1", stop=b"a2", reverse=True) == []  # reverse: a1 is lost
        assert keys(start=b"a2", stop=b"a3", reverse=True) == []
        assert keys(start=b"a2", stop=b"b", include_stop=False, reverse=True) == []
        assert keys(prefix=b"b", reverse=True) == []  # prefix == the one key
        assert keys(start=b"a0", stop=b"a2", reverse=True) == [b"a1"]  # start below the key: right
        assert keys(start=b"a1", stop=b"a3", reverse=True) == [b"a2", b"a1"]  # two keys: right
    finally:
        db.close()


def test_ranges_iterate_matches_sorted_filtering_for_every_bound(tmp_path: Path) -> None:
    """ranges.iterate against the obvious model, over every bound drawn from keys around a
    small key set (0x00 and 0xFF bytes, keys that are prefixes of each other)."""
    stored = [b"a", b"a\x00", b"a\x00\x01", b"a\xff", b"ab", b"b", b"\xff", b"\xff\xff"]
    bounds = sorted({*stored, b"", b"\x00", b"a\x01", b"a\xfe", b"aa", b"c", b"\xff\xff\xff"})
    db = plyvel.DB(str(tmp_path / "raw"), create_if_missing=True)
    try:
        for k in stored:
            db.put(k, k + b"!")
        for lo in [None, *bounds]:
            for hi in [None, *bounds]:
                for inc_lo in (True, False):
                    for inc_hi in (True, False):
                        want = [k for k in sorted(stored)
                                if (lo is None or k > lo or (inc_lo and k == lo))
                                and (hi is None or k < hi or (inc_hi and k == hi))]
                        kw = dict(start=lo, stop=hi, include_start=inc_lo, include_stop=inc_hi)
                        fwd = list(ranges.iterate(db, include_value=False, **kw))  # type: ignore[arg-type]
                        rev = list(ranges.iterate(db, reverse=True, **kw))  # type: ignore[arg-type]
                        assert fwd == want, kw
                        assert rev == [(k, k + b"!") for k in reversed(want)], kw
        for p in bounds:
            want = [k for k in sorted(stored) if k.startswith(p)]
            assert list(ranges.iterate(db, prefix=p, include_value=False)) == want, p
            assert list(ranges.iterate(db, prefix=p, reverse=True, include_value=False)) == want[::-1], p
    finally:
        db.close()


def test_no_reverse_iteration_outside_ranges_iterate() -> None:
    """Every reverse read in server/ goes through ranges.iterate (the plyvel trap above)."""
    root = Path(__file__).resolve().parent.parent / "server"
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for path in root.rglob("*.py") if path.name != "ranges.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if ".iterator(" in line and "reverse" in line
    ]
    assert offenders == []


def test_one_entry_ranges_read_back(h: Harness) -> None:
    """Issue 13 defect 1: ReadLog(last=N) over a range holding one entry read as empty."""
    h.append("a", "m", b"a")
    assert h.read("a", "m", last=5) == [(1, b"a")]
    assert h.read("a", "m", last=1) == [(1, b"a")]
    h.append("a", "m", b"b", b"c")
    assert [[q for q, _ in h.read("a", "m", last=n)] for n in range(1, 8)] == [
        [3], [2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]]
    assert h.read("a", "m", from_seq=2, to_seq=2, last=3) == [(2, b"b")]
    assert h.read("a", "m", after_seq=2, last=3) == [(3, b"c")]
    assert h.read("a", "m", from_seq=3, last=1) == [(3, b"c")]
    h.run(h.e.trim_log(s.TrimLogRequest(session_id="a", stream="m", keep_last=1)))
    assert h.read("a", "m", last=2) == [(3, b"c")]
    p = h.run(h.e.pop_last(s.PopLastRequest(session_id="a", stream="m")))
    assert p.found and p.entry.seq == 3 and h.read("a", "m", last=2) == []
    # A stream name that is a prefix of another's, and one holding 0x00 / U+00FF.
    for stream in ("x", "x\x00", "x\xff"):
        h.append("a", stream, stream.encode())
    for stream in ("x", "x\x00", "x\xff"):
        assert h.read("a", stream, last=3) == [(1, stream.encode())], stream


# ---- scan and list ----


def test_scan_pages_and_prefixes_with_odd_bytes(h: Harness) -> None:
    keys = ["p", "p\x00", "p\x00x", "p/1", "p/2", "p\U0010ffff", "q", "o"]
    for k in keys:
        h.put("a", k, b"v")
    got, token = [], ""
    while True:
        r = h.e.scan(s.ScanRequest(session_id="a", prefix="p", limit=2, page_token=token))
        got += [x.key for x in r.records]
        token = r.next_page_token
        if not token:
            break
    assert got == sorted(k for k in keys if k.startswith("p"))
    r = h.e.scan(s.ScanRequest(session_id="a", prefix="p\x00", keys_only=True))
    assert [x.key for x in r.records] == ["p\x00", "p\x00x"] and r.records[0].value == b""
    assert [x.key for x in h.e.scan(s.ScanRequest(session_id="a", start_after="p/2")).records] == ["p\U0010ffff", "q"]


def test_list_sessions_sorted_paged_prefixed(h: Harness) -> None:
    for sid in ("b", "a", "ab", "c", "a\x00"):
        h.put(sid, "k", b"v")
    h.put("x", "k", b"v", namespace="other")
    page = h.e.list_sessions(s.ListSessionsRequest(limit=2))
    assert [x.session_id for x in page.sessions] == ["a", "a\x00"] and page.next_page_token == "a\x00"
    page = h.e.list_sessions(s.ListSessionsRequest(limit=10, page_token="a\x00"))
    assert [x.session_id for x in page.sessions] == ["ab", "b", "c"] and not page.next_page_token
    assert [x.session_id for x in h.e.list_sessions(s.ListSessionsRequest(prefix="a")).sessions] == ["a", "a\x00", "ab"]
    assert [x.session_id for x in h.e.list_sessions(s.ListSessionsRequest(namespace="other")).sessions] == ["x"]


# ---- change log, replication API ----


def test_change_log_entries_carry_raw_ops_and_events(h: Harness) -> None:
    v = h.put("a", "k", b"v", request_id="r").version
    (entry,) = h.e.changes_since(v, 10)
    assert (entry.revision, entry.namespace, entry.session_id) == (v, "default", "a")
    keys = {op.key for op in entry.ops}
    assert enc.data_key(b"default", b"a", b"k") in keys and enc.meta_key(b"default", b"a") in keys
    assert enc.idempotency_key(b"default", b"a", b"r") in keys
    assert [(ev.type, ev.record.key, ev.record.version) for ev in entry.events] == [(types_pb2.PUT, "k", v)]


def test_change_log_stores_a_put_value_once_and_readers_see_it(h: Harness) -> None:
    value = bytes(range(256)) * 8
    first = h.put("a", "k", b"old", ttl_ms=60_000).version
    v = h.put("a", "k", value, ttl_ms=60_000, request_id="r").version
    ((_, raw),) = h.e.changes_since_raw(v, 10)
    assert raw.count(value) == 1 and len(raw) < len(value) + 400
    stored = replication_pb2.ChangeEntry.FromString(raw)
    assert stored.events[0].record.value == b"" and stored.event_value_op[0] > 0
    (entry,) = h.e.changes_since(v, 10)
    rec = h.get("a", "k").record
    want = types_pb2.Event(type=types_pb2.PUT, revision=v, record=types_pb2.Record(
        key="k", value=value, version=v, create_version=first, expires_at_ms=rec.expires_at_ms,
        updated_at_ms=rec.updated_at_ms,
    ))
    assert list(entry.events) == [want] and not entry.event_value_op
    assert entries.events_of(stored) == [want]


def test_change_log_txn_writing_a_key_twice_keeps_each_put_value(h: Harness) -> None:
    for first, second in ((b"", b"x"), (b"a", b"b"), (b"x", b"")):
        put = [s.TxnOp(put=s.PutRequest(key="k", value=val)) for val in (first, second)]
        rev = h.run(h.e.txn(s.TxnRequest(session_id="t", success=put))).revision
        (entry,) = h.e.changes_since(rev, 10)
        assert [ev.record.value for ev in entry.events] == [first, second]


def test_change_log_entries_with_inline_values_still_read(h: Harness) -> None:
    ev = types_pb2.Event(type=types_pb2.PUT, revision=5, record=types_pb2.Record(key="k", value=b"v", version=5))
    old = replication_pb2.ChangeEntry(
        revision=5, namespace="default", session_id="a", ops=[replication_pb2.RawOp(key=b"d", value=b"x" * 40)],
        events=[ev],
    )
    assert entries.events_of(old) == [ev]
    assert entries.parse(old.SerializeToString()) == old


def test_change_log_retention_and_history_compacted(tmp_path: Path) -> None:
    h = Harness(tmp_path / "db", changelog_retention=5)
    try:
        versions = [h.put("a", f"k{i}", b"v").version for i in range(12)]
        assert h.e.oldest_revision() == 1
        assert h.run(h.e.sweep_once())["changes_trimmed"] == 7
        assert h.e.oldest_revision() == versions[6] + 1
        assert [e.revision for e in h.e.changes_since(h.e.oldest_revision(), 100)] == versions[7:]
        with pytest.raises(HistoryCompactedError) as e:
            h.e.changes_since(versions[3], 10)
        assert e.value.oldest_revision == versions[6] + 1
        h.reopen()
        assert h.e.oldest_revision() == versions[6] + 1
    finally:
        h.close()


def test_change_log_trim_in_chunks_and_again_after_more_writes(tmp_path: Path) -> None:
    h = Harness(tmp_path / "db", changelog_retention=5)
    try:
        n = 2 * TRIM_CHUNK + 500  # more than two chunks in one sweep
        versions = [h.put("a", f"k{i % 7}", b"v").version for i in range(n)]
        assert h.run(h.e.sweep_once())["changes_trimmed"] == n - 5
        assert h.e.oldest_revision() == versions[-6] + 1
        assert [e.revision for e in h.e.changes_since(h.e.oldest_revision(), 100)] == versions[-5:]
        more = [h.put("b", f"k{i}", b"w").version for i in range(20)]
        assert h.run(h.e.sweep_once())["changes_trimmed"] == 20  # what came since, and only that
        assert [e.revision for e in h.e.changes_since(h.e.oldest_revision(), 100)] == more[-5:]
        assert h.e.store.change_count == 5
        h.reopen()
        assert h.e.store.change_count == 5 and h.e.oldest_revision() == more[-6] + 1
        assert h.run(h.e.sweep_once())["changes_trimmed"] == 0
        assert h.get("a", "k3").record.value == b"v" and h.get("b", "k19").record.value == b"w"
    finally:
        h.close()


def test_change_log_keys_sort_after_every_other_family() -> None:
    """New change-log tables must lie beyond everything else in LevelDB's key space (so they
    move down the levels without being merged with the data): the tag sorts last."""
    others = [enc.DATA, enc.META, enc.TOMBSTONE, enc.LOG, enc.IDEMPOTENCY, enc.IDEMPOTENCY_EXPIRY,
              enc.SESSION_EXPIRY, enc.KEY_EXPIRY, enc.NODE, enc.LEGACY_CHANGE]
    assert all(len(t) == 1 and t < enc.CHANGE for t in others)
    highest_other = max(others) + b"\xff" * 64  # above any key of those families
    assert enc.change_key(0) > highest_other
    assert enc.CHANGE_END is not None and enc.change_key(2**64 - 1) < enc.CHANGE_END


def test_a_store_with_the_legacy_change_log_tag_is_moved_at_open(tmp_path: Path) -> None:
    """A data directory written before the tag change: its entries (under `c`) are moved at
    open, in chunks, and read back the same; new writes continue the log."""
    h = Harness(tmp_path / "db")
    try:
        versions = [h.put(f"s{i % 3}", f"k{i}", b"v%d" % i).version for i in range(25)]
        before = h.e.changes_since_raw(versions[0], 100)
        h.run(h.e.close())
        db = plyvel.DB(str(tmp_path / "db"))
        with db.write_batch() as wb:  # what the old code left: the same entries under `c`
            for k, v in db.iterator(prefix=enc.CHANGE):
                wb.put(enc.LEGACY_CHANGE + k[1:], v)
                wb.delete(k)
        assert sum(1 for _ in db.iterator(prefix=enc.LEGACY_CHANGE)) == 25
        db.close()
        chunk, store_mod.LEGACY_MOVE_CHUNK = store_mod.LEGACY_MOVE_CHUNK, 10  # three chunks
        try:
            h.e = Engine(h.cfg)
        finally:
            store_mod.LEGACY_MOVE_CHUNK = chunk
        assert h.e.changes_since_raw(versions[0], 100) == before
        assert h.e.store.change_count == 25 and h.e.revision() == versions[-1]
        assert not list(h.e.store.db.iterator(prefix=enc.LEGACY_CHANGE))
        nxt = h.put("s0", "k", b"after").version
        assert nxt > versions[-1]
        assert [e.revision for e in h.e.changes_since(versions[-1], 10)] == [versions[-1], nxt]
        assert h.get("s1", "k4").record.value == b"v4"
    finally:
        h.close()


def test_apply_changes_and_snapshot_reproduce_the_primary(tmp_path: Path) -> None:
    primary = Harness(tmp_path / "p")
    replica = Harness(tmp_path / "r")
    fresh = Harness(tmp_path / "f")
    try:
        primary.put("a", "k", b"v1", ttl_ms=60_000)
        primary.append("a", "m", b"e1", b"e2")
        primary.incr("b", "n", 3, request_id="rid")
        primary.run(primary.e.delete_session(s.DeleteSessionRequest(session_id="b")))
        primary.put("a", "k", b"v2")
        entries = primary.e.changes_since(0, 1000)
        assert replica.run(replica.e.apply_changes(entries[:2])) == entries[1].revision
        assert replica.run(replica.e.apply_changes(entries)) == primary.e.revision()  # overlap skipped
        with primary.e.snapshot() as snap:
            assert snap.revision == primary.e.revision()
            fresh.e.install_snapshot_chunk(list(snap), True, snap.revision)
        for other in (replica, fresh):
            assert other.e.revision() == primary.e.revision()
            assert other.get("a", "k").record == primary.get("a", "k").record
            assert other.read("a", "m") == primary.read("a", "m")
            info = other.e.get_session(s.GetSessionRequest(session_id="a")).session
            assert info == primary.e.get_session(s.GetSessionRequest(session_id="a")).session
            assert not other.get("b", "n").found
        assert fresh.e.oldest_revision() == primary.e.revision() + 1
        assert replica.incr("b", "n", 3, request_id="rid").header.replayed  # idempotency replicated
    finally:
        for x in (primary, replica, fresh):
            x.close()


def test_wait_for_revision(h: Harness) -> None:
    async def scenario() -> tuple[bool, bool]:
        target = h.e.revision() + 1
        waiter = asyncio.ensure_future(h.e.wait_for_revision(target, 5))
        await asyncio.sleep(0.01)
        await h.e.put(s.PutRequest(session_id="a", key="k", value=b"v"))
        return await waiter, await h.e.wait_for_revision(h.e.revision() + 10**9, 0.05)

    assert h.run(scenario()) == (True, False)


# ---- group commit ----


def test_group_commit_serializes_a_session_and_merges_writers(tmp_path: Path) -> None:
    h = Harness(tmp_path / "db", fsync=True)
    try:
        async def load() -> list[s.IncrementResponse]:
            return await asyncio.gather(*(
                h.e.increment(s.IncrementRequest(session_id=f"s{i % 4}", key="n", delta=1))
                for i in range(200)
            ))

        results = h.run(load())
        assert sorted(r.value for r in results) == sorted(
            v for i in range(4) for v in range(1, 51)
        )
        assert [h.get(f"s{i}", "n").record.value for i in range(4)] == [b"50"] * 4
        versions = [r.version for r in results]
        assert len(set(versions)) == 200
        assert len(h.e.changes_since(0, 1000)) == 200
    finally:
        h.close()


def test_raise_revision_is_persisted(h: Harness) -> None:
    floor = h.put("a", "k", b"v").version + (10_000 << LOGICAL_BITS)  # ten seconds ahead
    raised = h.run(h.e.raise_revision(floor))
    assert raised > floor and h.e.revision() == raised
    # An (empty) change-log entry carries it, so a replica following this node reaches it.
    assert [rev for rev, _ in h.e.changes_since_raw(raised, 10)] == [raised]
    assert h.put("a", "k", b"w").version > raised
    h.reopen()
    assert h.put("a", "k", b"x").version > floor


def test_compression_setting_validated_and_either_reads_the_other(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="--compression must be one of none, snappy"):
        ShardConfig(id="s1", data_dir=str(tmp_path), compression="zstd").validate()
    h = Harness(tmp_path, compression="snappy")
    try:
        value = b"agent state " * 200  # compressible
        for i in range(200):
            h.put(f"s{i}", "k", value)
        h.run(asyncio.sleep(0))
        h.cfg = ShardConfig(id="s1", data_dir=str(tmp_path), compression="none")
        h.reopen()
        assert all(h.get(f"s{i}", "k").record.value == value for i in range(200))
        h.put("s0", "k", b"new")
        h.cfg = ShardConfig(id="s1", data_dir=str(tmp_path), compression="snappy")
        h.reopen()
        assert h.get("s0", "k").record.value == b"new"
        assert h.get("s199", "k").record.value == value
    finally:
        h.close()


def test_write_buffer_sizes_spread_around_the_mean() -> None:
    """Shards with the same write rate must not flush and compact in lockstep: each store
    draws its memtable size within +-25% of the mean, and different draws differ."""
    import random

    from shardstate.server.storage.store import WRITE_BUFFER_MEAN, write_buffer_size

    sizes = [write_buffer_size(random.Random(seed)) for seed in range(50)]
    assert all(0.75 * WRITE_BUFFER_MEAN <= s < 1.25 * WRITE_BUFFER_MEAN for s in sizes)
    assert len(set(sizes)) == 50
    assert min(sizes) < 0.85 * WRITE_BUFFER_MEAN and max(sizes) > 1.15 * WRITE_BUFFER_MEAN


@pytest.mark.parametrize("sessions, records", [(50, 20), (0, 0)])
def test_caches_stay_within_their_configured_sizes(tmp_path: Path, sessions: int, records: int) -> None:
    """--session-cache and --record-cache bound what the shard holds in memory however many
    sessions it serves; every value still reads back (from LevelDB past the caches)."""
    h = Harness(tmp_path / "db", session_cache=sessions, record_cache=records)
    try:
        versions = []
        for i in range(300):
            versions.append(h.put(f"c-{i}", "k", b"v%d" % i).version)
            assert h.e.store.cached()[0] <= sessions and h.e.store.cached()[1] <= records
        for i in range(300):
            got = h.get(f"c-{i}", "k")
            assert got.found and got.record.value == b"v%d" % i and got.record.version == versions[i]
        metas, recs = h.e.store.cached()
        assert metas <= sessions and recs <= records
        assert len(h.e._refs) <= sessions
        assert not h.put("c-7", "k", b"late", expected_version=versions[6]).applied
        again = h.put("c-7", "k", b"again", expected_version=versions[7])  # CAS on LevelDB's copy
        assert again.applied and h.get("c-7", "k").record.version == again.version > versions[7]
    finally:
        h.close()


def test_cache_sizes_are_validated() -> None:
    for flag, bad in (("block_cache_mib", 0), ("max_open_files", 10), ("session_cache", -1)):
        with pytest.raises(InvalidArgumentError, match=f"--{flag.replace('_', '-')} must be at least"):
            ShardConfig(id="s1", **{flag: bad}).validate()
