"""SIGTERM of a real shard while requests are in flight: they finish, the process exits 0, and a
restart on the same data directory sees every acknowledged write with its version.
"""

from __future__ import annotations

import grpc

from tests.procs import Proc, Procs
from tests.stubs import Conn, WriteLoad, state_pb2, uid, wait_until

ROUNDS = 4


def restart(shard: Proc) -> None:
    """Start again on the same data dir; on a fresh port, since another process may have taken
    the old one meanwhile (nothing here depends on the address)."""
    shard.start(listen="127.0.0.1:0")


def test_sigterm_drains_in_flight_writes_and_exits_0(procs: Procs) -> None:
    shard = procs.shard("s1")
    finished_in_flight = 0
    # Whether a call is inside a handler when the signal lands is up to the scheduler; a few
    # rounds make "at least one in-flight call finished" certain. The rest holds every round.
    for _ in range(ROUNDS):
        # batches make some calls long enough to be in flight when the signal lands
        load = WriteLoad(shard.address, threads=6, sessions=3, batch_puts=200).start()
        try:
            wait_until(load.busy, timeout=60, every=0.02)
            assert not load.errors and not load.unexpected, (load.errors, load.unexpected)
            load.mark()
            code = shard.terminate(timeout=60)
            wait_until(load.all_stopped, timeout=60)
        finally:
            load.join()
        assert code == 0, shard.log_tail()
        assert not load.unexpected, load.unexpected
        # refused calls say UNAVAILABLE (safe to retry), never CANCELLED half-way
        codes = {e.code() for e in load.errors}  # type: ignore[attr-defined]
        assert codes <= {grpc.StatusCode.UNAVAILABLE}, [
            (e.code(), e.details())  # type: ignore[attr-defined]
            for e in load.errors
        ]
        old_max = load.max_version()

        restart(shard)
        conn = Conn(shard)
        try:
            assert load.verify(conn) == load.acknowledged()
            # and nothing was applied without its acknowledgement reaching the caller
            load.verify_unacked_absent(conn)
            after = conn.put(load.sessions[0], "after", b"x")
            assert after.version > old_max
        finally:
            conn.close()
        finished_in_flight += load.acks_after_mark
        if finished_in_flight:
            break
    assert finished_in_flight >= 1, f"no call in flight at SIGTERM finished in {ROUNDS} rounds"


def test_version_never_repeats_across_sigterm_restarts(procs: Procs) -> None:
    shard = procs.shard("s1")
    sid = uid()
    seen: list[int] = []
    for _ in range(2):
        conn = Conn(shard)
        try:
            seen.append(conn.put(sid, "k", b"v").version)
            seen.append(
                conn.state.Delete(
                    state_pb2.DeleteRequest(session_id=sid, key="k"), timeout=30
                ).revision
            )
            seen.append(conn.append(sid, "s", b"e").revision)
        finally:
            conn.close()
        assert shard.terminate(timeout=60) == 0, shard.log_tail()
        restart(shard)
    conn = Conn(shard)
    try:
        seen.append(conn.put(sid, "k", b"v").version)
        assert [e.seq for e in conn.read_log(sid, "s").entries] == [1, 2]
    finally:
        conn.close()
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen
