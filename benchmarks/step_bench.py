"""The `step` workload against `shardstate dev` (its defaults: a shard per core up to 3, 1 replica each, a router), with
CPU per step of every process: the measuring stick for performance work on the whole path.

A step is `await handle.update("state", fn)` on one long-lived AsyncSession handle per session
(one CAS when the handle's version cache is current), 1 KiB values, random sessions.

    .venv/bin/python -m benchmarks.step_bench --duration 10            # from the repository root
    .venv/bin/python -m benchmarks.step_bench --address 127.0.0.1:7400  # an already running cluster
    .venv/bin/python -m benchmarks.step_bench --duration 20 --tail      # and where the p99 comes from

--tail sets every op against the flushes and compactions each node's LevelDB logged meanwhile
(shardstate.bench.tails): how much likelier an op is to be slow while one runs.
"""

from __future__ import annotations

import shardstate.bench  # noqa: F401  (first: chooses grpc's transport before grpc loads)

# isort: split

import argparse
import asyncio
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from shardstate import AsyncClient
from shardstate.bench import tails
from shardstate.common import eventloop
from shardstate.server import launch
from shardstate.server.cli.dev import default_shards, usable_cpus

VALUE = b"x" * 1024
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / TICK


def start_dev(port: int, data: Path, shards: int, replicas: int) -> tuple[launch.Dev, dict[str, int], str]:
    """The dev cluster's process, its nodes' pids by name, and the router's address."""
    dev = launch.Dev(data, "--shards", str(shards), "--replicas", str(replicas), port=port, log_path=data / "dev.log")
    address = dev.wait_router()
    return dev, dev.node_pids(), address


async def run(address: str, pids: dict[str, int], args: argparse.Namespace, data: Path | None = None) -> None:
    client = AsyncClient(address, max_batch_ops=args.max_batch_ops)
    sessions = [f"step-{i}" for i in range(args.sessions)]
    handles = {sid: client.session(sid) for sid in sessions}
    it = iter(sessions)

    async def loader() -> None:
        for sid in it:
            await handles[sid].put("state", VALUE)

    await asyncio.gather(*(loader() for _ in range(64)))
    lat: list[float] = []
    ends: list[float] = []  # wall-clock end of each op in `lat` (--tail)
    done = 0
    stop = False

    def new(_old: Any) -> bytes:
        return VALUE

    async def caller() -> None:
        nonlocal done
        rnd = random.Random()
        while not stop:
            h = handles[sessions[rnd.randrange(len(sessions))]]
            t0 = time.perf_counter()
            await h.update("state", new)
            lat.append(time.perf_counter() - t0)
            if args.tail:
                ends.append(time.time())
            done += 1

    tasks = [asyncio.ensure_future(caller()) for _ in range(args.concurrency)]
    await asyncio.sleep(args.warmup)
    lat.clear()
    ends.clear()
    done0 = done
    me = os.getpid()
    b0 = {a: (st["batches"], st["ops"]) for a, st in client.batching_stats().items()}
    c0 = {name: cpu_s(pid) for name, pid in pids.items()}
    s0 = cpu_s(me)
    t0 = time.perf_counter()
    await asyncio.sleep(args.duration)
    el = time.perf_counter() - t0
    n = done - done0
    c1 = {name: cpu_s(pid) for name, pid in pids.items()}
    s1 = cpu_s(me)
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    timed = list(zip(ends, lat, strict=False))
    lat.sort()

    def p(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000

    b1 = {a: (st["batches"], st["ops"]) for a, st in client.batching_stats().items()}
    per_batch = {a: round((b1[a][1] - b0.get(a, (0, 0))[1]) / max(1, b1[a][0] - b0.get(a, (0, 0))[0]), 1) for a in b1}
    print(f"load {os.getloadavg()[0]:.2f}  steps/s {n / el:,.0f}  p50 {p(0.5):.2f} ms  p99 {p(0.99):.2f} ms  "
          f"ops per client batch {per_batch}")
    per = {name: (c1[name] - c0[name]) / n * 1e6 for name in pids}
    per["client"] = (s1 - s0) / n * 1e6
    total = sum(per.values())
    print("CPU us/step: " + "  ".join(f"{k} {v:.0f}" for k, v in sorted(per.items())) + f"  total {total:.0f}")
    await client.close()
    if args.tail and data is not None and timed:
        print_tail(tails.attribute(timed, tails.node_events(data, pids)))  # the router has no LOG


def print_tail(a: tails.Attribution) -> None:
    print(f"tail: p{a.quantile * 100:g} {a.threshold_ms:.2f} ms over {a.ops:,} ops ({a.tail_ops:,} above it)")
    print(f"  {'node':<8} {'LevelDB work':<11} {'busy s':>7} {'of all ops':>11} {'of tail ops':>12} {'likelier':>9}")
    for r in a.rows:
        x = f"{r.enrichment:.1f}x" if r.enrichment is not None else "-"
        print(f"  {r.node:<8} {r.kind:<11} {r.busy_s:7.2f} {r.share_all:11.1%} {r.share_tail:12.1%} {x:>9}")
    clear = f"{a.clear_quantile_ms:.2f} ms" if a.clear_quantile_ms is not None else "-"
    print(f"  ops overlapping none of it: {a.clear_share:.1%}, their p{a.quantile * 100:g} {clear}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="", help="an already running router (CPU of the client only)")
    p.add_argument("--port", type=int, default=17400, help="the router's (0: any free ports)")
    p.add_argument("--shards", type=int, default=default_shards(usable_cpus()), help="[default: dev's, a shard per core up to 3]")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-batch-ops", type=int, default=1000, help="the client's largest batch (a full one leaves at once)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--hold", type=float, default=0.0, help="keep the cluster this many seconds after (profiling)")
    p.add_argument("--tail", action="store_true", help="attribute the slowest ops to LevelDB flushes and compactions")
    args = p.parse_args()
    if args.address:
        if args.tail:
            print("--tail reads the LevelDB logs of the cluster this script starts: not with --address")
        eventloop.run(run(args.address, {}, args))
        return
    with tempfile.TemporaryDirectory() as tmp:
        proc, pids, address = start_dev(args.port, Path(tmp), args.shards, args.replicas)
        try:
            print("pids", pids, flush=True)
            eventloop.run(run(address, pids, args, Path(tmp)))
            time.sleep(args.hold)
        finally:
            proc.stop()


if __name__ == "__main__":
    main()
