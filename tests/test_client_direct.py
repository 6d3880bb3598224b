"""Direct mode (`Client(..., direct=True)`, `AsyncClient(..., direct=True)`) against real
shard and router processes: calls go to the owning primaries (they keep working while the
router is stopped), CAS from many threads, a WrongShard after a map change is followed, and a
kill -9 of a primary with `promote` is carried through without an error or a lost write.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable

import grpc

from shardstate import AsyncClient, Client, ConflictError, ConstantBackoff, Retry
from shardstate.common.clustermap import ClusterView
from shardstate.v1 import admin_pb2, admin_pb2_grpc
from tests.procs import Proc, Procs
from tests.stubs import run, uid, wait_until

PATIENT = Retry(attempts=400, backoff=ConstantBackoff(0.1), attempt_timeout=10)  # within timeout=PATIENCE
PATIENCE = 60  # s: each call's deadline (a failover fits in it many times)


def cluster_map(router: Proc) -> admin_pb2.ClusterMap:
    with grpc.insecure_channel(router.address) as ch:
        return admin_pb2_grpc.AdminStub(ch).GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=30)


def promote(router: Proc) -> str:
    with grpc.insecure_channel(router.address) as ch:
        resp = admin_pb2_grpc.AdminStub(ch).PromoteReplica(admin_pb2.PromoteReplicaRequest(shard_id="s1"), timeout=60)
    return str(resp.new_primary)


def two_shards(procs: Procs) -> tuple[Proc, Proc, Proc]:
    s1, s2 = procs.shard("s1"), procs.shard("s2")
    return s1, s2, procs.router([s1.address, s2.address])


def test_sync_direct_client_serves_from_the_primaries_while_the_router_is_stopped(procs: Procs) -> None:
    _, _, router = two_shards(procs)
    sids = [f"{uid()}-{i}" for i in range(40)]
    with Client(router.address, direct=True, timeout=10) as c:
        for sid in sids:
            s = c.session(sid)
            v = s.put("state", b"one")
            s.put("state", b"two", expect=v)
            assert s.incr("n") == 1
            assert s.append("log", [b"a", b"b"]) == [1, 2]
        direct = c._core.direct
        assert direct is not None and direct.fallbacks == 0 and direct.direct_calls >= 4 * len(sids)
        owners = {ClusterView.of(cluster_map(router)).owner("default", sid).id for sid in sids}
        assert owners == {"s1", "s2"}  # both shards were written to straight
        assert router.popen is not None
        router.popen.send_signal(signal.SIGSTOP)
        try:
            for sid in sids:  # nothing here needs the router
                s = c.session(sid)
                rec = s.get("state")
                assert rec is not None and rec.value == b"two"
                assert s.incr("n") == 2
                assert [e.data for e in s.read("log", last=5)] == [b"a", b"b"]
        finally:
            router.popen.send_signal(signal.SIGCONT)
    with Client(router.address, timeout=30) as plain:  # the router sees the same data
        for sid in sids:
            s = plain.session(sid)
            rec = s.get("state")
            assert rec is not None and rec.value == b"two" and s.incr("n") == 3


def test_async_direct_client_batches_to_each_primary(procs: Procs) -> None:
    s1, s2, router = two_shards(procs)
    sids = [f"{uid()}-{i}" for i in range(64)]

    async def main() -> None:
        async with AsyncClient(router.address, direct=True, timeout=10) as c:
            await asyncio.gather(*(c.session(sid).put("k", sid.encode()) for sid in sids))
            got = await asyncio.gather(*(c.session(sid).get("k") for sid in sids))
            assert [r.value if r else None for r in got] == [sid.encode() for sid in sids]
            assert await asyncio.gather(*(c.session(sid).incr("n", 5) for sid in sids)) == [5] * len(sids)
            stats = c.batching_stats()
            assert set(stats) == {s1.address, s2.address}  # batches went to the shards, not the router
            assert sum(st["ops"] for st in stats.values()) >= 3 * len(sids)
            direct = c._core.direct
            assert direct is not None and direct.fallbacks == 0

    run(main())


def test_callers_looping_over_both_shards_keep_coalescing(procs: Procs) -> None:
    """32 callers, each a loop of get then CAS put on sessions of either shard: the answers of
    the two shards arrive at different moments, and with every op sent at once the batches
    fell apart into single ops (1.2 ops per batch in benchmarks/compare). With one batch per
    shard unanswered at most, the ops that wait for room coalesce: each batch carries several,
    and every CAS lands exactly once."""
    s1, s2, router = two_shards(procs)
    sids = [f"{uid()}-{i}" for i in range(200)]
    rounds = 40

    async def main() -> None:
        async with AsyncClient(router.address, direct=True, timeout=10) as c:
            handles = [c.session(sid) for sid in sids]
            await asyncio.gather(*(h.put("n", b"0") for h in handles))
            before = c.batching_stats()

            async def caller(i: int) -> None:
                for r in range(rounds):
                    h = handles[(i * 7919 + r * 104729) % len(handles)]
                    while True:  # two callers may meet on a session: the loser reads again
                        rec = await h.get("n")
                        assert rec is not None
                        try:
                            await h.put("n", str(int(rec.value) + 1).encode(), expect=rec.version)
                            break
                        except ConflictError:
                            continue

            await asyncio.gather(*(caller(i) for i in range(5)))  # warm both streams
            await asyncio.gather(*(caller(i) for i in range(32)))
            stats = c.batching_stats()
            assert set(stats) == {s1.address, s2.address}  # straight to both primaries
            ops = sum(stats[a]["ops"] - before[a]["ops"] for a in stats)
            batches = sum(stats[a]["batches"] - before[a]["batches"] for a in stats)
            assert ops >= 2 * 32 * rounds
            assert ops / batches >= 3, (ops, batches)  # it was ~1.2 before the window
            total = sum(int(r.value) for r in await asyncio.gather(*(h.get("n") for h in handles)) if r)
            assert total == (32 + 5) * rounds

    run(main())


def test_cas_from_8_threads_x_50_ends_at_400(procs: Procs) -> None:
    _, _, router = two_shards(procs)
    sid = uid()
    errors: list[BaseException] = []
    with Client(router.address, direct=True, timeout=30) as c:
        def worker() -> None:
            s = c.session(sid)  # a handle per thread, one client shared
            try:
                for _ in range(50):
                    s.update("n", lambda old: json.dumps(json.loads(old.value) + 1 if old else 1).encode(),
                             attempts=1000)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        rec = c.session(sid).get("n")
        assert rec is not None and json.loads(rec.value) == 400


def test_a_wrong_shard_after_a_map_change_is_followed(procs: Procs) -> None:
    s1, s2 = procs.shard("s1"), procs.shard("s2")
    router = procs.router([s1.address])  # a one-shard cluster: s1 owns every session
    with Client(router.address, direct=True, timeout=30) as c:
        c.session("warm-up").put("k", b"v")
        direct = c._core.direct
        assert direct is not None and direct.view is not None and direct.view.epoch == cluster_map(router).epoch
        # s2 joins the map through the router (no data moves: the sessions it now owns are new).
        pb = cluster_map(router)
        pb.shards.add(id="s2", primary=s2.address, weight=1)
        pb.epoch += 1
        with grpc.insecure_channel(router.address) as ch:
            assert admin_pb2_grpc.AdminStub(ch).PublishClusterMap(pb, timeout=30).adopted
        view = ClusterView.of(pb)
        sid = next(f"moved-{i}" for i in range(1000) if view.owner("default", f"moved-{i}").id == "s2")
        before = direct.fallbacks
        v = c.session(sid).put("k", b"on-s2")  # sent to s1 on the old map: WrongShard, then the router
        assert direct.fallbacks == before + 1 and direct.stale
        calls = direct.direct_calls
        time.sleep(0.1)  # past the refresh throttle, so the next call fetches the map at once
        assert c.session(sid).put("k", b"again", expect=v) > v  # the new map: straight to s2
        assert direct.view.epoch == pb.epoch
        assert direct.fallbacks == before + 1 and direct.direct_calls == calls + 1
    with Client(s2.address, timeout=30) as on_s2:  # it is on s2 itself
        rec = on_s2.session(sid).get("k")
        assert rec is not None and rec.value == b"again"


def test_kill_9_of_a_primary_and_promote_under_a_direct_client_loses_no_acknowledged_write(procs: Procs) -> None:
    primary = procs.shard("s1", "--min-replica-acks", "1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, replica.address])
    sids = [uid() for _ in range(4)]
    acked: dict[str, list[int]] = {sid: [] for sid in sids}
    failures: list[BaseException] = []
    stop = threading.Event()
    with Client(router.address, direct=True, retry=PATIENT, timeout=PATIENCE) as c:
        def worker(sid: str) -> None:
            s = c.session(sid)
            try:
                while not stop.is_set():
                    acked[sid].append(s.incr("n"))
            except BaseException as e:
                failures.append(e)

        threads = [threading.Thread(target=worker, args=(sid,)) for sid in sids]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: sum(map(len, acked.values())) >= 200, timeout=60)
            primary.kill()
            n = sum(map(len, acked.values()))
            assert promote(router) == replica.address
            wait_until(lambda: sum(map(len, acked.values())) >= n + 200 or bool(failures), timeout=90)
            direct = c._core.direct
            assert direct is not None
            calls = direct.direct_calls
            wait_until(lambda: direct.direct_calls > calls + 50 or bool(failures), timeout=60)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        assert not failures, failures
        assert direct.view is not None and direct.view.shard("s1").primary == replica.address
    with Client(replica.address, timeout=30) as after:
        for sid in sids:
            # Every acknowledged increment is there, each applied once (the retries of the one in
            # flight at the kill carried its request_id to the new primary).
            assert sorted(acked[sid]) == list(range(1, len(acked[sid]) + 1))
            rec = after.session(sid).get("n")
            assert rec is not None and int(rec.value) == len(acked[sid])


def test_the_first_direct_call_fetches_the_map_from_the_router(procs: Procs) -> None:
    s1 = procs.shard("s1")
    router = procs.router([s1.address])
    with Client(router.address, direct=True, timeout=30) as c:
        direct = c._core.direct
        assert direct is not None and direct.view is None
        c.session("a").put("k", b"v")
        # fetched for the first call, which then went to s1 itself
        assert direct.view is not None and (direct.direct_calls, direct.fallbacks) == (1, 0)


def test_kill_9_of_a_primary_and_promote_under_an_async_direct_client(procs: Procs) -> None:
    primary = procs.shard("s1", "--min-replica-acks", "1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, replica.address])
    sids = [uid() for _ in range(8)]
    acked: dict[str, list[int]] = {sid: [] for sid in sids}

    async def main() -> None:
        async with AsyncClient(router.address, direct=True, retry=PATIENT, timeout=PATIENCE) as c:
            stop = asyncio.Event()

            async def worker(sid: str) -> None:
                s = c.session(sid)
                while not stop.is_set():
                    acked[sid].append(await s.incr("n"))

            async def until(cond: Callable[[], bool], timeout: float) -> None:
                deadline = time.monotonic() + timeout
                while not cond() and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)

            tasks = [asyncio.ensure_future(worker(sid)) for sid in sids]
            total = lambda: sum(map(len, acked.values()))  # noqa: E731
            await until(lambda: total() >= 300, 60)
            primary.kill()
            n = total()
            await asyncio.to_thread(promote, router)
            await until(lambda: total() >= n + 300 or any(t.done() for t in tasks), 90)
            stop.set()
            await asyncio.gather(*tasks)  # a worker's error surfaces here
            direct = c._core.direct
            assert direct is not None and direct.view is not None
            assert direct.view.shard("s1").primary == replica.address
            assert set(c.batching_stats()) >= {replica.address}  # batches went to the new primary

    run(main())
    with Client(replica.address, timeout=30) as after:
        for sid in sids:
            assert sorted(acked[sid]) == list(range(1, len(acked[sid]) + 1))
            rec = after.session(sid).get("n")
            assert rec is not None and int(rec.value) == len(acked[sid])
