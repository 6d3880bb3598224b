"""The router hop: agent steps (Get + CAS Put of 1 KiB) through a router versus straight to the
owning shard, with plain grpc.aio stubs, and the CPU each process spends per op.

    .venv/bin/python benchmarks/router_hop.py                  # 3 shards + 1 router, 32 callers
    .venv/bin/python benchmarks/router_hop.py --duration 5 --concurrency 64 --sessions 10000

Modes: `direct` (the caller computes the owner with the shared ring, as a smart client does),
`router` (unary calls through the router), `router-batch` (each caller's step as one Batch of
Get, then one Batch of Put — the unary-Batch path a client's auto-batching uses), and
`router-pipeline` (steps of all callers multiplexed over one Pipeline stream, one op per
batch), and `client-lib` (the AsyncClient, which coalesces concurrent ops into Pipeline
batches, through the router). CPU is
utime+stime from /proc/<pid>/stat over the measured window.
"""

from __future__ import annotations

import shardstate.bench  # noqa: F401  (first: chooses grpc's transport before grpc loads)

# isort: split

import argparse
import asyncio
import itertools
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shardstate.common.clustermap import ClusterView
from shardstate.common.errors import ConflictError
from shardstate.v1 import admin_pb2, admin_pb2_grpc, state_pb2, state_pb2_grpc
from tests.procs import Procs

CLK_TCK = os.sysconf("SC_CLK_TCK")
VALUE = b"x" * 1024


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Pipe:
    """One Pipeline stream shared by every caller; answers matched by id."""

    def __init__(self, stub: state_pb2_grpc.StateStub) -> None:
        self.call = stub.Pipeline()
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.lock = asyncio.Lock()  # one write at a time on a stream
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for resp in self.call:
            self.waiting.pop(resp.id).set_result(resp)

    async def batch(self, ops: list[state_pb2.BatchOp]) -> Any:
        rid = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[rid] = fut
        async with self.lock:
            await self.call.write(state_pb2.PipelineRequest(id=rid, batch=state_pb2.BatchRequest(ops=ops)))
        return await fut


async def run_mode(mode: str, router: str, view: ClusterView, sessions: list[str], args: argparse.Namespace,
                   pids: dict[str, int]) -> dict[str, float]:
    channels: dict[str, grpc.aio.Channel] = {}

    def stub(addr: str) -> state_pb2_grpc.StateStub:
        if addr not in channels:
            channels[addr] = grpc.aio.insecure_channel(addr)
        return state_pb2_grpc.StateStub(channels[addr])

    rstub = stub(router)
    pipe = Pipe(rstub) if mode == "router-pipeline" else None
    lib = None
    if mode == "client-lib":
        from shardstate import AsyncClient

        lib = AsyncClient(router, timeout=30)
    versions: dict[str, int] = {}
    steps = 0
    lat: list[float] = []
    stop_at = 0.0
    measuring = False

    async def step(sid: str) -> None:
        if lib is not None:
            s = lib.session(sid)
            rec = await s.get("state")
            try:
                await s.put("state", VALUE, expect=rec.version if rec else 0)
            except ConflictError:
                pass
            return
        target = stub(view.owner("", sid).primary) if mode == "direct" else rstub
        get = state_pb2.GetRequest(session_id=sid, key="state")
        if mode in ("direct", "router"):
            got = await target.Get(get, timeout=30)
            ver = got.record.version if got.found else 0
            await target.Put(state_pb2.PutRequest(session_id=sid, key="state", value=VALUE, expected_version=ver), timeout=30)
            return
        run = pipe.batch if pipe is not None else (lambda ops: target.Batch(state_pb2.BatchRequest(ops=ops), timeout=30))
        got = (await run([state_pb2.BatchOp(get=get)])).batch.results[0] if pipe else (await run([state_pb2.BatchOp(get=get)])).results[0]
        ver = got.get.record.version if got.get.found else 0
        put = state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key="state", value=VALUE, expected_version=ver))
        await run([put])

    async def worker(seed: int) -> None:
        nonlocal steps
        rnd = random.Random(seed)
        while time.monotonic() < stop_at:
            sid = rnd.choice(sessions)
            t0 = time.perf_counter()
            await step(sid)
            if measuring:
                steps += 1
                lat.append(time.perf_counter() - t0)

    stop_at = time.monotonic() + args.warmup
    await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    measuring = True
    cpu0 = {k: cpu_s(p) for k, p in pids.items()}
    t0 = time.monotonic()
    stop_at = t0 + args.duration
    await asyncio.gather(*(worker(100 + i) for i in range(args.concurrency)))
    elapsed = time.monotonic() - t0
    cpu1 = {k: cpu_s(p) for k, p in pids.items()}
    del versions
    if pipe is not None:
        await pipe.call.done_writing()
    if lib is not None:
        await lib.close()
    for ch in channels.values():
        await ch.close()
    lat.sort()
    ops = steps * 2
    out = {"steps/s": steps / elapsed, "p50 ms": lat[len(lat) // 2] * 1000, "p99 ms": lat[int(len(lat) * 0.99)] * 1000}
    shard_cpu = sum(cpu1[k] - cpu0[k] for k in pids if k != "router")
    out["shard CPU µs/op"] = shard_cpu / ops * 1e6
    out["router CPU µs/op"] = (cpu1["router"] - cpu0["router"]) / ops * 1e6 if mode != "direct" else 0.0
    return out


async def main_async(args: argparse.Namespace, router: str, pids: dict[str, int]) -> None:
    async with grpc.aio.insecure_channel(router) as ch:
        pb = await admin_pb2_grpc.AdminStub(ch).GetClusterMap(admin_pb2.GetClusterMapRequest())
    view = ClusterView.of(pb)
    sessions = [f"bench-{i}" for i in range(args.sessions)]
    console = Console()
    table = Table("mode", "steps/s", "p50 ms", "p99 ms", "router CPU µs/op", "shard CPU µs/op",
                  title=f"Get + CAS Put of 1 KiB, {args.sessions} sessions, {args.concurrency} callers, {len(pb.shards)} shards")
    for mode in args.modes.split(","):
        r = await run_mode(mode, router, view, sessions, args, pids)
        table.add_row(mode, *(f"{r[k]:.0f}" if k == "steps/s" else f"{r[k]:.1f}" for k in
                              ("steps/s", "p50 ms", "p99 ms", "router CPU µs/op", "shard CPU µs/op")))
    console.print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--modes", default="direct,router,router-batch,router-pipeline,client-lib")
    p.add_argument("--router-args", default="", help="extra flags for the router, e.g. '--no-shard-pipeline'")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        procs = Procs(Path(tmp))
        try:
            shards = [procs.shard(f"s{i}") for i in range(1, args.shards + 1)]
            router = procs.router([s.address for s in shards], *args.router_args.split())
            pids = {f"s{i}": s.popen.pid for i, s in enumerate(shards, 1) if s.popen}
            assert router.popen is not None
            pids["router"] = router.popen.pid
            asyncio.run(main_async(args, router.address, pids))
        finally:
            procs.close()


if __name__ == "__main__":
    main()
