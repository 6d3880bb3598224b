"""Before/after figures for the AsyncClient's auto-batching (docs/design.md §8): an agent step (read
the session's state, then compare-and-swap 1 KiB) from C concurrent callers over N sessions.

    .venv/bin/python benchmarks/client_batching.py [--address HOST:PORT] [--duration 10]

Without --address it starts one shard on a temporary directory. Variants: unary calls
(batching=False), batching over the Pipeline stream, and batching with `update()` (the session
handle remembers the version it wrote, so a single writer's step is one CAS, no read).
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

from shardstate import AsyncClient, ConflictError
from shardstate.bench import servers


async def measure(address: str, variant: str, sessions: int, concurrency: int, duration: float,
                  value_size: int) -> dict[str, Any]:
    value = os.urandom(value_size)
    async with AsyncClient(address, batching=variant != "unary", timeout=30) as c:
        ids = [f"bench-{variant}-{i}" for i in range(sessions)]
        handles = {sid: c.session(sid) for sid in ids}
        for i in range(0, sessions, 500):
            await asyncio.gather(*(handles[sid].put("state", value) for sid in ids[i:i + 500]))
        lat: list[float] = []
        conflicts = 0
        stop_at = 0.0

        async def worker() -> None:
            nonlocal conflicts
            rnd = random.Random()
            while time.perf_counter() < stop_at:
                s = handles[rnd.choice(ids)]
                t0 = time.perf_counter()
                if variant == "update":
                    await s.update("state", lambda old: value)
                else:
                    rec = await s.get("state")
                    try:
                        await s.put("state", value, expect=rec.version if rec else 0)
                    except ConflictError:
                        conflicts += 1
                lat.append(time.perf_counter() - t0)

        stop_at = time.perf_counter() + 1.0  # warm-up
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        lat.clear()
        t_start = time.perf_counter()
        cpu0 = time.process_time()
        stop_at = t_start + duration
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t_start
        cpu = time.process_time() - cpu0
        lat.sort()
        stats = c.batching_stats().get(address, {})
    n = len(lat)
    return {
        "variant": variant, "steps": n, "steps_s": n / elapsed,
        "p50_ms": lat[n // 2] * 1000, "p99_ms": lat[min(n - 1, int(n * 0.99))] * 1000,
        "client_cpu_us_per_step": cpu / max(n, 1) * 1e6, "conflicts": conflicts,
        "ops_per_batch": (stats["ops"] / stats["batches"]) if stats.get("batches") else 1.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="")
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--value-size", type=int, default=1024)
    p.add_argument("--variants", default="unary,batching,update")
    args = p.parse_args()
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        address = args.address
        if not address:
            proc = servers.start_shard(Path(tmp))
            address = proc.address
        try:
            print(f"{'one shard at ' if proc else 'target '}{address}; {args.sessions} sessions, {args.concurrency} concurrent, "
                  f"{args.value_size} B values, {args.duration:.0f} s per variant; {os.cpu_count()} cores")
            print(f"{'variant':<10} {'steps/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'client µs/step':>15} {'ops/batch':>10} {'conflicts':>10}")
            for variant in args.variants.split(","):
                r = asyncio.run(measure(address, variant, args.sessions, args.concurrency,
                                        args.duration, args.value_size))
                print(f"{r['variant']:<10} {r['steps_s']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                      f"{r['client_cpu_us_per_step']:>15.0f} {r['ops_per_batch']:>10.1f} {r['conflicts']:>10}")
        finally:
            if proc is not None:
                proc.stop()


if __name__ == "__main__":
    main()
