"""kill -9 of a replica under a write load (asynchronous mode): the writers see no error; the
replica comes back on its data directory, catches up (its applied revision reaches the
primary's), and an eventual read from it sees every writer's last acknowledged write."""

from __future__ import annotations

import os
import signal
import time

from shardstate.server.replication.follower import DEAD_AFTER_S
from tests.faults.report import Tally, fault_line
from tests.faults.test_failover import lost_writes
from tests.procs import Procs
from tests.replicas import wait_converged
from tests.stubs import CALL_TIMEOUT_S, Conn, WriteLoad, state_pb2, types_pb2, wait_until


def test_kill_replica_under_load(procs: Procs) -> None:
    primary = procs.shard("s1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    load = WriteLoad(primary.address, threads=6).start()
    try:
        wait_until(lambda: load.busy(200), timeout=60)
        replica.kill()
        n = load.ack_count
        wait_until(lambda: load.busy(n + 200), timeout=60)
        replica.start()  # same port and data: resumes from its own applied revision
        n = load.ack_count
        wait_until(lambda: load.busy(n + 200), timeout=60)
    finally:
        load.join()
    assert not load.unexpected, load.unexpected
    wait_converged(primary.address, replica.address)

    # An eventual read from the replica sees each writer's last acknowledged overwrite and its
    # last acknowledged append.
    r = Conn(replica)
    stale = 0
    for i, (value, version, _) in load.last.items():
        sid = load.sessions[i % len(load.sessions)]
        got = r.state.Get(state_pb2.GetRequest(session_id=sid, key=f"t{i}/last", consistency=types_pb2.EVENTUAL),
                          timeout=CALL_TIMEOUT_S)
        stale += (got.record.value, got.record.version) != (value, version)
    for (sid, stream), want in load.seqs.items():
        top = max(want)
        got = r.read_log(sid, stream, from_seq=top, to_seq=top, consistency=types_pb2.EVENTUAL)
        stale += [(e.seq, e.data) for e in got.entries] != [(top, want[top])]
    r.close()
    p = Conn(primary)
    lost = len(lost_writes(load, p))
    p.close()
    t = Tally("kill -9 replica under load (async)", acked=load.acknowledged(), lost=lost,
              caller_errors=len(load.errors), note=f"stale_replica_reads={stale} caught_up=yes")
    fault_line(t)
    assert load.ack_count >= 600 and len(load.last) == 6
    assert t.caller_errors == 0 and t.lost == 0 and stale == 0


def test_semi_sync_primary_stopped_past_the_watchdog_then_resumed(procs: Procs) -> None:
    """SIGSTOP of a semi-sync primary for longer than the replica's dead-stream watchdog: the
    replica drops the silent stream and must reconnect once the primary runs again, so that
    writes are acknowledged again (they once waited for ever: the watchdog's cancel ended the
    follower for good)."""
    primary = procs.shard("s1", "--min-replica-acks", "1", "--replica-ack-timeout-s", "2")
    replica = procs.shard("s1", "--replica-of", primary.address)
    p = Conn(primary)
    sid = "stopped"
    before = [p.put(sid, f"k{j}", b"v").version for j in range(20)]
    wait_converged(primary.address, replica.address)
    assert primary.popen is not None
    os.kill(primary.popen.pid, signal.SIGSTOP)
    try:
        time.sleep(DEAD_AFTER_S + 1.5)  # past the watchdog: the replica gives the stream up
    finally:
        os.kill(primary.popen.pid, signal.SIGCONT)
    acked, errors_seen = 0, 0

    def one_write() -> bool:
        nonlocal acked, errors_seen
        try:
            p.put(sid, f"after{acked}", b"w")
            acked += 1
        except Exception:
            errors_seen += 1
        return acked >= 20

    wait_until(one_write, timeout=60, every=0.05)
    wait_converged(primary.address, replica.address)
    r = Conn(replica)
    lost = sum(not r.state.Get(state_pb2.GetRequest(session_id=sid, key=f"k{j}", consistency=types_pb2.EVENTUAL),
                               timeout=CALL_TIMEOUT_S).found for j in range(20))
    lost += sum(not r.state.Get(state_pb2.GetRequest(session_id=sid, key=f"after{j}", consistency=types_pb2.EVENTUAL),
                                timeout=CALL_TIMEOUT_S).found for j in range(20))
    r.close()
    p.close()
    t = Tally("SIGSTOP semi-sync primary past the watchdog", acked=len(before) + acked, lost=lost,
              caller_errors=errors_seen)
    fault_line(t)
    assert acked == 20 and t.lost == 0
