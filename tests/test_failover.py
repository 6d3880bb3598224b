"""Failover with real processes: kill -9 of a primary while several clients write through a
router, then `promote`. Semi-synchronous: every acknowledged write survives with its version.
Asynchronous: only the unreplicated tail is lost, and every lost acknowledged write is in the
old primary's audit file when it returns as a replica. Versions never repeat after a promotion;
bad admin input changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from shardstate.common.clustermap import ClusterView
from shardstate.v1 import admin_pb2, admin_pb2_grpc, state_pb2, state_pb2_grpc, types_pb2
from tests.faults import linearizability as lin
from tests.procs import Proc, Procs
from tests.replicas import (
    T,
    audit_lines,
    cluster_map,
    dump,
    run_cli,
    status,
    wait_converged,
    wait_for,
)
from tests.stubs import Conn, expect_error

SIDS = [f"fo-{i:02d}" for i in range(50)]


@dataclass
class Acked:
    """What the writers were told: (session, key) -> (version, value) of the last acked write,
    and keys whose last write failed (it may or may not have landed)."""

    writes: dict[tuple[str, str], tuple[int, bytes]] = field(default_factory=dict)
    uncertain: set[tuple[str, str]] = field(default_factory=set)
    all_versions: set[int] = field(default_factory=set)
    count: int = 0


class Writers:
    """Several clients (one channel each) writing through a router on a background thread:
    new keys, and CAS overwrites of their own earlier keys."""

    def __init__(self, router: str, clients: int = 4) -> None:
        self.router = router
        self.clients = clients
        self.acked = Acked()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()

    async def _client(self, n: int) -> None:
        rng = random.Random(n)
        mine: list[tuple[str, str]] = []
        i = 0
        async with grpc.aio.insecure_channel(self.router) as ch:
            stub = state_pb2_grpc.StateStub(ch)
            while not self.stop.is_set():
                i += 1
                if mine and rng.random() < 0.3:
                    sk = rng.choice(mine)
                    if sk in self.acked.uncertain:
                        continue
                    req = state_pb2.PutRequest(session_id=sk[0], key=sk[1], value=b"c%d-%d" % (n, i),
                                               expected_version=self.acked.writes[sk][0])
                else:
                    sk = (rng.choice(SIDS), f"w{n}-{i}")
                    req = state_pb2.PutRequest(session_id=sk[0], key=sk[1], value=b"n%d-%d" % (n, i))
                try:
                    resp = await stub.Put(req, timeout=5)
                except grpc.RpcError:
                    self.acked.uncertain.add(sk)
                    await asyncio.sleep(0.05)
                    continue
                assert resp.applied, resp
                self.acked.writes[sk] = (resp.version, req.value)
                self.acked.all_versions.add(resp.version)
                self.acked.count += 1
                if sk not in mine:
                    mine.append(sk)

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(n) for n in range(self.clients)))

    def wait_acked(self, n: int) -> None:
        wait_for(lambda: self.acked.count >= n, f"{n} acknowledged writes")

    def finish(self) -> Acked:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self.acked


def get(address: str, sid: str, key: str) -> state_pb2.GetResponse:
    with grpc.insecure_channel(address) as ch:
        return state_pb2_grpc.StateStub(ch).Get(state_pb2.GetRequest(session_id=sid, key=key), timeout=T)


def primary_of(address: str, shard: str = "s1") -> str:
    return next(s.primary for s in cluster_map(address).shards if s.id == shard)


def restart_and_promote(replica: Proc, router: Proc) -> tuple[int, admin_pb2.PromoteReplicaResponse]:
    """Start a stopped replica of s1 again (same port and data; it cannot reach its dead
    primary, so it does not report serving) and promote it through the router: (its revision
    before the promotion, the promotion's answer)."""
    replica.start(wait=False)
    before = wait_for(lambda: status(replica.address).revision, "the replica's Admin to answer")
    with grpc.insecure_channel(router.address) as ch:
        resp = admin_pb2_grpc.AdminStub(ch).PromoteReplica(admin_pb2.PromoteReplicaRequest(shard_id="s1"), timeout=60)
    return before, resp


def test_semi_sync_failover_keeps_every_acknowledged_write(procs: Procs) -> None:
    primary = procs.shard("s1", "--min-replica-acks", "1")
    r1 = procs.shard("s1", "--replica-of", primary.address)
    r2 = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, r1.address, r2.address], "--refresh-interval-s", "0.5")
    writers = Writers(router.address)
    writers.wait_acked(300)
    primary.kill()  # kill -9 while the clients write
    time.sleep(0.3)
    acked = writers.finish()

    cli = run_cli("admin", "--router", router.address, "promote", "s1")
    assert cli.returncode == 0, cli.stderr
    new = primary_of(router.address)
    assert new in (r1.address, r2.address) and new in cli.stdout
    other = r2 if new == r1.address else r1

    # Every acknowledged write is on the new primary, with the version it was acknowledged with.
    missing = []
    for (sid, key), (version, value) in acked.writes.items():
        if (sid, key) in acked.uncertain:
            continue
        got = get(new, sid, key)
        if not (got.found and got.record.version == version and got.record.value == value):
            missing.append((sid, key, version, got.record.version))
    assert not missing, missing[:5]

    # Writes continue through the router; CAS on the acknowledged versions still matches, and
    # the new versions are above everything the old primary handed out.
    top = max(acked.all_versions)
    with grpc.insecure_channel(router.address) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        checked = 0
        for (sid, key), (version, _) in list(acked.writes.items())[:50]:
            if (sid, key) in acked.uncertain:
                continue
            resp = stub.Put(state_pb2.PutRequest(session_id=sid, key=key, value=b"after", expected_version=version), timeout=T)
            assert resp.applied and resp.version > top and resp.version not in acked.all_versions
            checked += 1
        assert checked > 0
        fresh = stub.Put(state_pb2.PutRequest(session_id="after-failover", key="k", value=b"v"), timeout=T)
        assert fresh.applied and fresh.header.node == new

    # The other replica follows the new primary.
    wait_for(lambda: status(other.address).primary == new, "the other replica to follow the new primary")
    wait_converged(new, other.address)
    with grpc.insecure_channel(other.address) as ch:
        ev = state_pb2_grpc.StateStub(ch).Get(state_pb2.GetRequest(
            session_id="after-failover", key="k", consistency=types_pb2.EVENTUAL), timeout=T)
    assert ev.record.version == fresh.version


