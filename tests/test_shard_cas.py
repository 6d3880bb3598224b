"""Compare-and-swap on one real shard: mismatches write nothing, no lost update under 16 writers,
and versions that never repeat for a key across delete and recreate.
"""

from __future__ import annotations

import threading
import time

import grpc

from tests.stubs import CALL_TIMEOUT_S, Conn, shard_fixture, state_pb2, uid

shard = shard_fixture("s1")
T = CALL_TIMEOUT_S


def test_create_only_put(shard: Conn) -> None:
    sid = uid()
    first = shard.put(sid, "k", b"one", expected_version=0)
    assert first.applied and first.version > 0
    second = shard.put(sid, "k", b"two", expected_version=0)
    assert not second.applied and second.version == 0
    assert second.current.version == first.version and second.current.value == b"one"
    g = shard.get(sid, "k")
    assert (g.record.value, g.record.version) == (b"one", first.version)


def test_cas_mismatch_returns_current_and_writes_nothing(shard: Conn) -> None:
    sid = uid()
    v1 = shard.put(sid, "k", b"one").version
    v2 = shard.put(sid, "k", b"two").version
    before = shard.get_session(sid).session
    stale = shard.put(sid, "k", b"three", expected_version=v1)
    assert not stale.applied
    assert (
        stale.current.key == "k" and stale.current.value == b"two" and stale.current.version == v2
    )
    g = shard.get(sid, "k")
    assert (g.record.value, g.record.version) == (b"two", v2)
    after = shard.get_session(sid).session
    assert after.max_version == before.max_version  # not even a revision was spent on the key
    ok = shard.put(sid, "k", b"three", expected_version=v2)
    assert ok.applied and ok.version > v2
    assert shard.get(sid, "k").record.value == b"three"


def test_cas_on_absent_key_with_a_version_is_not_applied(shard: Conn) -> None:
    sid = uid()
    resp = shard.put(sid, "k", b"x", expected_version=5)
    assert not resp.applied and not resp.HasField("current")
    assert not shard.get(sid, "k").found


def test_unconditional_put_is_not_cas(shard: Conn) -> None:
    sid = uid()
    shard.put(sid, "k", b"a")
    # expected_version unset (proto3 optional) must not be read as "create only"
    assert shard.put(sid, "k", b"b").applied
    assert shard.get(sid, "k").record.value == b"b"


def test_version_never_repeats_after_delete_and_recreate(shard: Conn) -> None:
    sid = uid()
    seen: list[int] = []
    for i in range(5):
        p = shard.put(sid, "k", str(i).encode(), expected_version=0)
        assert p.applied
        seen.append(p.version)
        r = shard.state.Delete(state_pb2.DeleteRequest(session_id=sid, key="k"), timeout=T)
        assert r.existed
        seen.append(r.revision)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    # and a recreated key's create_version is the new incarnation's
    p = shard.put(sid, "k", b"last")
    assert p.version > seen[-1]
    assert shard.get(sid, "k").record.create_version == p.version


def test_no_lost_update_with_16_concurrent_cas_loops(shard: Conn) -> None:
    sid = uid()
    workers, run_s = 16, 3.0
    applied = [0] * workers
    conflicts = [0] * workers
    versions: list[list[int]] = [[] for _ in range(workers)]
    failures: list[BaseException] = []
    stop = threading.Event()
    # several channels, so the server sees independent HTTP/2 connections as well as streams
    channels = [grpc.insecure_channel(shard.proc.address) for _ in range(4)]

    def loop(i: int) -> None:
        from shardstate.v1 import state_pb2_grpc

        stub = state_pb2_grpc.StateStub(channels[i % len(channels)])
        try:
            while not stop.is_set():
                g = stub.Get(state_pb2.GetRequest(session_id=sid, key="n"), timeout=T)
                n = int(g.record.value) if g.found else 0
                ver = g.record.version if g.found else 0
                p = stub.Put(
                    state_pb2.PutRequest(
                        session_id=sid, key="n", value=str(n + 1).encode(), expected_version=ver
                    ),
                    timeout=T,
                )
                if p.applied:
                    applied[i] += 1
                    versions[i].append(p.version)
                else:
                    conflicts[i] += 1
                    assert p.current.version != ver
        except BaseException as e:  # surfaced in the main thread
            failures.append(e)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    time.sleep(run_s)
    stop.set()
    for t in threads:
        t.join(60)
    for ch in channels:
        ch.close()
    assert not failures, failures[:3]
    total = sum(applied)
    g = shard.get(sid, "n")
    assert total > 0
    assert int(g.record.value) == total, (g.record.value, total, sum(conflicts))
    flat = [v for vs in versions for v in vs]
    assert len(set(flat)) == len(flat)  # every applied CAS got its own version
    assert g.record.version == max(flat)
