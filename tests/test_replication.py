"""Replication with real processes: a replica converges on its primary under concurrent writes
to 500 sessions, catches up after kill -9 from its own revision and, started empty after the
primary trimmed its log, through a snapshot; refuses writes; serves EVENTUAL / min_revision
reads through a router; registers itself in the map; semi-sync writes time out clearly.
"""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

from shardstate.common import errors
from shardstate.v1 import admin_pb2, admin_pb2_grpc, state_pb2, state_pb2_grpc, types_pb2
from tests.procs import Procs
from tests.replicas import (
    EVENTUAL,
    SESSIONS,
    T,
    cluster_map,
    dump,
    log_has,
    raw_dump,
    run_cli,
    session_ids,
    status,
    wait_converged,
    wait_for,
    workload,
)

# ---- tests ----


def test_replica_converges_under_concurrent_writes(procs: Procs) -> None:
    primary = procs.shard("s1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    ran = asyncio.run(workload(primary.address, 2400, seed=1))
    assert ran == 2400
    rev = wait_converged(primary.address, replica.address)
    assert rev > 0
    # Reads: the replica serves EVENTUAL reads with exactly the primary's data.
    want = dump(primary.address)
    assert sum(1 for v in want.values() if v[0]) > SESSIONS // 2  # the workload reached most sessions
    assert dump(replica.address, consistency=EVENTUAL) == want
    # Bytes: after both stop, every data key, value and the revision are identical.
    assert primary.terminate() == 0 and replica.terminate() == 0
    p_data, p_rev = raw_dump(primary.data_dir)  # type: ignore[attr-defined]
    r_data, r_rev = raw_dump(replica.data_dir)  # type: ignore[attr-defined]
    assert p_data == r_data
    assert p_rev == r_rev and p_rev is not None


def test_replica_kill9_restart_catches_up_from_its_revision(procs: Procs) -> None:
    primary = procs.shard("s1")
    replica = procs.shard("s1", "--replica-of", primary.address)

    async def writes_around_a_kill() -> None:
        first = asyncio.create_task(workload(primary.address, 800, seed=2))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(replica.kill)  # kill -9 mid-stream
        await first
        await workload(primary.address, 400, seed=3)

    asyncio.run(writes_around_a_kill())
    behind = status(primary.address).revision
    replica.start()  # same data dir and port
    asyncio.run(workload(primary.address, 400, seed=4))
    assert wait_converged(primary.address, replica.address) > behind
    assert dump(replica.address, consistency=EVENTUAL) == dump(primary.address)
    # It resumed from its own revision: the primary never had to send it a snapshot.
    assert not log_has(replica, "installing a snapshot")
    assert log_has(primary, "follower connected")


def test_empty_replica_after_log_trim_catches_up_through_a_snapshot(procs: Procs) -> None:
    primary = procs.shard("s1", "--changelog-retention", "50", "--sweep-interval-s", "0.1")
    asyncio.run(workload(primary.address, 600, seed=5))

    def trimmed() -> bool:
        with grpc.insecure_channel(primary.address) as ch:
            call = state_pb2_grpc.StateStub(ch).Watch(
                state_pb2.WatchRequest(session_id=session_ids()[0], from_revision=1), timeout=5)
            try:
                next(iter(call))
            except grpc.RpcError as e:
                return bool(e.code() == grpc.StatusCode.OUT_OF_RANGE)
            finally:
                call.cancel()
        return False

    wait_for(trimmed, "the primary to trim its change log")
    replica = procs.shard("s1", "--replica-of", primary.address)
    assert log_has(replica, "installing a snapshot")
    asyncio.run(workload(primary.address, 300, seed=6))  # and the log after the snapshot
    wait_converged(primary.address, replica.address)
    assert dump(replica.address, consistency=EVENTUAL) == dump(primary.address)
    assert primary.terminate() == 0 and replica.terminate() == 0
    assert raw_dump(primary.data_dir) == raw_dump(replica.data_dir)  # type: ignore[attr-defined]


def test_replica_refuses_writes_router_routes_reads_and_lag_shows(procs: Procs) -> None:
    primary = procs.shard("s1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, replica.address], "--refresh-interval-s", "0.3")
    m = cluster_map(router.address)
    assert [(s.id, s.primary, list(s.replicas)) for s in m.shards] == [("s1", primary.address, [replica.address])]

    # A replica answering a write: NotPrimary naming the primary; nothing written.
    with grpc.insecure_channel(replica.address) as ch, pytest.raises(grpc.RpcError) as ei:
        state_pb2_grpc.StateStub(ch).Put(state_pb2.PutRequest(session_id="a", key="k", value=b"v"), timeout=T)
    err = errors.from_rpc_error(ei.value)
    assert isinstance(err, errors.NotPrimaryError) and err.detail.primary == primary.address
    with grpc.insecure_channel(replica.address) as ch, pytest.raises(grpc.RpcError) as ei:
        state_pb2_grpc.StateStub(ch).Get(state_pb2.GetRequest(session_id="a", key="k"), timeout=T)
    assert isinstance(errors.from_rpc_error(ei.value), errors.NotPrimaryError)

    with grpc.insecure_channel(router.address) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        put = stub.Put(state_pb2.PutRequest(session_id="a", key="k", value=b"v1"), timeout=T)  # no error
        assert put.applied and put.header.node == primary.address
        # Read-your-writes on a replica: served there once it applied the write.
        got = stub.Get(state_pb2.GetRequest(session_id="a", key="k", min_revision=put.version), timeout=T)
        assert got.record.value == b"v1" and got.record.version == put.version
        assert got.header.node == replica.address
        ev = stub.Get(state_pb2.GetRequest(session_id="a", key="k", consistency=EVENTUAL), timeout=T)
        assert ev.header.node == replica.address and ev.record.version == put.version
        strong = stub.Get(state_pb2.GetRequest(session_id="a", key="k"), timeout=T)
        assert strong.header.node == primary.address
        # In a Batch too: relaxed reads to the replica, the rest to the primary, in order.
        batch = stub.Batch(state_pb2.BatchRequest(ops=[
            state_pb2.BatchOp(get=state_pb2.GetRequest(session_id="a", key="k", consistency=EVENTUAL)),
            state_pb2.BatchOp(put=state_pb2.PutRequest(session_id="b", key="k", value=b"b1")),
            state_pb2.BatchOp(get=state_pb2.GetRequest(session_id="a", key="k", min_revision=put.version)),
            state_pb2.BatchOp(get=state_pb2.GetRequest(session_id="a", key="k")),
            state_pb2.BatchOp(get=state_pb2.GetRequest(session_id="zz", key="k", consistency=EVENTUAL)),
        ]), timeout=T)
        r = batch.results
        assert [x.code for x in r] == [0] * 5
        assert r[0].get.record.value == b"v1" and r[0].get.header.node == replica.address
        assert r[1].put.applied and r[1].put.header.node == primary.address
        assert r[2].get.record.version == put.version and r[2].get.header.node == replica.address
        assert r[3].get.header.node == primary.address
        assert not r[4].get.found and r[4].get.header.node == replica.address

    wait_converged(primary.address, replica.address)
    st = router_status(router.address)
    line = st[replica.address]
    assert line.role == admin_pb2.REPLICA and line.primary == primary.address
    assert line.lag_revisions == 0 and line.lag_ms == 0 and line.up and line.serving
    cli = run_cli("admin", "--router", router.address, "status")
    assert cli.returncode == 0, cli.stderr
    assert "replica" in cli.stdout and "0w 0ms" in cli.stdout

    # A replica started later registers itself: the primary records it in the map.
    late = procs.shard("s1", "--replica-of", primary.address)
    wait_for(lambda: late.address in cluster_map(router.address).shards[0].replicas,
             "the late replica in the router's map")
    assert cluster_map(router.address).epoch > m.epoch
    assert late.address in cluster_map(replica.address).shards[0].replicas

    # The replica goes away: relaxed reads fall back to the primary, no error.
    replica.kill()
    late.kill()
    with grpc.insecure_channel(router.address) as ch:
        ev = state_pb2_grpc.StateStub(ch).Get(state_pb2.GetRequest(session_id="a", key="k", consistency=EVENTUAL), timeout=T)
        assert ev.record.value == b"v1" and ev.header.node == primary.address
        b = state_pb2_grpc.StateStub(ch).Batch(state_pb2.BatchRequest(ops=[state_pb2.BatchOp(
            get=state_pb2.GetRequest(session_id="a", key="k", consistency=EVENTUAL))]), timeout=T)
        assert b.results[0].get.record.value == b"v1" and b.results[0].get.header.node == primary.address


def router_status(router: str) -> dict[str, admin_pb2.NodeStatus]:
    with grpc.insecure_channel(router) as ch:
        resp = admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=T)
    return {n.address: n for n in resp.nodes}


def test_semi_sync_write_without_replica_times_out_clearly_and_stays_durable(procs: Procs) -> None:
    primary = procs.shard("s1", "--min-replica-acks", "1", "--replica-ack-timeout-s", "0.5")
    with grpc.insecure_channel(primary.address) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.Put(state_pb2.PutRequest(session_id="a", key="k", value=b"v1", request_id="r1"), timeout=T)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "durable on the primary" in (ei.value.details() or "")
        # A read of the session would show the unacknowledged write: refused, saying why; a
        # session with nothing unacknowledged is read at once.
        with pytest.raises(grpc.RpcError) as ei:
            stub.Get(state_pb2.GetRequest(session_id="a", key="k"), timeout=T)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failover could lose it" in (ei.value.details() or "")
        assert not stub.Get(state_pb2.GetRequest(session_id="b", key="k"), timeout=T).found

    replica = procs.shard("s1", "--replica-of", primary.address)
    with grpc.insecure_channel(primary.address) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        # The retry of the timed-out write: replayed, and acknowledged now that a replica has it.
        again = stub.Put(state_pb2.PutRequest(session_id="a", key="k", value=b"v1", request_id="r1"), timeout=T)
        assert again.header.replayed
        got = stub.Get(state_pb2.GetRequest(session_id="a", key="k"), timeout=T)
        assert got.record.value == b"v1" and got.record.version == again.version  # committed, not rolled back
        put = stub.Put(state_pb2.PutRequest(session_id="a", key="k", value=b"v2"), timeout=T)
    # Acknowledged means the replica has it already.
    with grpc.insecure_channel(replica.address) as ch:
        ev = state_pb2_grpc.StateStub(ch).Get(state_pb2.GetRequest(session_id="a", key="k", consistency=EVENTUAL), timeout=T)
        assert ev.record.version == put.version and ev.record.value == b"v2"


def test_semi_sync_batch_read_waits_for_its_sessions_even_beside_a_bad_op(procs: Procs) -> None:
    primary = procs.shard("s1", "--min-replica-acks", "1", "--replica-ack-timeout-s", "0.5")
    with grpc.insecure_channel(primary.address) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.Put(state_pb2.PutRequest(session_id="a", key="k", value=b"unacked"), timeout=T)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        get_a = state_pb2.BatchOp(get=state_pb2.GetRequest(session_id="a", key="k"))
        bad = state_pb2.BatchOp(get=state_pb2.GetRequest(session_id="", key="k"))  # its own INVALID_ARGUMENT
        for ops in ([get_a], [get_a, bad], [bad, get_a]):
            # A Batch reading session "a" would show the unacknowledged write: refused, whatever
            # the other ops are.
            with pytest.raises(grpc.RpcError) as ei:
                stub.Batch(state_pb2.BatchRequest(ops=ops), timeout=T)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ops
            assert "failover could lose it" in (ei.value.details() or "")
        # A batch of other sessions, bad op included, is answered at once.
        got = stub.Batch(state_pb2.BatchRequest(ops=[
            state_pb2.BatchOp(get=state_pb2.GetRequest(session_id="b", key="k")), bad]), timeout=T)
        assert [r.code for r in got.results] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]


