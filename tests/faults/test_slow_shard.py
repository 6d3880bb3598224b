"""A slow or stopped shard does not stall the others behind one AsyncClient (issue 13, defect 4).

Two shards behind a router; s1 is semi-sync (--min-replica-acks 1) with one replica, s2 is
asynchronous without one. Writers on sessions of both shards share ONE AsyncClient, batching
on (the default), so single ops to both shards ride in the same batches. Then s1 stops
answering writes: (a) its replica is killed (every write waits for an ack that cannot come),
(b) its primary is SIGSTOPped, (c) its replica is SIGSTOPped. During the fault s2's writes
must keep completing, none of s2's callers sees an error; after the replica restarts or the
process is SIGCONTed, s1's writes complete too, and every acknowledged write reads back.
Counts only, never durations.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import grpc
import pytest

from shardstate import AsyncClient, Client, ConstantBackoff, Retry
from shardstate.common.clustermap import ClusterView
from shardstate.v1 import admin_pb2, admin_pb2_grpc
from tests.faults.report import Tally, fault_line
from tests.procs import Proc, Procs

WRITERS = 4  # per shard
WARM_ACKS = 100  # per shard, before the fault
FAULT_ACKS = 100  # s2 acks that end the fault window early
# The fault window's cap (a bound on the load, never asserted); it usually ends at FAULT_ACKS.
# A stop longer than the follower's watchdog (DEAD_AFTER_S) is tests/faults/test_replica.py's.
FAULT_WINDOW_S = 2.0
RECOVER_ACKS = 20  # s1 acks after recovery that end the scenario
RECOVER_CAP_S = 90.0
PATIENT = Retry(attempts=1000, backoff=ConstantBackoff(0.1))
T = 30.0


class Cluster:
    def __init__(self, procs: Procs) -> None:
        # The ack timeout outlasts the scenario: s1's writes wait through the fault rather than fail.
        self.s1 = procs.shard("s1", "--min-replica-acks", "1", "--replica-ack-timeout-s", "120")
        self.r1 = procs.shard("s1", "--replica-of", self.s1.address)
        self.s2 = procs.shard("s2")
        self.router = procs.router([self.s1.address, self.s2.address])
        with grpc.insecure_channel(self.router.address) as ch:
            view = ClusterView.of(admin_pb2_grpc.AdminStub(ch).GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T))
        self.sessions: dict[str, list[str]] = {"s1": [], "s2": []}
        i = 0
        while min(len(v) for v in self.sessions.values()) < WRITERS:
            sid = f"slow-{i}"
            i += 1
            owned = self.sessions[view.ring.owner("default", sid)]
            if len(owned) < WRITERS:
                owned.append(sid)


class Load:
    """WRITERS writers per shard through one AsyncClient: each puts k0, k1, ... on its session."""

    def __init__(self, client: AsyncClient, sessions: dict[str, list[str]]) -> None:
        self.client = client
        self.sessions = sessions
        self.acked: dict[str, list[tuple[str, str, bytes]]] = {"s1": [], "s2": []}
        self.errors: dict[str, list[str]] = {"s1": [], "s2": []}
        self.stop = asyncio.Event()
        self.tasks = [asyncio.ensure_future(self._write(shard, sid))
                      for shard, sids in sessions.items() for sid in sids]

    async def _write(self, shard: str, sid: str) -> None:
        s = self.client.session(sid)
        n = 0
        while not self.stop.is_set() and n < 100_000:
            key, value = f"k{n}", f"{sid}/{n}".encode()
            try:
                await s.put(key, value)
            except Exception as e:  # every error a caller sees is counted
                self.errors[shard].append(repr(e))
                await asyncio.sleep(0.05)
                continue
            self.acked[shard].append((sid, key, value))
            n += 1

    def count(self, shard: str) -> int:
        return len(self.acked[shard])

    async def until(self, cond: Callable[[], bool], cap_s: float) -> None:
        deadline = time.monotonic() + cap_s
        while not cond() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 120)


def lost_writes(router: str, acked: list[tuple[str, str, bytes]]) -> int:
    with Client(router, timeout=T, retry=PATIENT) as c:
        return sum(1 for sid, key, value in acked
                   if (rec := c.session(sid).get(key, consistency="strong")) is None or rec.value != value)


def scenario(procs: Procs, name: str, fault: Callable[[Cluster], Proc], recover: Callable[[Proc], None]) -> None:
    cl = Cluster(procs)

    async def main() -> tuple[int, int, Load]:
        async with AsyncClient(cl.router.address, timeout=120, retry=PATIENT) as c:
            load = Load(c, cl.sessions)
            await load.until(lambda: min(load.count("s1"), load.count("s2")) >= WARM_ACKS, 60)
            assert min(load.count("s1"), load.count("s2")) >= WARM_ACKS, (load.acked.keys(), load.errors)
            hit = fault(cl)
            s2_before = load.count("s2")
            await load.until(lambda: load.count("s2") - s2_before >= FAULT_ACKS, FAULT_WINDOW_S)
            s2_during = load.count("s2") - s2_before
            recover(hit)
            s1_after = load.count("s1")
            await load.until(lambda: load.count("s1") - s1_after >= RECOVER_ACKS, RECOVER_CAP_S)
            s1_recovered = load.count("s1") - s1_after
            await load.finish()
            return s2_during, s1_recovered, load

    s2_during, s1_recovered, load = asyncio.run(main())
    acked = load.acked["s1"] + load.acked["s2"]
    lost = lost_writes(cl.router.address, acked)
    s2_errors, s1_errors = len(load.errors["s2"]), len(load.errors["s1"])
    tally = Tally(name, acked=len(acked), lost=lost, caller_errors=s1_errors + s2_errors,
                  note=f"s2_acked_during_fault={s2_during} s1_acked_after_recovery={s1_recovered}")
    fault_line(tally)
    assert s2_during > 0, "no write to the healthy shard completed while s1 was stalled"
    assert s2_errors == 0, load.errors["s2"][:5]
    assert s1_recovered > 0, "s1's writes did not complete after it recovered"
    assert s1_errors == 0, load.errors["s1"][:5]
    assert lost == 0


def stop(p: Proc) -> None:
    assert p.popen is not None
    p.popen.send_signal(signal.SIGSTOP)


def cont(p: Proc) -> None:
    assert p.popen is not None
    p.popen.send_signal(signal.SIGCONT)


@pytest.fixture
def stopped(procs: Procs):  # type: ignore[no-untyped-def]
    """Procs, with every stopped process continued at teardown (so the kill is not held up)."""
    yield procs
    for p in procs.all:
        if p.alive():
            cont(p)


def test_semi_sync_shard_without_its_replica_does_not_stall_the_other(stopped: Procs) -> None:
    def kill(cl: Cluster) -> Proc:
        cl.r1.kill()
        return cl.r1

    scenario(stopped, "slow-shard semi-sync replica killed", kill, lambda p: p.start())


def test_stopped_primary_does_not_stall_the_other_shard(stopped: Procs) -> None:
    def stop_primary(cl: Cluster) -> Proc:
        stop(cl.s1)
        return cl.s1

    scenario(stopped, "slow-shard SIGSTOP primary", stop_primary, cont)


def test_stopped_replica_does_not_stall_the_other_shard(stopped: Procs) -> None:
    def stop_replica(cl: Cluster) -> Proc:
        stop(cl.r1)
        return cl.r1

    scenario(stopped, "slow-shard SIGSTOP semi-sync replica", stop_replica, cont)
