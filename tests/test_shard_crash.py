"""kill -9 of a real shard under write load, then a restart on the same data directory: every
acknowledged write is there with its version, and the revision continues above the old one.
"""

from __future__ import annotations

import grpc

from tests.procs import Procs
from tests.stubs import Conn, WriteLoad, state_pb2, uid, wait_until


def test_kill9_under_load_keeps_every_acknowledged_write(procs: Procs) -> None:
    shard = procs.shard("s1")
    load = WriteLoad(shard.address, threads=6, sessions=3).start()
    try:
        wait_until(
            lambda: load.ack_count >= 300 or load.errors or load.unexpected, timeout=60, every=0.02
        )
        assert not load.errors and not load.unexpected, (load.errors, load.unexpected)
        shard.kill()  # mid-stream: the writers are still going
        wait_until(load.all_stopped, timeout=60)
    finally:
        load.join()
    assert not load.unexpected, load.unexpected
    assert all(e.code() == grpc.StatusCode.UNAVAILABLE for e in load.errors), [
        e.code() for e in load.errors
    ]  # type: ignore[attr-defined]
    old_max = load.max_version()

    shard.start(listen="127.0.0.1:0")  # a fresh port: the old one may be taken meanwhile
    conn = Conn(shard)
    try:
        checked = load.verify(conn)
        assert len(load.acked) >= 100
        assert checked == load.acknowledged()
        sid = load.sessions[0]
        after = conn.put(sid, "after-restart", b"x")
        assert after.version > old_max
        assert after.header.revision >= after.version
        # every session's record of its highest version survived too
        info = conn.get_session(sid).session
        assert info.max_version >= after.version
        # the stream seqs continue too, never reused
        for (s, stream), seqs in load.seqs.items():
            nxt = conn.append(s, stream, b"post").seqs[0]
            assert nxt > max(seqs)
    finally:
        conn.close()


def test_version_never_repeats_across_kill9_restarts(procs: Procs) -> None:
    shard = procs.shard("s1")
    sid = uid()
    seen: list[int] = []
    for round_ in range(2):
        conn = Conn(shard)
        try:
            # create, overwrite, delete, recreate: each step above everything before, restarts included
            p = conn.put(sid, "k", f"r{round_}".encode())
            seen.append(p.version)
            d = conn.state.Delete(state_pb2.DeleteRequest(session_id=sid, key="k"), timeout=30)
            seen.append(d.revision)
            p = conn.put(sid, "k", b"again", expected_version=0)
            assert p.applied
            seen.append(p.version)
            n = conn.state.Increment(
                state_pb2.IncrementRequest(session_id=sid, key="n", delta=1), timeout=30
            )
            seen.append(n.version)
        finally:
            conn.close()
        shard.kill()
        shard.start(listen="127.0.0.1:0")  # a fresh port: the old one may be taken meanwhile
    conn = Conn(shard)
    try:
        g = conn.get(sid, "k")
        assert g.record.version == seen[-2] and g.record.value == b"again"
        assert conn.get(sid, "n").record.value == b"2"
        seen.append(conn.put(sid, "k", b"final").version)
    finally:
        conn.close()
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen


def test_request_id_replay_and_history_survive_kill9(procs: Procs) -> None:
    shard = procs.shard("s1")
    sid = uid()
    conn = Conn(shard)
    append = state_pb2.AppendRequest(
        session_id=sid, stream="m", entries=[b"once"], request_id="r-1"
    )
    inc = state_pb2.IncrementRequest(session_id=sid, key="n", delta=3, request_id="r-2")
    try:
        first_append = conn.state.Append(append, timeout=30)
        first_inc = conn.state.Increment(inc, timeout=30)
    finally:
        conn.close()
    # the reply was "lost": the process dies, the caller retries against the restarted shard
    shard.kill()
    shard.start(listen="127.0.0.1:0")  # a fresh port: the old one may be taken meanwhile
    conn = Conn(shard)
    try:
        again = conn.state.Append(append, timeout=30)
        assert again.header.replayed and list(again.seqs) == list(first_append.seqs) == [1]
        inc_again = conn.state.Increment(inc, timeout=30)
        assert inc_again.header.replayed and inc_again.value == first_inc.value == 3
        assert [e.data for e in conn.read_log(sid, "m").entries] == [b"once"]
        assert conn.get(sid, "n").record.value == b"3"
        # the change log survived too: a watch resumes from before the crash
        call = conn.state.Watch(
            state_pb2.WatchRequest(session_id=sid, from_revision=first_append.revision), timeout=30
        )
        revisions: list[int] = []
        try:
            for resp in call:
                revisions += [e.revision for e in resp.events]
                if len(revisions) >= 2:
                    break
        finally:
            call.cancel()
        assert revisions == [first_append.revision, first_inc.version]
    finally:
        conn.close()
