"""Watch on a real shard: a session's changes in revision order from a revision, resumable,
from-now with progress notifications when idle, prefix filtering, and no other session's events.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from tests.stubs import CALL_TIMEOUT_S, Conn, shard_fixture, state_pb2, types_pb2, uid

shard = shard_fixture("s1")
T = CALL_TIMEOUT_S
E = types_pb2


class Watcher:
    """Reads a Watch stream on a thread so the test can wait for events without blocking forever."""

    def __init__(self, conn: Conn, **req: Any) -> None:
        self.call = conn.state.Watch(state_pb2.WatchRequest(**req), timeout=120)
        self.q: queue.Queue[state_pb2.WatchResponse | BaseException] = queue.Queue()
        self.events: list[types_pb2.Event] = []
        self.responses: list[state_pb2.WatchResponse] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        try:
            for resp in self.call:
                self.q.put(resp)
        except BaseException as e:
            self.q.put(e)

    def next(self, timeout: float = 20.0) -> state_pb2.WatchResponse:
        item = self.q.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        self.responses.append(item)
        self.events += item.events
        return item

    def until_events(self, n: int, timeout: float = 20.0) -> list[types_pb2.Event]:
        deadline = time.monotonic() + timeout
        while len(self.events) < n:
            self.next(timeout=max(0.1, deadline - time.monotonic()))
        return self.events

    def close(self) -> None:
        self.call.cancel()
        self._t.join(10)


def test_watch_from_a_revision_replays_every_kind_of_change_in_order(shard: Conn) -> None:
    sid = uid()
    p1 = shard.put(sid, "a", b"1")
    d = shard.state.Delete(state_pb2.DeleteRequest(session_id=sid, key="a"), timeout=T)
    ap = shard.append(sid, "s", b"x", b"y", b"z")
    tr = shard.state.TrimLog(
        state_pb2.TrimLogRequest(session_id=sid, stream="s", before_seq=2), timeout=T
    )
    pop = shard.state.PopLast(state_pb2.PopLastRequest(session_id=sid, stream="s"), timeout=T)
    touch = shard.state.Touch(state_pb2.TouchRequest(session_id=sid, ttl_ms=600_000), timeout=T)
    txn = shard.state.Txn(
        state_pb2.TxnRequest(
            session_id=sid,
            success=[
                state_pb2.TxnOp(put=state_pb2.PutRequest(key="b", value=b"2")),
                state_pb2.TxnOp(put=state_pb2.PutRequest(key="c", value=b"3")),
            ],
        ),
        timeout=T,
    )
    inc = shard.state.Increment(
        state_pb2.IncrementRequest(session_id=sid, key="n", delta=7), timeout=T
    )
    ds = shard.state.DeleteSession(state_pb2.DeleteSessionRequest(session_id=sid), timeout=T)
    assert ds.existed

    w = Watcher(shard, session_id=sid, from_revision=p1.version)
    try:
        ev = w.until_events(10)
    finally:
        w.close()
    types = [e.type for e in ev[:10]]
    assert types == [
        E.PUT,
        E.DELETE,
        E.APPEND,
        E.TRIM,
        E.POP,
        E.TOUCH,
        E.PUT,
        E.PUT,
        E.PUT,
        E.SESSION_DELETE,
    ]
    revs = [e.revision for e in ev[:10]]
    assert revs == sorted(revs)
    assert (ev[0].revision, ev[0].record.key, ev[0].record.value, ev[0].record.version) == (
        p1.version,
        "a",
        b"1",
        p1.version,
    )
    assert (ev[1].revision, ev[1].record.key) == (d.revision, "a")
    assert ev[2].revision == ap.revision and ev[2].stream == "s"
    assert [(x.seq, x.data) for x in ev[2].entries] == [(1, b"x"), (2, b"y"), (3, b"z")]
    assert ev[3].stream == "s" and ev[3].seq == tr.stream.first_seq == 2
    assert ev[4].stream == "s" and ev[4].entries[0].seq == pop.entry.seq == 3
    assert ev[5].expires_at_ms == touch.expires_at_ms
    assert ev[6].revision == ev[7].revision == txn.revision  # one Txn, one revision
    assert {ev[6].record.key, ev[7].record.key} == {"b", "c"}
    assert (ev[8].record.key, ev[8].record.value, ev[8].revision) == ("n", b"7", inc.version)
    assert ev[9].revision > inc.version


def test_watch_resumes_from_progress_without_gaps_or_repeats(shard: Conn) -> None:
    sid = uid()
    versions = [shard.put(sid, f"k{i}", b"v").version for i in range(6)]
    w = Watcher(shard, session_id=sid, from_revision=versions[0])
    try:
        w.until_events(3)
    finally:
        w.close()
    seen = [e.revision for e in w.events]
    assert seen == versions[: len(seen)]
    # resume right after the last revision we were given
    w = Watcher(shard, session_id=sid, from_revision=seen[-1] + 1)
    try:
        rest = w.until_events(len(versions) - len(seen))
    finally:
        w.close()
    assert [e.revision for e in rest] == versions[len(seen) :]


def test_watch_from_now_streams_live_changes_and_idle_progress(shard: Conn) -> None:
    sid = uid()
    shard.put(sid, "before", b"old")
    w = Watcher(shard, session_id=sid, from_revision=0)
    try:
        # the shard says where "now" is at least every second when idle
        first = w.next()
        while not first.progress_revision:
            first = w.next()
        assert w.events == []  # nothing from before the watch
        p = shard.put(sid, "live", b"new")
        a = shard.append(sid, "s", b"e")
        ev = w.until_events(2)
        assert [(e.type, e.revision) for e in ev] == [(E.PUT, p.version), (E.APPEND, a.revision)]
        assert ev[0].record.value == b"new"
        assert p.version > first.progress_revision
        # then, idle again, a progress-only response covering what was sent
        progress = w.next()
        while progress.events or not progress.progress_revision:
            progress = w.next()
        assert progress.progress_revision >= a.revision
    finally:
        w.close()


def test_watch_prefix_and_session_isolation(shard: Conn) -> None:
    sid, other = uid(), uid()
    start = shard.put(sid, "x/0", b"skip").version
    shard.put(other, "agent/1", b"not mine")
    wanted = [shard.put(sid, "agent/1", b"a").version]
    shard.put(sid, "x/1", b"skip")
    wanted.append(shard.put(sid, "agent/2", b"b").version)
    shard.put(other, "agent/2", b"not mine")
    w = Watcher(shard, session_id=sid, from_revision=start, prefix="agent/")
    try:
        ev = w.until_events(2)
        marker = shard.put(sid, "agent/zz", b"end").version
        ev = w.until_events(3)
    finally:
        w.close()
    assert [(e.record.key, e.revision) for e in ev] == [
        ("agent/1", wanted[0]),
        ("agent/2", wanted[1]),
        ("agent/zz", marker),
    ]


def test_watch_of_unknown_session_waits_for_its_creation(shard: Conn) -> None:
    sid = uid()
    w = Watcher(shard, session_id=sid, from_revision=0)
    try:
        first = w.next()
        while not first.progress_revision:
            first = w.next()
        p = shard.put(sid, "born", b"yes")
        ev = w.until_events(1)
        assert (ev[0].type, ev[0].revision) == (E.PUT, p.version)
    finally:
        w.close()


def test_many_watchers_do_not_block_writes(shard: Conn) -> None:
    sid = uid()
    watchers = [Watcher(shard, session_id=sid, from_revision=0) for _ in range(8)]
    try:
        for w in watchers:
            while not w.next().progress_revision:
                pass
        versions = [shard.put(sid, "k", str(i).encode()).version for i in range(20)]
        for w in watchers:
            assert [e.revision for e in w.until_events(20)] == versions
    finally:
        for w in watchers:
            w.close()
    assert shard.put(sid, "after", b"ok").applied


def test_watch_over_large_writes_comes_in_messages_a_default_client_accepts(shard: Conn) -> None:
    sid = uid()
    value = b"v" * (1024 * 1024 - 64)
    versions = [shard.put(sid, "k", bytes([i]) + value).version for i in range(9)]
    appended = shard.append(sid, "s", value)
    shard.state.PopLast(state_pb2.PopLastRequest(session_id=sid, stream="s"), timeout=T)  # its event carries the entry
    # The test's plain stub takes grpc's default 4 MiB per message: all of it would not fit one.
    w = Watcher(shard, session_id=sid, from_revision=versions[0])
    try:
        events = w.until_events(11)
        assert [e.revision for e in events[:10]] == [*versions, appended.revision]
        assert [e.record.value[:1] for e in events[:9]] == [bytes([i]) for i in range(9)]
        assert events[-1].type == E.POP and events[-1].entries[0].data == value
        assert len(w.responses) > 3  # the first message is the watch's start
        for resp in w.responses[1:]:
            if resp.events:
                assert resp.progress_revision == resp.events[-1].revision  # resume after what it showed
    finally:
        w.close()
