"""kill -9 of a primary under a write load, then `promote` of its replica.

Semi-sync (--min-replica-acks 1): no acknowledged write is lost (values, versions, log seqs),
and the new primary hands out no acknowledged seq again. Asynchronous, with the replica
stalled (SIGSTOP) for part of the load so an unreplicated tail exists: every lost acknowledged
write is in the old primary's audit file once it returns as a replica, and the audit's
reconciliation counts the seqs the new primary handed out again.
"""

from __future__ import annotations

import signal
from collections import Counter

import grpc

from tests.faults.report import Tally, fault_line
from tests.procs import Proc, Procs
from tests.replicas import audit_lines, status, wait_converged
from tests.stubs import CALL_TIMEOUT_S, Conn, WriteLoad, state_pb2, wait_until

Lost = tuple[str, str, str, int]  # ("put" | "append", session, key or stream, version or seq)


def lost_writes(load: WriteLoad, conn: Conn) -> list[Lost]:
    """The acknowledged unique-key puts and appends of `load` that `conn` does not hold as acked."""
    out: list[Lost] = []
    items = sorted(load.acked.items())
    for start in range(0, len(items), 500):
        chunk = items[start:start + 500]
        ops = [state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=s, key=k)) for (s, k), _ in chunk]
        resp = conn.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=CALL_TIMEOUT_S)
        for ((s, k), (value, version)), r in zip(chunk, resp.results, strict=True):
            if not (r.get.found and (r.get.record.value, r.get.record.version) == (value, version)):
                out.append(("put", s, k, version))
    for (sid, stream), want in load.seqs.items():
        try:
            got = {e.seq: e.data for e in conn.read_log(sid, stream, from_seq=min(want), limit=1000).entries}
        except grpc.RpcError:  # the stream does not exist there
            got = {}
        out.extend(("append", sid, stream, seq) for seq, data in want.items() if got.get(seq) != data)
    return out


def promote(router: Proc) -> str:
    from shardstate.v1 import admin_pb2, admin_pb2_grpc
    with grpc.insecure_channel(router.address) as ch:
        resp = admin_pb2_grpc.AdminStub(ch).PromoteReplica(admin_pb2.PromoteReplicaRequest(shard_id="s1"), timeout=60)
    return resp.new_primary


def promote_after_kill(load: WriteLoad, router: Proc, replica: Proc) -> Conn:
    """Once the primary is dead: the writers stopped at their errors, the replica promoted
    through the router and serving; a connection to it."""
    wait_until(load.all_stopped, timeout=60)
    load.join()
    assert not load.unexpected, load.unexpected
    assert promote(router) == replica.address
    replica.wait_ready()
    return Conn(replica)


def test_kill_primary_semi_sync_loses_no_acknowledged_write(procs: Procs) -> None:
    primary = procs.shard("s1", "--min-replica-acks", "1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, replica.address])
    load = WriteLoad(primary.address, threads=6).start()
    wait_until(lambda: load.busy(400), timeout=60)
    primary.kill()
    new = promote_after_kill(load, router, replica)
    lost = lost_writes(load, new)
    checked = load.verify(new)  # values and versions of puts and overwrites, data at each seq
    # No acknowledged seq is handed out again: the next append to each stream goes above it.
    reused = 0
    for (sid, stream), want in load.seqs.items():
        seq = new.append(sid, stream, b"after-promote").seqs[0]
        reused += seq <= max(want)
    new.close()
    t = Tally("kill -9 primary + promote (semi-sync)", acked=load.acknowledged(), lost=len(lost),
              caller_errors=len(load.errors), note=f"checked={checked} reused_seqs={reused}")
    fault_line(t)
    assert load.ack_count >= 400 and checked == t.acked > 0
    assert t.lost == 0 and reused == 0
    assert t.caller_errors == len(load.errors) <= 6  # each writer stops at the error of the kill


def test_kill_primary_async_every_lost_write_is_audited(procs: Procs) -> None:
    primary = procs.shard("s1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, replica.address])
    load = WriteLoad(primary.address, threads=6).start()
    wait_until(lambda: load.busy(200), timeout=60)
    wait_converged(primary.address, replica.address)
    assert replica.popen is not None
    replica.popen.send_signal(signal.SIGSTOP)  # lagging: what is written now exists only on the primary
    try:
        n = load.ack_count
        wait_until(lambda: load.busy(n + 200), timeout=60)
        primary.kill()
    finally:
        replica.popen.send_signal(signal.SIGCONT)
    new = promote_after_kill(load, router, replica)
    lost = lost_writes(load, new)
    # The new primary appends to every stream that lost entries: each reuses its first lost seq.
    lost_streams = {(sid, stream) for kind, sid, stream, _ in lost if kind == "append"}
    for sid, stream in lost_streams:
        new.append(sid, stream, b"after-promote")
    new.close()

    primary.start()  # it returns, follows the new primary, sets aside and reconciles
    wait_until(lambda: any(x.get("kind") == "reconcile_summary" for x in audit_lines(primary)), timeout=90)
    lines = audit_lines(primary)
    audited: Counter[Lost] = Counter()
    for x in lines:
        if x.get("kind") == "diverged":
            audited.update(("put", x["session"], k["key"], k["version"]) for k in x["keys"])
            audited.update(("append", x["session"], s["stream"], s["seq"]) for s in x["seqs"])
    found = [w for w in lost if audited[w] == 1]
    summary = next(x for x in lines if x.get("kind") == "reconcile_summary")
    # How far a promoted primary would have had to skip to avoid reusing seqs: the most seqs
    # any one stream handed out that the replica never received (not knowable at promotion).
    per_stream = Counter((sid, stream) for kind, sid, stream, _ in lost if kind == "append")
    t = Tally("kill -9 primary + promote (async)", acked=load.acknowledged(), lost=len(lost),
              caller_errors=len(load.errors),
              note=f"audited={len(found)} reused_seqs={summary['seqs_reused']} "
                   f"max_lost_seqs_per_stream={max(per_stream.values(), default=0)} "
                   f"diverged_writes={status(primary.address).diverged_writes}")
    fault_line(t)
    assert t.lost > 0 and len(found) == t.lost  # every lost write is in the audit, once
    assert summary["seqs_reused"] == summary["seqs_reused_other_data"] == len(lost_streams)
    assert t.caller_errors == len(load.errors) <= 6
