"""Key and session TTL on real shards: expiry hides everything at once before the sweeper runs,
Touch extends it, the sweeper reclaims the space, and versions never repeat across expiry.
"""

from __future__ import annotations

import time

import grpc

from tests.stubs import (
    CALL_TIMEOUT_S,
    Conn,
    expect_error,
    shard_fixture,
    sleep_until_ms,
    state_pb2,
    types_pb2,
    uid,
    wait_until,
)

T = CALL_TIMEOUT_S
# The sweeper never runs during these tests: whatever is hidden is hidden by the read path.
lazy = shard_fixture("s1", "--sweep-interval-s", "3600")
# The sweeper runs often: reclamation is observable.
swept = shard_fixture("s2", "--sweep-interval-s", "0.2")


def now_ms() -> int:
    return int(time.time() * 1000)


def scan_keys(shard: Conn, sid: str, ns: str = "") -> list[str]:
    resp = shard.state.Scan(state_pb2.ScanRequest(namespace=ns, session_id=sid), timeout=T)
    return [r.key for r in resp.records]


def listed(shard: Conn, ns: str) -> list[str]:
    resp = shard.state.ListSessions(
        state_pb2.ListSessionsRequest(namespace=ns, limit=1000), timeout=T
    )
    return [s.session_id for s in resp.sessions]


def test_key_ttl_expiry_hides_the_key_and_recreate_gets_a_new_version(lazy: Conn) -> None:
    sid = uid()
    shard = lazy
    shard.put(sid, "keep", b"k")
    p = shard.put(sid, "k", b"v", ttl_ms=400)
    # same machine, same clock: the server's expiry is at most now + ttl
    sleep_until_ms(now_ms() + 400)
    assert not shard.get(sid, "k").found
    assert scan_keys(shard, sid) == ["keep"]
    # an expired key is absent: create-only succeeds, with a version above the expired one
    again = shard.put(sid, "k", b"again", expected_version=0)
    assert again.applied and again.version > p.version
    g = shard.get(sid, "k")
    assert (g.record.value, g.record.version, g.record.expires_at_ms) == (
        b"again",
        again.version,
        0,
    )
    assert g.record.create_version == again.version


def test_session_ttl_hides_every_key_and_log_at_once_before_the_sweeper(lazy: Conn) -> None:
    shard = lazy
    ns = uid("ns")
    sid = uid()
    shard.put("bystander", "k", b"stays", ns=ns)
    keys = [f"k{i}" for i in range(10)]
    for k in keys:
        shard.put(sid, k, k.encode(), ns=ns)
    shard.append(sid, "messages", b"m1", b"m2", ns=ns)
    info = shard.get_session(sid, ns=ns).session
    assert info.expires_at_ms == 0 and info.key_count == 10
    last = shard.put(sid, "last", b"x", ns=ns, session_ttl_ms=1000)
    sleep_until_ms(now_ms() + 1000)  # the server's expiry is at most now + ttl

    for k in [*keys, "last"]:
        assert not shard.get(sid, k, ns=ns).found, k
    assert scan_keys(shard, sid, ns) == []
    expect_error(grpc.StatusCode.NOT_FOUND, shard.read_log, sid, "messages", ns=ns)
    expect_error(grpc.StatusCode.NOT_FOUND, shard.get_session, sid, ns=ns)
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        shard.state.Touch,
        state_pb2.TouchRequest(namespace=ns, session_id=sid, ttl_ms=60_000),
        timeout=T,
    )
    assert listed(shard, ns) == ["bystander"]
    txn = shard.state.Txn(
        state_pb2.TxnRequest(
            namespace=ns, session_id=sid, compares=[state_pb2.Compare(key="k0", exists=True)]
        ),
        timeout=T,
    )
    assert not txn.succeeded

    # recreating the session (sweeper still asleep) starts from nothing, with higher versions
    new = shard.put(sid, "k0", b"new", ns=ns, expected_version=0)
    assert new.applied and new.version > last.version
    assert scan_keys(shard, sid, ns) == ["k0"]
    assert list(shard.append(sid, "messages", b"fresh", ns=ns).seqs) == [1]
    assert [e.data for e in shard.read_log(sid, "messages", ns=ns).entries] == [b"fresh"]
    info2 = shard.get_session(sid, ns=ns).session
    assert info2.key_count == 1 and info2.expires_at_ms == 0
    assert info2.max_version > last.version
    assert shard.get("bystander", "k", ns=ns).record.value == b"stays"


