"""Rebalancing figures on this machine, with real processes (two shards and a router; a third
shard added while the `step` workload runs):

  1. migration rate of the move: sessions/s and MB/s (what Admin.Rebalance reports at the end);
  2. the step workload (Get + CAS Put of 1 KiB through the router, AsyncClient batching) before
     and during the move: steps/s, p50, p99, and the longest single step (the longest pause a
     session saw);
  3. CPU seconds the move cost the sources and the target (their CPU during the move minus
     the same workload's CPU in an equal window before it).

    .venv/bin/python -m benchmarks.rebalance_bench                      # 200 000 sessions
    .venv/bin/python -m benchmarks.rebalance_bench --sessions 20000 --concurrency 32
"""

from __future__ import annotations

import shardstate.bench  # noqa: F401  (first: chooses grpc's transport before grpc loads)

# isort: split

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from shardstate import AsyncClient, ConflictError
from shardstate.bench.procstat import cpu_seconds
from shardstate.v1 import admin_pb2, admin_pb2_grpc
from tests.procs import Procs

VALUE = b"x" * 1024


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else float("nan")


class Steps:
    def __init__(self, client: AsyncClient, sids: list[str], concurrency: int) -> None:
        self.client, self.sids, self.concurrency = client, sids, concurrency
        self.lat: list[tuple[float, float]] = []  # (end time, ms)
        self.errors = 0
        self.stop = False

    async def run(self) -> None:
        async def worker(w: int) -> None:
            rng = random.Random(w)
            while not self.stop:
                s = self.client.session(rng.choice(self.sids))
                t0 = time.perf_counter()
                try:
                    rec = await s.get("v")
                    await s.put("v", VALUE, expect=rec.version if rec else 0)
                except ConflictError:
                    pass
                except Exception:
                    self.errors += 1
                t1 = time.perf_counter()
                self.lat.append((t1, (t1 - t0) * 1000))

        await asyncio.gather(*(worker(w) for w in range(self.concurrency)))

    def window(self, a: float, b: float) -> dict[str, float]:
        ms = [m for t, m in self.lat if a <= t < b]
        return {"steps_s": len(ms) / (b - a) if b > a else 0.0, "p50": pct(ms, 50), "p99": pct(ms, 99),
                "max": max(ms, default=float("nan"))}


async def preload(router: str, sids: list[str], console: Console) -> None:
    async with AsyncClient(router, timeout=120) as client:
        sem = asyncio.Semaphore(256)

        async def one(sid: str) -> None:
            async with sem:
                await client.session(sid).put("v", VALUE)

        t0 = time.perf_counter()
        for i in range(0, len(sids), 20_000):
            await asyncio.gather(*(one(s) for s in sids[i:i + 20_000]))
            console.print(f"  loaded {min(i + 20_000, len(sids))}/{len(sids)} sessions "
                          f"({time.perf_counter() - t0:.0f} s)")


async def main_async(args: argparse.Namespace, console: Console) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="rebalance-bench-"))
    procs = Procs(tmp)
    try:
        s1, s2 = procs.shard("s1"), procs.shard("s2")
        router = procs.router([s1.address, s2.address])
        sids = [f"agent-{i}" for i in range(args.sessions)]
        console.print(f"preloading {args.sessions} sessions x 1 KiB")
        await preload(router.address, sids, console)
        s3 = procs.shard("s3")
        async with AsyncClient(router.address, timeout=60) as client:
            steps = Steps(client, sids, args.concurrency)
            load = asyncio.ensure_future(steps.run())
            await asyncio.sleep(2.0)  # warm-up
            cpu0 = {p: cpu_seconds(p.pid) for p in (s1, s2, s3)}
            b0 = time.perf_counter()
            await asyncio.sleep(args.before)
            b1 = time.perf_counter()
            cpu1 = {p: cpu_seconds(p.pid) for p in (s1, s2, s3)}
            with grpc.insecure_channel(router.address) as ch:
                stub = admin_pb2_grpc.AdminStub(ch)
                m0 = time.perf_counter()
                await asyncio.to_thread(stub.AddShard, admin_pb2.AddShardRequest(id="s3", primary=s3.address), timeout=30)
                last = None
                for p in await asyncio.to_thread(lambda: list(stub.Rebalance(admin_pb2.RebalanceRequest()))):
                    if not p.source:
                        last = p
                m1 = time.perf_counter()
            cpu2 = {p: cpu_seconds(p.pid) for p in (s1, s2, s3)}
            await asyncio.sleep(2.0)
            steps.stop = True
            await load
        before, during = steps.window(b0, b1), steps.window(m0, m1)
        move_s = m1 - m0
        assert last is not None and last.phase == "done", last
        scale = move_s / (b1 - b0)
        extra = {p.name: (cpu2[p] - cpu1[p]) - (cpu1[p] - cpu0[p]) * scale for p in (s1, s2, s3)}
        t = Table(title=f"add a third shard to two, {args.sessions} sessions x 1 KiB, "
                        f"{args.concurrency} concurrent steps")
        t.add_column("figure")
        t.add_column("value", justify="right")
        t.add_row("sessions moved", f"{last.sessions_moved}")
        t.add_row("move took (AddShard → done)", f"{move_s:.1f} s")
        t.add_row("migration rate", f"{last.sessions_moved / move_s:,.0f} sessions/s, "
                                    f"{last.bytes_moved / move_s / 1e6:.1f} MB/s")
        for name, w in (("before", before), ("during", during)):
            t.add_row(f"steps/s {name}", f"{w['steps_s']:,.0f}")
            t.add_row(f"p50 / p99 {name}", f"{w['p50']:.1f} / {w['p99']:.1f} ms")
        t.add_row("longest step during the move", f"{during['max']:.0f} ms")
        t.add_row("errors seen by the workload", str(steps.errors))
        for name, sec in extra.items():
            role = "target" if name.startswith("shard-s3") else "source"
            t.add_row(f"extra CPU of the move, {role} {name.split('-')[1]}", f"{sec:.2f} s")
        console.print(t)
    finally:
        procs.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=200_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--before", type=float, default=10.0, help="seconds of the workload measured before the move")
    args = ap.parse_args()
    asyncio.run(main_async(args, Console(width=100)))


if __name__ == "__main__":
    main()
