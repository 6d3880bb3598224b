"""The client library through failures of real processes: one of two routers killed while
clients run (sync and asyncio, nothing surfaces, nothing applies twice), and a watch that
resumes across a shard's kill -9 without losing or repeating a change.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from shardstate import AsyncClient, Change, Client, ConstantBackoff, Retry
from tests.procs import Procs
from tests.stubs import run, uid

PATIENT = Retry(attempts=400, backoff=ConstantBackoff(0.1), attempt_timeout=10)  # within timeout=PATIENCE
PATIENCE = 60  # s: each call's deadline (a failover fits in it many times)


def wait_for(cond: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_killed_router_is_invisible_to_sync_clients(procs: Procs) -> None:
    shard = procs.shard("s1")
    routers = [procs.router([shard.address]), procs.router([shard.address])]
    sid = uid()
    acked: list[int] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def worker() -> None:
        with Client([r.address for r in routers], retry=PATIENT, timeout=PATIENCE) as c:
            s = c.session(sid)
            try:
                while not stop.is_set():
                    acked.append(s.incr("n"))
                    s.append("log", b"x")
            except BaseException as e:
                failures.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acked) >= 100)
        routers[0].kill()
        n = len(acked)
        wait_for(lambda: len(acked) >= n + 200 or bool(failures))
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not failures, failures
    assert len(acked) >= 300
    with Client(routers[1].address, timeout=30) as c:
        s = c.session(sid)
        assert sorted(acked) == list(range(1, len(acked) + 1))  # each incr applied once
        assert s.get("n").value == str(len(acked)).encode()
        assert len(s.read("log")) == len(acked)


def test_killed_router_is_invisible_to_async_clients(procs: Procs) -> None:
    shard = procs.shard("s1")
    routers = [procs.router([shard.address]), procs.router([shard.address])]

    async def main() -> None:
        acked: list[int] = []
        stop = asyncio.Event()
        async with AsyncClient([r.address for r in routers], retry=PATIENT, timeout=PATIENCE) as c:
            s = c.session(uid())

            async def worker() -> None:
                while not stop.is_set():
                    acked.append(await s.incr("n"))

            async def until(k: int) -> None:
                deadline = time.monotonic() + 60
                while len(acked) < k and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)

            tasks = [asyncio.ensure_future(worker()) for _ in range(16)]
            try:
                await until(200)
                await asyncio.to_thread(routers[0].kill)
                await until(len(acked) + 400)
            finally:
                stop.set()
                await asyncio.gather(*tasks)
            assert len(acked) >= 600
            assert sorted(acked) == list(range(1, len(acked) + 1))
            assert (await s.get("n")).value == str(len(acked)).encode()
            modes = {m["mode"] for m in c.batching_stats().values()}
            assert modes == {"pipeline"}

    run(main())


def test_watch_resumes_across_shard_kill_9(procs: Procs) -> None:
    shard = procs.shard("s1")
    sid = uid()
    seen: list[Change] = []
    failures: list[BaseException] = []
    total = 60

    with Client(shard.address, retry=PATIENT, timeout=PATIENCE) as c:
        s = c.session(sid)
        first = s.put("k", b"0")

        def watcher() -> None:
            try:
                with Client(shard.address, retry=PATIENT, timeout=PATIENCE) as wc:
                    for ch in wc.session(sid).watch(from_revision=first):
                        seen.append(ch)
                        if len(seen) == total:
                            return
            except BaseException as e:
                failures.append(e)

        t = threading.Thread(target=watcher, daemon=True)
        t.start()
        for i in range(1, total):
            s.put("k", str(i))
            if i in (20, 40):
                wait_for(lambda: len(seen) >= 15)
                shard.kill()
                time.sleep(0.3)
                shard.start()
        t.join(120)
    assert not failures, failures
    assert [ch.value for ch in seen] == [str(i).encode() for i in range(total)]
    revs = [ch.revision for ch in seen]
    assert revs == sorted(set(revs))  # nothing twice, in order
