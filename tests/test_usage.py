"""A shard's per-namespace figures (server/storage/usage.py) on a real LevelDB: kept by every
write path equal to a fresh scan, and a write the quota refuses leaves nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardstate.common.errors import LimitExceededError
from shardstate.server.config import ShardConfig
from shardstate.server.storage import encoding as enc
from shardstate.server.storage.engine import Engine
from shardstate.server.storage.usage import Usage
from shardstate.v1 import state_pb2 as s


class Clock:
    def __init__(self) -> None:
        self.ms = 1_900_000_000_000

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[tuple[Engine, Usage, Clock, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    clock = Clock()
    e = Engine(ShardConfig(id="s1", data_dir=str(tmp_path / "db")), clock=clock)
    usage = e.store.usage = Usage(e.store)
    try:
        yield e, usage, clock, loop
    finally:
        loop.run_until_complete(e.close())
        loop.close()


def test_the_figures_follow_every_write_path(engine: tuple[Engine, Usage, Clock, asyncio.AbstractEventLoop]) -> None:
    e, usage, clock, loop = engine
    run = loop.run_until_complete
    assert usage.of("n") == (0, 0)

    def same() -> None:
        assert usage.of("n") == usage.scan("n")

    run(e.put(s.PutRequest(namespace="n", session_id="a", key="k", value=b"x" * 100)))
    same()
    run(e.put(s.PutRequest(namespace="n", session_id="a", key="k", value=b"x" * 10)))  # shrinks
    run(e.append(s.AppendRequest(namespace="n", session_id="b", stream="log", entries=[b"1", b"22"])))
    run(e.put(s.PutRequest(namespace="other", session_id="a", key="k", value=b"y")))
    same()
    assert usage.of("n")[0] == 2 and usage.of("other") == usage.scan("other")
    run(e.pop_last(s.PopLastRequest(namespace="n", session_id="b", stream="log")))
    run(e.delete(s.DeleteRequest(namespace="n", session_id="a", key="k")))
    same()
    run(e.delete_session(s.DeleteSessionRequest(namespace="n", session_id="b")))
    same()
    assert usage.of("n")[0] == 1  # a: its meta stays (no keys) until deleted
    run(e.put(s.PutRequest(namespace="n", session_id="ttl", key="k", value=b"z" * 50, session_ttl_ms=1000)))
    run(e.put(s.PutRequest(namespace="n", session_id="keyttl", key="k", value=b"z" * 50, ttl_ms=1000)))
    same()
    sessions, held = usage.of("n")
    clock.ms += 5000
    done = run(e.sweep_once())  # the expired session and key are reclaimed
    assert done["sessions"] == 1 and done["keys"] == 1
    same()
    assert usage.of("n")[0] == sessions - 1 and usage.of("n")[1] < held
    # Rebalancing's raw writes: a session arrives, then leaves.
    meta = e.store.load_meta(enc.meta_key(b"n", b"keyttl"))
    assert meta is not None
    arrived = meta.SerializeToString()
    run(e.write_raw([(enc.meta_key(b"n", b"moved"), arrived)]))
    same()
    run(e.write_raw([(enc.meta_key(b"n", b"moved"), None)]))
    same()


def test_a_refused_write_leaves_nothing(engine: tuple[Engine, Usage, Clock, asyncio.AbstractEventLoop]) -> None:
    e, usage, _, loop = engine
    run = loop.run_until_complete
    run(e.put(s.PutRequest(namespace="n", session_id="a", key="k", value=b"v")))

    def refuse(d: tuple[str, int, int]) -> None:
        if d[1] > 0:
            raise LimitExceededError("no new sessions")

    e.quota = refuse
    before = (e.revision(), usage.of("n"), e.store.change_count)
    with pytest.raises(LimitExceededError):
        run(e.put(s.PutRequest(namespace="n", session_id="new", key="k", value=b"v", request_id="r1")))
    assert (e.revision(), usage.of("n"), e.store.change_count) == before
    assert not e.get(s.GetRequest(namespace="n", session_id="new", key="k")).found
    assert list(e.store.db.iterator(prefix=enc.meta_key(b"n", b"new"))) == []
    run(e.put(s.PutRequest(namespace="n", session_id="a", key="k2", value=b"v")))  # no new session: allowed
    assert usage.of("n") == usage.scan("n")
