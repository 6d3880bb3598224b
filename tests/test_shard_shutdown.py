"""SIGTERM of a real shard while requests are in flight: they finish, the process exits 0, and a
restart on the same data directory sees every acknowledged write with its version.
"""

from __future__ import annotations

import grpc

from tests.procs import Procs
from tests.stubs import Conn, WriteLoad, state_pb2, uid, wait_until


def test_sigterm_drains_in_flight_writes_and_exits_0(procs: Procs) -> None:
    shard = procs.shard("s1")
    # batches make some calls long enough to be surely in flight when the signal lands
    load = WriteLoad(shard.address, threads=6, sessions=3, batch_puts=200).start()
    try:
        wait_until(
            lambda: load.ack_count >= 100 or load.errors or load.unexpected, timeout=60, every=0.02
        )
        assert not load.errors and not load.unexpected, (load.errors, load.unexpected)
        load.mark()
        assert shard.popen is not None
        code = shard.terminate(timeout=60)
        wait_until(load.all_stopped, timeout=60)
    finally:
        load.join()
    assert code == 0, shard.log_tail()
    assert not load.unexpected, load.unexpected
    # calls the server had accepted finished; later ones were refused, never cut off half-way
    codes = {e.code() for e in load.errors}  # type: ignore[attr-defined]
    assert codes <= {grpc.StatusCode.UNAVAILABLE}, [(e.code(), e.details()) for e in load.errors]  # type: ignore[attr-defined]
    assert load.acks_after_mark >= 1, "no call in flight at SIGTERM was allowed to finish"
    old_max = load.max_version()

    shard.start()
    conn = Conn(shard)
    try:
        checked = load.verify(conn)
        assert checked == load.acknowledged()
        after = conn.put(load.sessions[0], "after", b"x")
        assert after.version > old_max
    finally:
        conn.close()


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
        shard.start()
    conn = Conn(shard)
    try:
        seen.append(conn.put(sid, "k", b"v").version)
        assert [e.seq for e in conn.read_log(sid, "s").entries] == [1, 2]
    finally:
        conn.close()
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen
