"""AsyncClient against a real shard, with and without auto-batching: every AsyncSession method
round-trips, update() from 8 tasks is exact, concurrent calls coalesce into Pipeline batches,
the fallbacks (no Pipeline; no Batch either) work, deadlines apply, and pipelined retries
survive kill -9 without double-applying.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from shardstate import (
    AsyncClient,
    Change,
    ConflictError,
    ConstantBackoff,
    DeadlineExceededError,
    HistoryCompactedError,
    InvalidArgumentError,
    Retry,
    SessionInfo,
    UnavailableError,
)
from shardstate.v1 import state_pb2, state_pb2_grpc
from tests.procs import Procs
from tests.stubs import dead_address, run, uid


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    procs = Procs(Path(tmp_path_factory.mktemp("client-async")))
    try:
        yield procs.shard("s1").address
    finally:
        procs.close()


BATCHING = pytest.mark.parametrize("batching", [True, False], ids=["batching", "unary"])


@BATCHING
def test_every_method_round_trips(shard: str, batching: bool) -> None:
    async def main() -> None:
        async with AsyncClient(shard, batching=batching, timeout=30) as c:
            sid = uid()
            s = c.session(sid, ttl=3600)
            assert await s.get("state") is None
            v = await s.put("state", b"one")
            rec = await s.get("state")
            assert rec is not None and rec.value == b"one" and rec.version == v
            with pytest.raises(ConflictError) as ei:
                await s.put("state", b"x", expect=v - 1)
            assert ei.value.current == rec
            assert (await s.update("state", lambda old: old.value + b"!")).value == b"one!"
            assert await s.incr("steps") == 1 and await s.incr("steps", 2) == 3
            assert await s.put_json("j", {"a": 1}) > 0 and await s.get_json("j") == {"a": 1}
            assert await s.update_json("j", lambda o: {**o, "b": 2}) == {"a": 1, "b": 2}
            assert [r.key for r in await s.scan(limit=None)] == ["j", "state", "steps"]
            assert await s.append("messages", [b"a", b"b"]) == [1, 2]
            assert [e.seq for e in await s.read("messages", last=1)] == [2]
            assert await s.read("nope") == [] and await s.pop("nope") is None
            assert (await s.pop("messages")).data == b"b"
            assert await s.trim("messages", keep_last=0, before_seq=2) == 1
            r = await (s.txn().if_version("state", 1).put("state", b"z").otherwise().get("state").commit())
            assert not r.succeeded and r.results[0].value == b"one!"
            r = await s.txn().if_exists("state").delete("state").incr("steps").commit()
            assert r.succeeded and r.results == [True, 4]
            info = await s.info()
            assert isinstance(info, SessionInfo) and info.key_count == 2 and info.expires_at > 0
            assert await s.touch(ttl=60) > 0
            assert [i.session_id async for i in c.list_sessions(sid)] == [sid]
            got = await c.multi_get([(sid, "steps"), (sid, "nope")])
            assert got[0].value == b"4" and got[1] is None
            b = c.batch()
            b.incr(sid, "steps").put(sid, "k", "v", expect=5).get(sid, "steps")
            out = await b.execute(raise_on_error=False)
            assert out[0] == 5 and isinstance(out[1], ConflictError) and out[2].value == b"5"
            assert c.revision >= s.revision > v
            assert await s.drop() is True and await s.info() is None and await s.drop() is False

    run(main())


@BATCHING
def test_watch_yields_changes_and_compaction_surfaces(shard: str, batching: bool) -> None:
    async def main() -> None:
        async with AsyncClient(shard, batching=batching, timeout=30) as c:
            s = c.session(uid())
            v = await s.put("a", b"1")
            await s.append("log", b"x")
            await s.delete("a")
            seen: list[Change] = []
            async for ch in s.watch(from_revision=v):
                seen.append(ch)
                if len(seen) == 3:
                    break
            assert [x.type for x in seen] == ["put", "append", "delete"]

            # Live: a watcher from now sees a write made after it started.
            async def live() -> Change:
                async for ch in s.watch(prefix="live"):
                    return ch
                raise AssertionError("watch ended")

            task = asyncio.ensure_future(live())
            await asyncio.sleep(0.5)
            await s.put("other", b"ignored")
            await s.put("live-key", b"hello")
            ch = await asyncio.wait_for(task, 30)
            assert ch.key == "live-key" and ch.value == b"hello"

    run(main())


def test_watch_of_compacted_history_raises(procs: Procs) -> None:
    shard = procs.shard("s1", "--changelog-retention", "5", "--sweep-interval-s", "0.1")

    async def first_change(s: Any, rev: int) -> Change:
        async for ch in s.watch(from_revision=rev):
            return ch
        raise AssertionError("watch ended")

    async def main() -> None:
        async with AsyncClient(shard.address, timeout=30) as c:
            s = c.session(uid())
            first = await s.put("k", b"0")
            for i in range(20):
                await s.put("k", str(i))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the sweeper trims the change log soon
                try:
                    await asyncio.wait_for(first_change(s, first), 2)
                except HistoryCompactedError as e:
                    assert e.oldest_revision > first
                    return
                except TimeoutError:
                    pass
                await asyncio.sleep(0.2)
            raise AssertionError("history was never compacted")

    run(main())


@BATCHING
def test_update_from_8_tasks_is_exact(shard: str, batching: bool) -> None:
    async def main() -> None:
        async with AsyncClient(shard, batching=batching, timeout=30) as c:
            sid = uid()
            shared = c.session(sid)

            async def worker(i: int) -> None:
                s = shared if i % 2 else c.session(sid)
                for _ in range(50):
                    await s.update("counter", lambda old: str(int(old.value) + 1 if old else 1))

            await asyncio.gather(*(worker(i) for i in range(8)))
            assert (await c.session(sid).get("counter")).value == b"400"

    run(main())


@BATCHING
def test_update_writing_nothing_decides_from_the_stored_record(shard: str, batching: bool) -> None:
    async def main() -> None:
        async with AsyncClient(shard, batching=batching, timeout=30) as c:
            s = c.session(uid())
            other = c.session(s.session_id)  # its own version cache
            mark = await s.update("phase", lambda old: b"done")
            await other.put("phase", b"reset")  # s's cache still says "done"
            seen: list[bytes | None] = []

            def finish(old: Any) -> bytes | None:
                seen.append(old.value if old else None)
                return None if old is not None and old.value == b"done" else b"done"

            rec = await s.update("phase", finish)
            assert seen == [b"done", b"reset"]
            stored = await s.get("phase")
            assert (rec.value, rec.version) == (stored.value, stored.version)
            assert rec.value == b"done" and rec.version > mark.version
            again = await s.update("phase", finish)
            assert again.version == rec.version == (await s.get("phase")).version

    run(main())


def test_concurrent_calls_coalesce_into_pipeline_batches(shard: str) -> None:
    async def main() -> None:
        async with AsyncClient(shard, timeout=30) as c:
            sessions = [c.session(uid()) for _ in range(300)]
            versions = await asyncio.gather(*(s.put("k", s.session_id) for s in sessions))
            recs = await asyncio.gather(*(s.get("k") for s in sessions))
            assert [r.version for r in recs] == versions
            assert [r.value for r in recs] == [s.session_id.encode() for s in sessions]
            stats = c.batching_stats()[shard]
            assert stats["mode"] == "pipeline" and stats["ops"] == 600
            assert stats["batches"] <= 20  # 300 calls in one tick travel together

    run(main())


def test_pipelined_deadline(shard: str) -> None:
    async def main() -> None:
        async with AsyncClient(shard, retry=Retry(attempts=1), timeout=30) as c:
            s = c.session(uid())
            with pytest.raises(DeadlineExceededError):
                await s.get("k", timeout=1e-6)
            assert await s.get("k") is None  # the stream is still usable

    run(main())


class _Forwarder(state_pb2_grpc.StateServicer):
    """A real gRPC server in front of the shard that only knows some RPCs (the others answer
    UNIMPLEMENTED, as a server built before Pipeline would)."""

    def __init__(self, target: str, with_batch: bool) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = state_pb2_grpc.StateStub(self.channel)
        self.with_batch = with_batch
        self.calls: dict[str, int] = {}

    async def _fwd(self, name: str, req: Any, context: grpc.aio.ServicerContext) -> Any:
        self.calls[name] = self.calls.get(name, 0) + 1
        try:
            return await getattr(self.stub, name)(req)
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "")

    async def Get(self, req: Any, context: Any) -> Any:
        return await self._fwd("Get", req, context)

    async def Put(self, req: Any, context: Any) -> Any:
        return await self._fwd("Put", req, context)

    async def Increment(self, req: Any, context: Any) -> Any:
        return await self._fwd("Increment", req, context)

    async def Batch(self, req: Any, context: Any) -> Any:
        if not self.with_batch:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Batch is not built here")
        return await self._fwd("Batch", req, context)


@pytest.mark.parametrize("with_batch", [True, False], ids=["batch", "unary"])
def test_falls_back_when_pipeline_is_unimplemented(shard: str, with_batch: bool) -> None:
    async def main() -> None:
        fwd = _Forwarder(shard, with_batch)
        server = grpc.aio.server()
        state_pb2_grpc.add_StateServicer_to_server(fwd, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        addr = f"127.0.0.1:{port}"
        try:
            async with AsyncClient(addr, timeout=30) as c:
                s = c.session(uid())
                # 20 concurrent increments: each answers a distinct new value, 1..20
                assert sorted(await asyncio.gather(*(s.incr("n") for _ in range(20)))) == list(range(1, 21))
                assert (await s.get("n")).value == b"20"
                await s.put("k", b"v")
                assert (await s.get("k")).value == b"v"
                mode = c.batching_stats()[addr]["mode"]
                assert mode == ("batch" if with_batch else "unary")
                if with_batch:
                    assert fwd.calls["Batch"] >= 1 and "Increment" not in fwd.calls
                else:
                    assert fwd.calls["Increment"] == 20
        finally:
            await fwd.channel.close()
            await server.stop(None)

    run(main())


@BATCHING
def test_dead_address_beside_a_live_one(shard: str, batching: bool) -> None:
    async def main() -> None:
        dead = dead_address()
        retry = Retry(attempts=3, backoff=ConstantBackoff(0.05))
        async with AsyncClient([dead, shard], batching=batching, retry=retry, timeout=30) as c:
            s = c.session(uid())
            for i in range(10):
                await asyncio.gather(*(s.put(f"k{i}-{j}", b"v") for j in range(5)))
                assert await s.incr("n") == i + 1
            assert len(await s.scan(limit=None)) == 51
        async with AsyncClient([dead], batching=batching, retry=Retry(attempts=2), timeout=5) as c:
            with pytest.raises(UnavailableError):
                await c.session("x").get("k")

    run(main())


def test_bad_input_before_any_rpc() -> None:
    async def main() -> None:
        async with AsyncClient(dead_address(), retry=Retry(attempts=1), timeout=5) as c:
            with pytest.raises(InvalidArgumentError, match="session_id must not be empty"):
                c.session("")
            s = c.session("ok")
            with pytest.raises(InvalidArgumentError, match="value must be bytes or str, got int"):
                await s.put("k", 1)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgumentError, match="key must not be empty"):
                await s.update("", lambda old: b"")
            with pytest.raises(InvalidArgumentError, match="session_id must not be empty"):
                c.batch().get("", "k")

    run(main())


@BATCHING
def test_retries_survive_kill_9_without_double_applying(procs: Procs, batching: bool) -> None:
    shard = procs.shard("s1")
    retry = Retry(attempts=400, backoff=ConstantBackoff(0.1), attempt_timeout=10)

    async def main() -> tuple[list[int], list[int]]:
        acked: list[int] = []
        counts: list[int] = []
        failures: list[Exception] = []
        stop = asyncio.Event()
        async with AsyncClient(shard.address, batching=batching, retry=retry, timeout=30) as c:
            s = c.session("crashy")

            async def writer(w: int) -> None:
                n = 0
                try:
                    while not stop.is_set():
                        acked.extend(await s.append("log", [f"w{w}-{n}"]))
                        counts.append(await s.incr("n"))
                        n += 1
                except Exception as e:
                    failures.append(e)

            async def progress(k: int) -> None:
                target = len(acked) + k
                deadline = time.monotonic() + 60
                while len(acked) < target and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)

            tasks = [asyncio.ensure_future(writer(w)) for w in range(8)]
            try:
                for _ in range(2):
                    await progress(100)
                    await asyncio.to_thread(shard.kill)
                    await asyncio.sleep(0.3)
                    await asyncio.to_thread(shard.start)
                await progress(100)
            finally:
                stop.set()
                await asyncio.gather(*tasks)
            assert not failures, f"{failures!r}; shard alive={shard.alive()}; log:\n{shard.log_tail()}"
            entries = await s.read("log")
            assert sorted(e.seq for e in entries) == sorted(acked) == list(range(1, len(acked) + 1))
            assert len({e.data for e in entries}) == len(entries)
            assert sorted(counts) == list(range(1, len(counts) + 1))
            assert (await s.get("n")).value == str(len(counts)).encode()
        return acked, counts

    acked, _ = run(main())
    assert len(acked) >= 300


class _StallFirstPipeline(state_pb2_grpc.StateServicer):
    """A real gRPC server whose first Pipeline stream swallows requests and never answers (a
    half-open connection, as far as the client can tell); later streams run each batch as a
    Batch on the shard."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = state_pb2_grpc.StateStub(self.channel)
        self.streams = 0

    async def Pipeline(self, request_iterator: Any, context: Any) -> Any:
        self.streams += 1
        stall = self.streams == 1
        async for req in request_iterator:
            if stall:
                continue
            resp = await self.stub.Batch(req.batch)
            yield state_pb2.PipelineResponse(id=req.id, batch=resp)


def test_silent_pipeline_stream_is_abandoned_and_retried(shard: str) -> None:
    async def main() -> None:
        fwd = _StallFirstPipeline(shard)
        server = grpc.aio.server()
        state_pb2_grpc.add_StateServicer_to_server(fwd, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        addr = f"127.0.0.1:{port}"
        try:
            retry = Retry(attempts=3, backoff=ConstantBackoff(0.01))
            async with AsyncClient(addr, retry=retry, timeout=30) as c:
                s = c.session(uid())
                # One batch on the silent stream: when the short calls reach their deadline
                # (which ends them) the stream is given up, and the others, with time left,
                # are retried over a new one.
                got = await asyncio.gather(*(s.incr("n", timeout=1.0 if i < 2 else None) for i in range(5)),
                                           return_exceptions=True)
                assert all(isinstance(e, DeadlineExceededError) for e in got[:2]), got
                # each answered once with its own value, none applied twice by the retries
                assert sorted(got[2:]) == [1, 2, 3], got  # type: ignore[type-var]
                assert (await s.get("n")).value == b"3"  # applied once each, after the reopen
                assert fwd.streams == 2
        finally:
            await fwd.channel.close()
            await server.stop(None)

    run(main())


def test_concurrent_large_puts_are_not_refused_as_one_oversized_batch(shard: str) -> None:
    """Six puts of 900 KiB, each well within the value and request limits, issued in one
    tick: coalescing them must not make one message over the server's request limit that
    fails them all; each succeeds as it does unbatched."""
    async def main() -> None:
        async with AsyncClient(shard, timeout=30) as c:
            s = c.session(uid())
            values = [bytes([65 + i]) * (900 * 1024) for i in range(6)]
            versions = await asyncio.gather(*(s.put(f"k{i}", v) for i, v in enumerate(values)))
            assert all(v > 0 for v in versions)
            recs = await asyncio.gather(*(s.get(f"k{i}") for i in range(6)))
            assert [r.value for r in recs] == values

    run(main())


def test_batches_shrink_to_the_servers_own_limits(procs: Procs) -> None:
    """Against a shard and a router run with smaller --max-batch-ops and --max-request-bytes
    than the client's defaults, concurrent single calls - each within every limit - succeed
    as they do unbatched: the client does not let a batch it made up fail them all."""
    limits = ("--max-batch-ops", "10", "--max-request-bytes", str(1024 * 1024))
    shard = procs.shard("s1", *limits)
    router = procs.router([shard.address], *limits)

    async def main(address: str) -> None:
        async with AsyncClient(address, timeout=30) as c:
            sessions = [c.session(uid()) for _ in range(30)]
            assert await asyncio.gather(*(s.incr("n") for s in sessions)) == [1] * 30
            s = sessions[0]
            values = [bytes([65 + i]) * (300 * 1024) for i in range(6)]
            assert all(v > 0 for v in await asyncio.gather(*(s.put(f"k{i}", v) for i, v in enumerate(values))))
            assert [r.value for r in await asyncio.gather(*(s.get(f"k{i}") for i in range(6)))] == values

    for address in (shard.address, router.address):
        run(main(address))


def test_batches_stay_within_the_clients_own_send_limit(shard: str) -> None:
    """A client whose max_message_bytes is below the server's 4 MiB request limit builds its
    batches within its own limit: concurrent valid puts that would add up to more than it can
    send each succeed."""
    limit = 2 * 1024 * 1024
    value = b"v" * (900 * 1024)

    async def main() -> None:
        async with AsyncClient(shard, timeout=30, max_message_bytes=limit) as c:
            sessions = [c.session(uid()) for _ in range(6)]  # 5.4 MB together
            versions = await asyncio.gather(*(s.put("k", value) for s in sessions))
            got = await asyncio.gather(*(s.get("k") for s in sessions))
            assert [r.version for r in got] == versions and all(r.value == value for r in got)
            assert c.batching_stats()[shard]["mode"] == "pipeline"

    run(main())