def test_session_ttl_slides_with_each_write(lazy: Conn) -> None:
    shard = lazy
    sid = uid()
    shard.put(sid, "a", b"1", session_ttl_ms=60_000)
    e1 = shard.get_session(sid).session.expires_at_ms
    time.sleep(0.05)
    shard.put(sid, "b", b"2", session_ttl_ms=60_000)
    e2 = shard.get_session(sid).session.expires_at_ms
    assert e2 > e1
    shard.append(sid, "s", b"x", session_ttl_ms=120_000)
    assert shard.get_session(sid).session.expires_at_ms >= e2 + 59_000


def test_touch_extends_then_shortens_the_session_ttl(lazy: Conn) -> None:
    shard = lazy
    sid = uid()
    shard.put(sid, "k", b"v")
    shard.append(sid, "s", b"e")
    first = shard.state.Touch(
        state_pb2.TouchRequest(session_id=sid, ttl_ms=1500), timeout=T
    ).expires_at_ms
    t = shard.state.Touch(state_pb2.TouchRequest(session_id=sid, ttl_ms=5000), timeout=T)
    assert t.expires_at_ms > first
    sleep_until_ms(first, margin_ms=200)  # past the original expiry: still alive
    assert shard.get(sid, "k").found
    assert [e.data for e in shard.read_log(sid, "s").entries] == [b"e"]
    t = shard.state.Touch(state_pb2.TouchRequest(session_id=sid, ttl_ms=300), timeout=T)
    assert t.expires_at_ms < first + 5000
    sleep_until_ms(t.expires_at_ms)
    assert not shard.get(sid, "k").found
    expect_error(grpc.StatusCode.NOT_FOUND, shard.get_session, sid)


def test_sweeper_reclaims_expired_session(swept: Conn) -> None:
    shard = swept
    ns = uid("ns")
    sid = uid()
    shard.put("bystander", "k", b"stays", ns=ns)
    # watch the doomed session from its first revision to see the sweeper's event
    before = shard.node_status()
    n_keys = 20
    first = 0
    for i in range(n_keys):
        p = shard.put(sid, f"k{i}", b"x" * 100, ns=ns)
        first = first or p.version
    shard.append(sid, "log", *[b"e"] * 5, ns=ns)
    loaded = shard.node_status()
    assert loaded.keys >= before.keys + n_keys
    assert loaded.sessions >= before.sessions + 1
    watch = shard.state.Watch(
        state_pb2.WatchRequest(namespace=ns, session_id=sid, from_revision=first), timeout=30
    )
    t = shard.state.Touch(
        state_pb2.TouchRequest(namespace=ns, session_id=sid, ttl_ms=500), timeout=T
    )
    sleep_until_ms(t.expires_at_ms)

    expect_error(grpc.StatusCode.NOT_FOUND, shard.get_session, sid, ns=ns)
    assert listed(shard, ns) == ["bystander"]
    # the sweeper removes the data itself: the node's key count drops by the session's keys
    reclaimed = wait_until(lambda: (s := shard.node_status()).keys <= loaded.keys - n_keys and s)
    assert reclaimed.sessions <= loaded.sessions - 1
    kinds: list[int] = []
    try:
        for resp in watch:
            kinds += [e.type for e in resp.events]
            if types_pb2.SESSION_EXPIRE in kinds:
                break
    finally:
        watch.cancel()
    assert types_pb2.PUT in kinds and types_pb2.APPEND in kinds and types_pb2.TOUCH in kinds
    assert shard.get("bystander", "k", ns=ns).record.value == b"stays"


def test_sweeper_reclaims_expired_keys(swept: Conn) -> None:
    shard = swept
    sid = uid()
    shard.put(sid, "keep", b"k")
    before = shard.node_status()
    for i in range(10):
        shard.put(sid, f"t{i}", b"x", ttl_ms=1500)
    last_write = now_ms()
    # long enough a TTL for these reads to come first even on a busy machine
    assert shard.get_session(sid).session.key_count == 11
    loaded = shard.node_status()
    assert loaded.keys >= before.keys + 10
    sleep_until_ms(last_write + 1500)
    assert scan_keys(shard, sid) == ["keep"]
    wait_until(lambda: shard.node_status().keys <= loaded.keys - 10)
    assert shard.get_session(sid).session.key_count == 1