def test_a_replica_answers_bad_input_as_its_primary_does_not_not_primary(procs: Procs) -> None:
    primary = procs.shard("s1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    bad = [
        ("Put", state_pb2.PutRequest(session_id="a", key="", value=b"v"), grpc.StatusCode.INVALID_ARGUMENT),
        ("Put", state_pb2.PutRequest(session_id="a", key="k", value=b"v" * (1024 * 1024 + 1)),
         grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("Get", state_pb2.GetRequest(session_id="a", key=""), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    answers: dict[str, list[tuple[grpc.StatusCode, str]]] = {}
    for node in (primary, replica):
        with grpc.insecure_channel(node.address) as ch:
            stub = state_pb2_grpc.StateStub(ch)
            for method, req, code in bad:
                with pytest.raises(grpc.RpcError) as ei:
                    getattr(stub, method)(req, timeout=T)
                assert ei.value.code() == code, (node.address, method, ei.value.details())
                answers.setdefault(method + str(code), []).append((ei.value.code(), ei.value.details() or ""))
    assert all(len(set(v)) == 1 for v in answers.values()), answers
    with grpc.insecure_channel(replica.address) as ch:  # valid input: the replica still redirects writes
        with pytest.raises(grpc.RpcError) as ei:
            state_pb2_grpc.StateStub(ch).Put(state_pb2.PutRequest(session_id="a", key="k", value=b"v"), timeout=T)
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_semi_sync_watch_shows_no_write_before_a_replica_has_it(procs: Procs) -> None:
    primary = procs.shard("s1", "--min-replica-acks", "1", "--replica-ack-timeout-s", "0.5")
    with grpc.insecure_channel(primary.address) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.Put(state_pb2.PutRequest(session_id="a", key="k", value=b"unacked", request_id="r1"), timeout=T)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        shown = []
        with pytest.raises(grpc.RpcError) as ei:
            for resp in stub.Watch(state_pb2.WatchRequest(session_id="a", from_revision=1), timeout=T):
                shown += resp.events
                if shown:
                    break
            raise AssertionError(f"the unacknowledged write was shown: {shown}")
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value.details()
        assert "failover could lose it" in (ei.value.details() or "")
    procs.shard("s1", "--replica-of", primary.address)
    with grpc.insecure_channel(primary.address) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        stub.Put(state_pb2.PutRequest(session_id="a", key="k", value=b"unacked", request_id="r1"), timeout=T)  # acked now
        watch = stub.Watch(state_pb2.WatchRequest(session_id="a", from_revision=1), timeout=T)
        try:
            got = next(e for resp in watch for e in resp.events)
        finally:
            watch.cancel()
        assert got.type == types_pb2.PUT and got.record.value == b"unacked"


def test_a_restarting_replica_never_answers_as_a_primary(procs: Procs) -> None:
    """Until a restarted replica knows its role (it asks its peers for the newest map first,
    which takes long when its primary does not answer), it must not serve as a primary: no
    write taken as its own, no min_revision read answered below that revision."""
    primary = procs.shard("s1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    with grpc.insecure_channel(primary.address) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        stub.Put(state_pb2.PutRequest(session_id="a", key="k", value=b"1"), timeout=T)
        wait_converged(primary.address, replica.address)
        replica.kill()
        second = stub.Put(state_pb2.PutRequest(session_id="a", key="k", value=b"2"), timeout=T)
    primary.popen.send_signal(signal.SIGSTOP)  # the restarted replica's questions go unanswered
    try:
        replica.start(wait=False)
        with grpc.insecure_channel(replica.address) as ch:
            stub = state_pb2_grpc.StateStub(ch)

            def first_answer() -> state_pb2.GetResponse | grpc.RpcError | None:
                try:
                    return stub.Get(state_pb2.GetRequest(session_id="a", key="k", min_revision=second.version),
                                    timeout=T, wait_for_ready=True)
                except grpc.RpcError as e:
                    return e

            got = first_answer()
            if isinstance(got, state_pb2.GetResponse):
                assert got.record.version >= second.version, f"answered below min_revision: {got}"
            with pytest.raises(grpc.RpcError) as ei:
                stub.Put(state_pb2.PutRequest(session_id="a", key="mine", value=b"x"), timeout=T)
            assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION, ei.value
    finally:
        primary.popen.send_signal(signal.SIGCONT)
    replica.wait_ready()
    assert wait_converged(primary.address, replica.address) >= second.version
    assert status(replica.address).diverged_writes == 0
