"""Pure logic of replication: the divergence check on timelines, the hand-built leader
messages, semi-sync ack waiting, the promoted map, and which router reads a replica may serve."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shardstate.common import errors
from shardstate.router.failover import promoted_map
from shardstate.router.replicas import ReplicaPicker, relaxed_read
from shardstate.server.config import ShardConfig
from shardstate.server.replication import audit, timeline, wire
from shardstate.server.replication.acks import AckTracker
from shardstate.server.storage import changelog
from shardstate.server.storage import encoding as enc
from shardstate.server.storage.commit import Pending
from shardstate.server.storage.engine import Engine
from shardstate.v1 import admin_pb2, replication_pb2, state_pb2, types_pb2


def tl(*terms: tuple[str, int]) -> replication_pb2.Timeline:
    return replication_pb2.Timeline(terms=[replication_pb2.Term(id=i, start_revision=s) for i, s in terms])


def test_fork_point() -> None:
    leader = tl(("t0", 0), ("t1", 100), ("t2", 250))
    assert timeline.fork_point(leader, "t2", 300) is None  # same term as the leader
    assert timeline.fork_point(leader, "t0", 90) is None  # a prefix of t0, which ended at 100
    assert timeline.fork_point(leader, "t0", 100) is None
    assert timeline.fork_point(leader, "t0", 120) == 100  # old primary kept writing after 100
    assert timeline.fork_point(leader, "t1", 260) == 250
    assert timeline.fork_point(leader, "t9", 5) == 0  # unknown history: nothing is trusted
    assert timeline.fork_point(leader, "", 50) is None  # no history claimed (fresh follower)
    assert timeline.fork_point(leader, "t0", 0) is None  # nothing held


def test_new_term_appends() -> None:
    t = timeline.new_term(tl(("t0", 0)), epoch=3, start_revision=42)
    assert [x.start_revision for x in t.terms] == [0, 42]
    assert t.terms[1].id.startswith("e3-") and timeline.tail(t) == t.terms[1].id


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**35, 2**63 + 5])
def test_varint_matches_protobuf(n: int) -> None:
    assert replication_pb2.FollowAck.FromString(b"\x08" + wire.varint(n)).applied_revision == n


def test_hand_built_leader_messages_parse() -> None:
    e1 = replication_pb2.ChangeEntry(revision=7, namespace="default", session_id="a", ts_ms=5,
                                     ops=[replication_pb2.RawOp(key=b"k", value=b"v")])
    e2 = replication_pb2.ChangeEntry(revision=9, ops=[replication_pb2.RawOp(key=b"x", delete=True)])
    body = wire.change_batch([e1.SerializeToString(), e2.SerializeToString()], 9, 1234, backlog=3)
    msg = replication_pb2.LeaderMessage.FromString(wire.leader_message(wire.CHANGES, body, epoch=4))
    assert msg.WhichOneof("msg") == "changes" and msg.epoch == 4
    assert list(msg.changes.entries) == [e1, e2]
    assert (msg.changes.leader_revision, msg.changes.leader_ts_ms, msg.changes.backlog) == (9, 1234, 3)
    hb = replication_pb2.LeaderMessage.FromString(
        wire.leader_message(wire.HEARTBEAT, wire.change_batch((), 11, 0), epoch=0))
    assert hb.WhichOneof("msg") == "heartbeat" and hb.heartbeat.leader_revision == 11 and not hb.heartbeat.entries
    # The follower's view of the same bytes: entries raw, each decodable as ChangeEntryOps.
    raw = replication_pb2.LeaderMessageRaw.FromString(wire.leader_message(wire.CHANGES, body, epoch=4))
    assert list(raw.changes.entries) == [e1.SerializeToString(), e2.SerializeToString()]
    assert (raw.epoch, raw.changes.leader_revision, raw.changes.backlog) == (4, 9, 3)
    ops = replication_pb2.ChangeEntryOps.FromString(raw.changes.entries[0])
    assert (ops.revision, ops.ts_ms, list(ops.ops)) == (7, 5, list(e1.ops))


def test_replica_applies_raw_entries_and_keeps_its_meta_cache_right(tmp_path: Path) -> None:
    async def run() -> None:
        primary = Engine(ShardConfig(id="s1", data_dir=str(tmp_path / "p")))
        replica = Engine(ShardConfig(id="s1", data_dir=str(tmp_path / "r")))
        try:
            await primary.put(state_pb2.PutRequest(session_id="a", key="k", value=b"v1"))
            await primary.put(state_pb2.PutRequest(session_id="b", key="k", value=b"v1"))
            raws = [v for _, v in primary.changes_since_raw(0, 100)]
            assert await replica.apply_changes(raws) == primary.revision()
            assert await replica.apply_changes(raws) == primary.revision()  # re-sent: skipped
            assert [v for _, v in replica.changes_since_raw(0, 100)] == raws  # stored verbatim
            get = state_pb2.GetSessionRequest(session_id="a")
            assert replica.get_session(get).session == primary.get_session(get).session  # now cached
            await primary.put(state_pb2.PutRequest(session_id="a", key="k2", value=b"v2", ttl_ms=60_000))
            await primary.put(state_pb2.PutRequest(session_id="b", key="k2", value=b"v2", ttl_ms=60_000))
            await replica.apply_changes([v for _, v in primary.changes_since_raw(0, 100)])
            for sid in ("a", "b"):
                get = state_pb2.GetSessionRequest(session_id=sid)
                assert replica.get_session(get).session == primary.get_session(get).session
            # One batch deleting a session and creating it again, the meta cache cold for it.
            start = primary.revision() + 1
            await primary.delete_session(state_pb2.DeleteSessionRequest(session_id="c"))
            await primary.put(state_pb2.PutRequest(session_id="c", key="k", value=b"v1"))
            await primary.delete_session(state_pb2.DeleteSessionRequest(session_id="c"))
            await primary.put(state_pb2.PutRequest(session_id="c", key="k", value=b"v3"))
            await replica.apply_changes([v for _, v in primary.changes_since_raw(start, 100)])
            get = state_pb2.GetSessionRequest(session_id="c")
            assert replica.get_session(get).session == primary.get_session(get).session
            assert replica.get(state_pb2.GetRequest(session_id="c", key="k")).record.value == b"v3"
        finally:
            await primary.close()
            await replica.close()

    asyncio.run(run())


def test_acks_release_waiters_in_revision_order() -> None:
    async def run() -> None:
        acks = AckTracker(need=2, timeout_s=5)
        w10 = asyncio.create_task(acks.wait(10))
        w20 = asyncio.create_task(acks.wait(20))
        await asyncio.sleep(0)
        acks.ack("r1", 25)
        await asyncio.sleep(0.05)
        assert not w10.done()  # one replica is not two
        acks.ack("r2", 15)
        await asyncio.wait_for(w10, 1)
        await asyncio.sleep(0.05)
        assert not w20.done()
        acks.ack("r2", 20)
        await asyncio.wait_for(w20, 1)
        acks.ack("r2", 5)  # acks never go back
        assert acks.satisfied() == 20
        await acks.wait(20)  # already there: no wait

    asyncio.run(run())


def test_acks_time_out_and_fail_clearly() -> None:
    async def run() -> None:
        acks = AckTracker(need=1, timeout_s=0.05)
        with pytest.raises(errors.UnavailableError, match="durable on the primary"):
            await acks.wait(3)
        acks2 = AckTracker(need=1, timeout_s=5)
        w = asyncio.create_task(acks2.wait(3))
        await asyncio.sleep(0)
        acks2.fail_all("demoted")
        with pytest.raises(errors.UnavailableError, match="demoted"):
            await w
        await AckTracker(need=0, timeout_s=0).wait(99)  # asynchronous mode never waits

    asyncio.run(run())


def test_promoted_map() -> None:
    pb = admin_pb2.ClusterMap(epoch=4, cluster_id="c")
    pb.shards.add(id="s1", primary="a:1", replicas=["b:1", "c:1"], weight=1)
    pb.shards.add(id="s2", primary="d:1", replicas=["e:1"], weight=2)
    out = promoted_map(pb, "s1", "c:1")
    assert out.epoch == 5 and out.cluster_id == "c"
    assert (out.shards[0].primary, list(out.shards[0].replicas)) == ("c:1", ["b:1"])
    assert out.shards[1] == pb.shards[1]
    assert pb.epoch == 4 and pb.shards[0].primary == "a:1"  # the input is untouched


def test_relaxed_reads_and_replica_choice() -> None:
    get = state_pb2.GetRequest(session_id="a", key="k")
    assert not relaxed_read("Get", get.SerializeToString())
    get.consistency = types_pb2.EVENTUAL
    assert relaxed_read("Get", get.SerializeToString())
    get.consistency = types_pb2.STRONG
    get.min_revision = 5
    assert not relaxed_read("Get", get.SerializeToString())  # STRONG wins
    get.consistency = types_pb2.CONSISTENCY_UNSPECIFIED
    assert relaxed_read("Get", get.SerializeToString())
    assert relaxed_read("Scan", state_pb2.ScanRequest(session_id="a", min_revision=1).SerializeToString())
    assert not relaxed_read("Put", state_pb2.PutRequest(session_id="a").SerializeToString())
    assert not relaxed_read("Get", b"\xff\xff")

    shard = admin_pb2.ShardInfo(id="s1", primary="p", replicas=["r1", "r2"])
    picker = ReplicaPicker()
    assert {picker.pick(shard) for _ in range(4)} == {"r1", "r2"}
    picker.failed("r1")
    assert {picker.pick(shard) for _ in range(4)} == {"r2"}
    picker.failed("r2")
    assert picker.pick(shard) is None
    assert picker.pick(admin_pb2.ShardInfo(id="s2", primary="p")) is None


def test_change_tail_serves_what_leveldb_holds_and_falls_back(tmp_path: Path) -> None:
    async def run() -> None:
        e = Engine(ShardConfig(id="s1", data_dir=str(tmp_path / "p")))
        try:
            await e.put(state_pb2.PutRequest(session_id="a", key="k", value=b"before"))
            before = e.revision()
            changelog.keep_tail(e.store, True)
            tail = e.store.tail
            assert tail is not None and tail.start == before + 1
            for i in range(50):
                await e.put(state_pb2.PutRequest(session_id=f"s{i % 7}", key="k", value=b"v" * 300))
            from_disk = list(e.store.db.iterator(start=enc.change_key(0), stop=enc.prefix_end(enc.CHANGE)))
            everything = [(enc.revision_of_change_key(k), v) for k, v in from_disk]
            assert changelog.changes_since_raw(e.store, 0, 1000) == everything  # before the tail: LevelDB
            assert tail.since(before, 10) is None
            for i in (1, 20, 49, 50):
                rev = everything[i][0]
                assert tail.since(rev, 7) == everything[i:i + 7]
                assert changelog.changes_since_raw(e.store, rev, 7) == everything[i:i + 7]
            assert tail.since(e.revision() + 1, 10) == []
            # Bounded: the oldest go, and the tail says from where it is complete.
            tail.max_bytes = 3000
            await e.put(state_pb2.PutRequest(session_id="b", key="k", value=b"w" * 300))
            everything = [(r, v) for r, v in changelog.changes_since_raw(e.store, 0, 1000)]
            assert tail.size <= 3000 and tail.start > everything[1][0]
            assert tail.since(tail.start, 1000) == [x for x in everything if x[0] >= tail.start]
            # Out of order (never expected): it starts over above both.
            last = tail.items[-1][0]
            tail.add(Pending(last - 1, [(enc.change_key(last - 1), b"x"), (b"_", b"")]))
            assert tail.start == last + 1 and tail.items == [] and tail.since(last, 1) is None
            changelog.keep_tail(e.store, False)
            assert e.store.tail is None
        finally:
            await e.close()

    asyncio.run(run())


def test_audit_summary_names_seqs_keys_counters_and_request_ids() -> None:
    e = replication_pb2.ChangeEntry(revision=7, namespace="ns", session_id="s", events=[
        types_pb2.Event(type=types_pb2.APPEND, stream="log", entries=[types_pb2.LogEntry(seq=4), types_pb2.LogEntry(seq=5)]),
        types_pb2.Event(type=types_pb2.PUT, record=types_pb2.Record(key="n", value=b"-12", version=7)),
        types_pb2.Event(type=types_pb2.PUT, record=types_pb2.Record(key="blob", value=b"\xff12", version=7)),
        types_pb2.Event(type=types_pb2.PUT, record=types_pb2.Record(key="big", value=b"9" * 30, version=7)),
        types_pb2.Event(type=types_pb2.DELETE, record=types_pb2.Record(key="gone", version=7)),
    ], ops=[
        replication_pb2.RawOp(key=enc.idempotency_key(b"ns", b"s", b"req-1"), value=b"x"),
        replication_pb2.RawOp(key=enc.idempotency_key(b"ns", b"s", b"old"), delete=True),
        replication_pb2.RawOp(key=enc.data_key(b"ns", b"s", b"n"), value=b"x"),
    ])
    assert audit.summary(e) == {
        "seqs": [{"stream": "log", "seq": 4}, {"stream": "log", "seq": 5}],
        "keys": [{"key": "n", "version": 7, "counter": -12}, {"key": "blob", "version": 7},
                 {"key": "big", "version": 7}, {"key": "gone", "version": 7, "deleted": True}],
        "request_ids": ["req-1"],
    }
