"""--background-replica: a replica's threads run under SCHED_IDLE and still apply every write;
promoted, the node serves at normal priority (where the machine allows it; otherwise it says
why it cannot); without the flag nothing changes. --compaction-nice: LevelDB's thread alone
runs at that nice value. Real processes; policies and nice values read from the kernel."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable

import grpc
import pytest

from shardstate.server import cpu, launch
from shardstate.v1 import admin_pb2, admin_pb2_grpc, state_pb2, state_pb2_grpc, types_pb2
from tests.procs import Procs
from tests.replicas import EVENTUAL, T, dump, status, wait_converged, wait_for, workload

pytestmark = pytest.mark.skipif(not cpu.supported(), reason="per-thread scheduling policies are Linux-only")


def can_leave_idle_policy() -> bool:
    """Whether this machine lets a process switch a thread back from SCHED_IDLE (root with
    CAP_SYS_NICE, or a RLIMIT_NICE that allows it): tried on a thread of its own."""
    import threading

    ok: list[bool] = []

    def body() -> None:
        tid = threading.get_native_id()
        os.sched_setscheduler(tid, cpu.SCHED_IDLE, os.sched_param(0))
        try:
            os.sched_setscheduler(tid, cpu.SCHED_OTHER, os.sched_param(0))
            ok.append(True)
        except PermissionError:
            ok.append(False)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return ok == [True]


def per_thread(pid: int, read: Callable[[int], int]) -> list[int]:
    """`read(tid)` of every thread of process `pid` (threads that end meanwhile are skipped)."""
    out = []
    for tid in cpu.threads(pid):
        try:
            out.append(read(tid))
        except ProcessLookupError:
            pass
    return sorted(out)


def policies(pid: int) -> set[int]:
    return set(per_thread(pid, cpu.policy_of))


def nices(pid: int) -> list[int]:
    return per_thread(pid, cpu.nice_of)


def test_background_replica_applies_everything_and_promotion_restores_priority(procs: Procs) -> None:
    primary = procs.shard("s1", "--background-replica")
    replica = procs.shard("s1", "--replica-of", primary.address, "--background-replica")
    plain = procs.shard("s1", "--replica-of", primary.address)
    assert primary.popen is not None and replica.popen is not None and plain.popen is not None
    # The flag acts only while a node is a replica, and only where it is given.
    assert policies(primary.popen.pid) == {cpu.SCHED_OTHER}
    assert policies(replica.popen.pid) == {cpu.SCHED_IDLE}
    assert policies(plain.popen.pid) == {cpu.SCHED_OTHER}

    assert asyncio.run(workload(primary.address, 1200, seed=7)) == 1200
    wait_converged(primary.address, replica.address)
    assert dump(replica.address, consistency=EVENTUAL) == dump(primary.address)
    # Threads started after the switch (gRPC, LevelDB compaction) inherited it.
    assert policies(replica.popen.pid) == {cpu.SCHED_IDLE}

    want = dump(primary.address)
    primary.kill()
    with grpc.insecure_channel(replica.address) as ch:
        admin_pb2_grpc.AdminStub(ch).PromoteReplica(admin_pb2.PromoteReplicaRequest(shard_id="s1"), timeout=60)
    wait_for(lambda: status(replica.address).role == admin_pb2.PRIMARY, "the replica to become primary")
    assert dump(replica.address) == want  # every write the old primary had replicated
    with grpc.insecure_channel(replica.address) as ch:
        put = state_pb2_grpc.StateStub(ch).Put(state_pb2.PutRequest(session_id="after", key="k", value=b"v"), timeout=T)
        assert put.applied
        got = state_pb2_grpc.StateStub(ch).Get(
            state_pb2.GetRequest(session_id="after", key="k", consistency=types_pb2.STRONG), timeout=T)
        assert got.record.value == b"v"
    if can_leave_idle_policy():
        assert policies(replica.popen.pid) == {cpu.SCHED_OTHER}
    else:
        assert "CPU priority unchanged" in replica.log_tail(200)


def test_set_background_switches_every_thread_and_back() -> None:
    """In a fresh process with a few threads: every thread goes to SCHED_IDLE, a thread
    started afterwards inherits it, and the way back works where the machine allows it or
    says why it cannot."""
    code = """
import os, sys, threading, time
from shardstate.server import cpu
stop = threading.Event()
for _ in range(3):
    threading.Thread(target=stop.wait, daemon=True).start()
print(repr(cpu.set_background(True)))
late = threading.Thread(target=stop.wait, daemon=True); late.start()
print(sorted({cpu.policy_of(t) for t in cpu.threads()}))
print(repr(cpu.set_background(False)))
print(sorted({cpu.policy_of(t) for t in cpu.threads()}))
stop.set()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    on, during, off, after = out.stdout.splitlines()
    assert on == "''"
    assert during == str([cpu.SCHED_IDLE])
    if can_leave_idle_policy():
        assert off == "''" and after == str([cpu.SCHED_OTHER])
    else:
        assert "could not switch to normal priority" in off and after == str([cpu.SCHED_IDLE])


def test_leveldb_background_thread_runs_at_compaction_nice(procs: Procs) -> None:
    """The one thread at the lowered priority is LevelDB's: the shard's own threads (event
    loop, gRPC) stay at 0; --compaction-nice 0 leaves every thread at 0. Writes land either way."""
    default = procs.shard("s1")
    same = procs.shard("s2", "--compaction-nice", "0")
    assert default.popen is not None and same.popen is not None
    for p in (default, same):
        assert asyncio.run(workload(p.address, 320, seed=11)) == 320
    got = nices(default.popen.pid)
    assert got.count(10) == 1 and set(got) == {0, 10}, got
    assert set(nices(same.popen.pid)) == {0}


def test_compaction_nice_out_of_range_is_refused(procs: Procs) -> None:
    out = subprocess.run(launch.shardstate_cmd("shard", "--id", "s1", "--compaction-nice", "20"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--compaction-nice must be 0..19" in out.stderr


def test_background_replica_killed_mid_stream_restarts_in_background_and_converges(procs: Procs) -> None:
    """kill -9 of a background replica while the primary takes writes: restarted with the same
    flag it is in the background again, resumes from its own revision and ends with exactly
    the primary's data - every acknowledged write."""
    primary = procs.shard("s1")
    replica = procs.shard("s1", "--replica-of", primary.address, "--background-replica")

    async def writes_around_a_kill() -> int:
        first = asyncio.create_task(workload(primary.address, 960, seed=21))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(replica.kill)
        ran = await first
        return ran + await workload(primary.address, 480, seed=22)

    assert asyncio.run(writes_around_a_kill()) == 1440
    replica.start()
    assert replica.popen is not None
    assert policies(replica.popen.pid) == {cpu.SCHED_IDLE}
    wait_converged(primary.address, replica.address)
    assert dump(replica.address, consistency=EVENTUAL) == dump(primary.address)
