"""The client library against two routers: one router is killed while clients run and the
callers see no error; counters driven through retries end exact (request_ids), and the async
client's Pipeline batches go through the router's split-per-shard path.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from shardstate import AsyncClient, Client
from tests.procs import Procs
from tests.routercluster import RouterCluster, owners_by_reading_shards
from tests.stubs import uid

THREADS = 6
STEPS = 60


@pytest.fixture
def cluster(procs: Procs) -> Iterator[RouterCluster]:
    c = RouterCluster(procs, shards=3, routers=2)
    yield c
    c.close()


def test_killing_one_of_two_routers_surfaces_no_error_to_clients(cluster: RouterCluster) -> None:
    addrs = [r.address for r in cluster.routers]
    sids = [uid("fo") for _ in range(THREADS)]
    errors_seen: list[BaseException] = []
    progress = [0] * THREADS
    halfway = threading.Event()

    def agent(i: int) -> None:
        try:
            with Client(addrs, timeout=30) as c:
                s = c.session(sids[i])
                for step in range(STEPS):
                    s.incr("steps")
                    s.append("log", [b"%d" % step])
                    s.update("state", lambda old, step=step: b"%d" % step)
                    progress[i] = step + 1
                    if sum(progress) >= THREADS * STEPS // 3:
                        halfway.set()
        except BaseException as e:
            errors_seen.append(e)
            halfway.set()

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    assert halfway.wait(120)
    cluster.routers[0].kill()
    for t in threads:
        t.join(300)
    assert not errors_seen, errors_seen
    assert progress == [STEPS] * THREADS

    # Exactly once despite retries across routers: counters, logs and last values are exact.
    with Client([cluster.routers[1].address]) as c:
        for sid in sids:
            s = c.session(sid)
            assert s.get("steps").value == str(STEPS).encode()
            assert [e.data for e in s.read("log")] == [b"%d" % n for n in range(STEPS)]
            assert s.get("state").value == b"%d" % (STEPS - 1)
    found = owners_by_reading_shards(cluster, sids, "steps")
    view = cluster.stub(cluster.routers[1]).view()
    assert all(found[s] == [view.owner("default", s).id] for s in sids)


def test_async_client_pipeline_batches_through_the_router(cluster: RouterCluster) -> None:
    addrs = [r.address for r in cluster.routers]
    sids = [uid("aio") for _ in range(40)]

    async def run() -> None:
        async with AsyncClient(addrs, timeout=30) as c:
            sessions = [c.session(s) for s in sids]
            for round_ in range(5):
                await asyncio.gather(*(s.incr("n") for s in sessions))
                await asyncio.gather(*(s.put("v", b"%d" % round_) for s in sessions))
            values = await asyncio.gather(*(s.get("n") for s in sessions))
            assert [v.value for v in values] == [b"5"] * len(sids)
            listed = [info.session_id async for info in c.list_sessions(prefix="aio-")]
            assert sorted(sids) == [s for s in listed if s in set(sids)]

    asyncio.run(run())
    view = cluster.stub(cluster.routers[0]).view()
    assert len({view.owner("default", s).id for s in sids}) == 3
    found = owners_by_reading_shards(cluster, sids, "v")
    assert all(found[s] == [view.owner("default", s).id] for s in sids)