def test_async_failover_loses_only_the_tail_and_audits_it(procs: Procs) -> None:
    primary = procs.shard("s1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, replica.address], "--refresh-interval-s", "0.5")
    writers = Writers(router.address, clients=3)
    writers.wait_acked(150)
    replica.kill()  # from here on, acknowledged writes exist only on the primary
    n = writers.acked.count
    writers.wait_acked(n + 100)
    primary.kill()
    time.sleep(0.2)
    acked = writers.finish()

    fork, resp = restart_and_promote(replica, router)
    assert resp.new_primary == replica.address and resp.revision > fork
    replica.wait_ready()  # a primary now: serving

    lost: dict[tuple[str, str], int] = {}
    for (sid, key), (version, value) in acked.writes.items():
        got = get(replica.address, sid, key)
        if not (got.found and got.record.version == version and got.record.value == value):
            lost[(sid, key)] = version
    assert len(lost) >= 50  # the writes acknowledged while the replica was down
    # At most the unreplicated tail: every lost write came after what the replica had applied.
    assert set(lost) == {sk for sk, (v, _) in acked.writes.items() if v > fork}

    # Versions never repeat: rewriting every lost key on the new primary gives new versions
    # above everything the old primary acknowledged.
    top = max(acked.all_versions)
    with grpc.insecure_channel(router.address) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        for sid, key in lost:
            put = stub.Put(state_pb2.PutRequest(session_id=sid, key=key, value=b"rewritten"), timeout=T)
            assert put.applied and put.version > top and put.version not in acked.all_versions

    # The old primary returns: it sees the newer map, sets aside what the new primary never
    # received, resyncs, and follows.
    primary.start()
    st = wait_for(lambda: (s := status(primary.address)).role == admin_pb2.REPLICA and s, "the old primary to rejoin")
    assert st.primary == replica.address
    audit = primary.data_dir / "diverged-writes.jsonl"  # type: ignore[attr-defined]
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    writes = [x for x in lines if x.get("kind") == "diverged"]  # not the reconciled lines
    in_audit = {(x["session"], x["revision"]): x for x in writes}
    for (sid, key), version in lost.items():
        line = in_audit.get((sid, version))
        assert line is not None, (sid, key, version)
        assert any(ev.get("record", {}).get("key") == key for ev in line["events"])
    assert status(primary.address).diverged_writes == len(writes) >= len(lost)
    wait_converged(replica.address, primary.address)
    sids = sorted({sid for sid, _ in lost})
    assert dump(primary.address, sids, consistency=types_pb2.EVENTUAL) == dump(replica.address, sids)
    # ... and the new primary records it as its replica; the router sees it.
    wait_for(lambda: primary.address in cluster_map(router.address).shards[0].replicas,
             "the returned node in the map as a replica")


def test_bad_promote_input_gets_a_clear_error_and_changes_nothing(procs: Procs) -> None:
    p1 = procs.shard("s1")
    r1 = procs.shard("s1", "--replica-of", p1.address)
    p2 = procs.shard("s2")
    router = procs.router([p1.address, r1.address, p2.address])
    before = cluster_map(router.address)

    def promote(shard: str, replica: str = "") -> grpc.RpcError:
        with grpc.insecure_channel(router.address) as ch, pytest.raises(grpc.RpcError) as ei:
            admin_pb2_grpc.AdminStub(ch).PromoteReplica(
                admin_pb2.PromoteReplicaRequest(shard_id=shard, replica=replica), timeout=T)
        return ei.value

    e = promote("nope")
    assert e.code() == grpc.StatusCode.NOT_FOUND and "nope" in (e.details() or "")
    e = promote("s1", p2.address)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a replica of shard s1" in (e.details() or "")
    e = promote("s1", p1.address)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "already the primary" in (e.details() or "")
    e = promote("s2")
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "no replica" in (e.details() or "")
    e = promote("")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A shard told to promote for another shard refuses too.
    with grpc.insecure_channel(r1.address) as ch, pytest.raises(grpc.RpcError) as ei:
        admin_pb2_grpc.AdminStub(ch).PromoteReplica(admin_pb2.PromoteReplicaRequest(shard_id="s2"), timeout=T)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    cli = run_cli("admin", "--router", router.address, "promote", "s9")
    assert cli.returncode == 1 and "NOT_FOUND" in cli.stderr and "s9" in cli.stderr

    assert cluster_map(router.address) == before
    assert cluster_map(p1.address) == before
    assert status(p1.address).role == admin_pb2.PRIMARY
    assert status(r1.address).role == admin_pb2.REPLICA


def test_router_with_a_stale_map_follows_not_primary_after_a_switchover(procs: Procs) -> None:
    primary = procs.shard("s1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    a = procs.router([primary.address, replica.address])
    b = procs.router([primary.address, replica.address], "--refresh-interval-s", "600")
    with grpc.insecure_channel(b.address) as ch:
        first = state_pb2_grpc.StateStub(ch).Put(state_pb2.PutRequest(session_id="x", key="k", value=b"1"), timeout=T)
    wait_converged(primary.address, replica.address)
    # Planned switchover through router a, the old primary alive: it becomes a replica.
    with grpc.insecure_channel(a.address) as ch:
        admin_pb2_grpc.AdminStub(ch).PromoteReplica(
            admin_pb2.PromoteReplicaRequest(shard_id="s1", replica=replica.address), timeout=60)
    wait_for(lambda: status(primary.address).role == admin_pb2.REPLICA, "the old primary to follow")
    assert primary_of(b.address) == primary.address  # b still holds the old map
    # b sends the write to the old primary, gets NotPrimary, refreshes, and retries: no error.
    with grpc.insecure_channel(b.address) as ch:
        put = state_pb2_grpc.StateStub(ch).Put(
            state_pb2.PutRequest(session_id="x", key="k", value=b"2", expected_version=first.version), timeout=T)
    assert put.applied and put.header.node == replica.address and put.version > first.version
    assert primary_of(b.address) == replica.address
    wait_converged(replica.address, primary.address)
    assert status(primary.address).diverged_writes == 0  # nothing was written past the fork


def test_async_failover_reuses_seqs_and_counter_values_and_the_audit_says_which(procs: Procs) -> None:
    """README: in asynchronous mode the seqs and counter values of lost writes are handed out
    again; the audit file names each one and whether the new primary reused it."""
    primary = procs.shard("s1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, replica.address], "--refresh-interval-s", "0.5")
    p = Conn(primary)
    for i in range(3):
        p.state.Increment(state_pb2.IncrementRequest(session_id="a", key="n", delta=1), timeout=T)
        p.append("a", "log", b"kept-%d" % i)
    wait_converged(primary.address, replica.address)
    replica.kill()
    lost_incr = [p.state.Increment(state_pb2.IncrementRequest(session_id="a", key="n", delta=1, request_id=f"r{i}"),
                                   timeout=T).value for i in range(2)]
    lost_seqs = [p.append("a", "log", b"lost-%d" % i).seqs[0] for i in range(2)]
    assert (lost_incr, lost_seqs) == ([4, 5], [4, 5])
    p.close()
    primary.kill()

    restart_and_promote(replica, router)
    replica.wait_ready()
    n = Conn(replica)
    # The new primary hands out counter value 4 and seq 4 again, for other writes.
    assert n.state.Increment(state_pb2.IncrementRequest(session_id="a", key="n", delta=1), timeout=T).value == 4
    assert list(n.append("a", "log", b"new-0").seqs) == [4]
    n.close()

    primary.start()
    wait_for(lambda: any(x.get("kind") == "reconcile_summary" for x in audit_lines(primary)),
             "the returned primary to reconcile its diverged writes")
    lines = audit_lines(primary)
    diverged = [x for x in lines if x.get("kind") == "diverged"]
    assert [x["seqs"] for x in diverged if x["seqs"]] == [[{"stream": "log", "seq": 4}], [{"stream": "log", "seq": 5}]]
    assert [k["counter"] for x in diverged for k in x["keys"] if k["key"] == "n"] == [4, 5]
    assert [rid for x in diverged for rid in x["request_ids"]] == ["r0", "r1"]
    rec = {x["revision"]: x for x in lines if x.get("kind") == "reconciled"}
    assert set(rec) == {x["revision"] for x in diverged}
    seqs = {s["seq"]: s for x in rec.values() for s in x["seqs"]}
    assert seqs[4] == {"stream": "log", "seq": 4, "reused": True, "same_data": False, "next_seq": 5}
    assert seqs[5] == {"stream": "log", "seq": 5, "reused": False, "same_data": None, "next_seq": 5}
    keys = [k for x in rec.values() for k in x["keys"]]
    assert [(k["lost_counter"], k["counter"], k["same_value"]) for k in keys] == [(4, 4, True), (5, 4, False)]
    assert not any(x["retried"] for x in rec.values())
    summary = next(x for x in lines if x.get("kind") == "reconcile_summary")
    assert {k: summary[k] for k in ("writes", "seqs", "seqs_reused", "seqs_reused_other_data", "counters_reused")} == {
        "writes": 4, "seqs": 2, "seqs_reused": 1, "seqs_reused_other_data": 1, "counters_reused": 1}
    assert status(primary.address).diverged_writes == 4


def test_semi_sync_strong_read_never_shows_a_write_a_failover_can_lose(procs: Procs) -> None:
    """A read must not return a version that a later read, after kill -9 + promote, does not
    see (tests/faults/linearizability.py: read_regress)."""
    primary = procs.shard("s1", "--min-replica-acks", "1", "--replica-ack-timeout-s", "1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, replica.address])
    p = Conn(primary)
    t0 = time.monotonic()
    v1 = p.put("a", "k", b"1").version
    history = [lin.Op(0, lin.WRITE, "k", t0, time.monotonic(), lin.OK, written=v1)]
    wait_converged(primary.address, replica.address)
    replica.kill()  # the next write waits for an ack that cannot come, and times out
    t_w = time.monotonic()
    expect_error(grpc.StatusCode.UNAVAILABLE, p.put, "a", "k", b"2", expected_version=v1)
    history.append(lin.Op(0, lin.CAS, "k", t_w, time.monotonic(), lin.UNKNOWN, expected=v1))
    t1 = time.monotonic()
    try:
        seen = lin.Op(1, lin.READ, "k", t1, time.monotonic(), lin.OK, read=p.get("a", "k").record.version)
    except grpc.RpcError:  # the fix: the read waits for the same acks and fails like the write
        seen = lin.Op(1, lin.READ, "k", t1, time.monotonic(), lin.UNKNOWN)
    history.append(seen)
    primary.kill()
    restart_and_promote(replica, router)
    replica.wait_ready()
    t2 = time.monotonic()
    after = get(replica.address, "a", "k")
    history.append(lin.Op(1, lin.READ, "k", t2, time.monotonic(), lin.OK, read=after.record.version))
    p.close()
    assert lin.check(history) == []


def test_semi_sync_failover_hands_out_no_acknowledged_seq_or_counter_value_again(procs: Procs) -> None:
    primary = procs.shard("s1", "--min-replica-acks", "1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, replica.address])
    p = Conn(primary)
    values = [p.state.Increment(state_pb2.IncrementRequest(session_id="a", key="n", delta=1), timeout=T).value
              for _ in range(5)]
    seqs = [p.append("a", "log", b"x%d" % i).seqs[0] for i in range(5)]
    p.close()
    primary.kill()  # no wait for the replica: every acknowledged write is on it already
    with grpc.insecure_channel(router.address) as ch:
        admin_pb2_grpc.AdminStub(ch).PromoteReplica(admin_pb2.PromoteReplicaRequest(shard_id="s1"), timeout=60)
    replica.wait_ready()
    n = Conn(replica)
    assert (values, seqs) == ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])
    assert n.state.Increment(state_pb2.IncrementRequest(session_id="a", key="n", delta=1), timeout=T).value == 6
    assert list(n.append("a", "log", b"after").seqs) == [6]
    n.close()


def test_promote_again_finishes_a_promotion_whose_map_change_failed(procs: Procs) -> None:
    """While the keeper shard's primary is down no map change goes through: a promote then
    promotes the replica but cannot name it in the map (UNAVAILABLE). Once the keeper is back,
    the same promote finishes the job: the map names the node promoted first (the only one
    holding that shard's writes since), and writes through the router reach it."""
    p1 = procs.shard("s1")
    p2 = procs.shard("s2")
    r2 = procs.shard("s2", "--replica-of", p2.address)
    router = procs.router([p1.address, p2.address, r2.address])
    wait_for(lambda: primary_of(router.address, "s2") == p2.address, "the map naming s2's primary")
    view = ClusterView.of(cluster_map(router.address))
    sid = next(s for s in SIDS if view.owner("default", s).id == "s2")
    with grpc.insecure_channel(router.address) as ch:
        first = state_pb2_grpc.StateStub(ch).Put(state_pb2.PutRequest(session_id=sid, key="k", value=b"1"), timeout=T)
    wait_converged(p2.address, r2.address)
    p1.kill()
    p2.kill()

    def promote() -> admin_pb2.PromoteReplicaResponse:
        with grpc.insecure_channel(router.address) as ch:
            return admin_pb2_grpc.AdminStub(ch).PromoteReplica(admin_pb2.PromoteReplicaRequest(shard_id="s2"), timeout=60)

    with pytest.raises(grpc.RpcError) as ei:
        promote()
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
    p1.start()

    def again() -> admin_pb2.PromoteReplicaResponse | None:
        try:
            return promote()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:  # the router may still back off from the keeper
                raise AssertionError(f"promote refused: {e.code()} {e.details()}") from None
            return None

    resp = wait_for(again, "the promote to go through once the keeper is back")
    assert resp.new_primary == r2.address
    assert primary_of(router.address, "s2") == r2.address
    with grpc.insecure_channel(router.address) as ch:
        put = state_pb2_grpc.StateStub(ch).Put(
            state_pb2.PutRequest(session_id=sid, key="k", value=b"2", expected_version=first.version), timeout=T)
    assert put.applied and put.header.node == r2.address and put.version > first.version
    assert "promote again" in (ei.value.details() or "")  # the first error said what to do


def test_a_primary_frozen_through_its_replacement_becomes_a_replica_when_it_resumes(procs: Procs) -> None:
    """The old primary learns the newer map even when it never restarts (SIGSTOP, a long
    pause or a partition through the promotion, so it missed the map's publication): it
    follows the new primary and sets aside what only it holds, instead of staying a primary
    that a stale router or client can still write to."""
    primary = procs.shard("s1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, replica.address])
    wait_for(lambda: cluster_map(router.address).epoch and list(cluster_map(router.address).shards[0].replicas)
             == [replica.address], "the map listing the replica")
    p = Conn(primary)
    p.put("a", "k", b"1")
    wait_converged(primary.address, replica.address)
    primary.popen.send_signal(signal.SIGSTOP)
    try:
        with grpc.insecure_channel(router.address) as ch:
            admin_pb2_grpc.AdminStub(ch).PromoteReplica(admin_pb2.PromoteReplicaRequest(shard_id="s1"), timeout=60)
    finally:
        primary.popen.send_signal(signal.SIGCONT)
    assert primary_of(router.address) == replica.address
    wait_for(lambda: status(primary.address).role == admin_pb2.REPLICA, "the old primary to become a replica")
    assert status(primary.address).primary == replica.address
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, p.put, "a", "k", b"2")
    p.close()
