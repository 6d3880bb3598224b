"""Memory and disk at scale: load N sessions x 1 KiB of state into one shard (directly, no router)
and into Redis (appendonly yes, appendfsync everysec), then report the shard's RSS and on-disk
size against Redis's used_memory, RSS and AOF size.

    .venv/bin/python benchmarks/memory_scale.py                      # 2,000,000 sessions
    .venv/bin/python benchmarks/memory_scale.py --sessions 200000 --json mem.json

Each session holds what the step benchmark writes: key "state" with a distinct 1 KiB value
(random bytes, so neither LevelDB's Snappy nor anything else can compress it away); in Redis a
hash {value, version}, as benchmarks/compare stores it. Loading uses the AsyncClient's Batch
(up to --batch puts per RPC, --inflight batches at a time) and Redis pipelines of the same size:
memory on the client stays bounded whatever N is.
"""

from __future__ import annotations

import shardstate.bench  # noqa: F401  (first: chooses grpc's transport before grpc loads)

# isort: split

import argparse
import asyncio
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from shardstate import AsyncClient
from shardstate.bench import procstat, servers
from shardstate.bench.backends import STATE_KEY

SETTLE_S = 5.0  # after loading: let LevelDB finish flushing/compacting before sizes are read
VALUE_POOL_BYTES = 4 << 20


class Values:
    """Distinct incompressible values without holding N of them: non-overlapping windows of one
    random buffer, so no two values in a LevelDB block share bytes Snappy could match."""

    def __init__(self, size: int) -> None:
        import random

        self.size = size
        self.slots = max(1, VALUE_POOL_BYTES // size)
        self.buf = random.Random(7).randbytes(self.slots * size + size)

    def get(self, i: int) -> bytes:
        off = (i * 7919 % self.slots) * self.size + (i // self.slots) % self.size
        return self.buf[off:off + self.size]


def session_id(i: int) -> str:
    return f"mem-{i:09d}"


async def load_chunks(n: int, batch: int, inflight: int, put_chunk: Callable[[int, int], Awaitable[None]],
                      advance: Callable[[int], None]) -> None:
    """Calls put_chunk(start, end) over [0, n) with at most `inflight` chunks in flight."""
    starts = iter(range(0, n, batch))

    async def worker() -> None:
        for start in starts:
            end = min(n, start + batch)
            await put_chunk(start, end)
            advance(end - start)

    await asyncio.gather(*(worker() for _ in range(inflight)))


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def advancer(bar: Progress, task: Any, t0: float, console: Console) -> Callable[[int], None]:
    """Moves the bar; when stderr is not a terminal (a log file), prints a line every 10 s instead."""
    last = [t0]

    def advance(k: int) -> None:
        done = bar.tasks[0].completed + k
        now = time.monotonic()
        rate = done / max(now - t0, 1e-9)
        bar.update(task, advance=k, rate=f"{rate:,.0f}/s")
        if not console.is_terminal and now - last[0] >= 10:
            last[0] = now
            console.print(f"{bar.tasks[0].description}: {done:,.0f}/{bar.tasks[0].total:,.0f} ({rate:,.0f}/s)")

    return advance


async def load_shard(address: str, ns: argparse.Namespace, values: Values, console: Console) -> float:
    if ns.raw:
        return await load_shard_raw(address, ns, values, console)
    async with AsyncClient(address, timeout=120) as client:
        with progress_bar(console) as bar:
            task = bar.add_task("shard: loading", total=ns.sessions, rate="")
            t0 = time.monotonic()

            async def put_chunk(start: int, end: int) -> None:
                b = client.batch()
                for i in range(start, end):
                    b.put(session_id(i), STATE_KEY, values.get(i))
                await b.execute()

            advance = advancer(bar, task, t0, console)

            await load_chunks(ns.sessions, ns.batch, ns.inflight, put_chunk, advance)
            return time.monotonic() - t0


async def load_shard_raw(address: str, ns: argparse.Namespace, values: Values, console: Console) -> float:
    """Plain State.Batch stubs with puts that carry no request_id: the state alone, without the
    10-minute idempotency records the client library's puts leave behind."""
    import grpc

    from shardstate.v1 import state_pb2, state_pb2_grpc

    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20),
                                                           ("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        with progress_bar(console) as bar:
            task = bar.add_task("shard: loading (raw Batch)", total=ns.sessions, rate="")
            t0 = time.monotonic()

            async def put_chunk(start: int, end: int) -> None:
                req = state_pb2.BatchRequest(ops=[
                    state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=session_id(i), key=STATE_KEY,
                                                               value=values.get(i)))
                    for i in range(start, end)])
                resp = await stub.Batch(req, timeout=120)
                bad = [r for r in resp.results if r.code != 0]
                if bad:
                    raise RuntimeError(f"{len(bad)} puts failed, first: {bad[0].code} {bad[0].message}")

            advance = advancer(bar, task, t0, console)

            await load_chunks(ns.sessions, ns.batch, ns.inflight, put_chunk, advance)
            return time.monotonic() - t0


async def load_redis(address: str, ns: argparse.Namespace, values: Values, console: Console) -> tuple[float, dict[str, Any]]:
    import redis.asyncio as aioredis

    host, port = address.rsplit(":", 1)
    r = aioredis.Redis(host=host, port=int(port), max_connections=ns.inflight + 2, socket_timeout=120)
    try:
        with progress_bar(console) as bar:
            task = bar.add_task("redis: loading", total=ns.sessions, rate="")
            t0 = time.monotonic()

            async def put_chunk(start: int, end: int) -> None:
                pipe = r.pipeline(transaction=False)
                for i in range(start, end):
                    pipe.hset(f"s:{session_id(i)}", mapping={"value": values.get(i), "version": 1})
                await pipe.execute()

            advance = advancer(bar, task, t0, console)

            await load_chunks(ns.sessions, ns.batch, ns.inflight, put_chunk, advance)
            took = time.monotonic() - t0
        await asyncio.sleep(1.5)  # appendfsync everysec: let the last second reach the AOF
        info = await r.info("memory")
        keys = await r.dbsize()
    finally:
        await r.aclose()
    return took, {"used_memory": int(info["used_memory"]), "used_memory_rss": int(info["used_memory_rss"]),
                  "used_memory_dataset": int(info.get("used_memory_dataset", 0)), "keys": int(keys)}


def run_shard(ns: argparse.Namespace, workdir: Path, values: Values, console: Console) -> dict[str, Any]:
    srv = servers.start_shard(workdir, "s1", shlex.split(ns.shard_args))
    try:
        rss0 = procstat.rss_bytes(srv.pid)
        took = asyncio.run(load_shard(srv.address, ns, values, console))
        console.print(f"shard: loaded {ns.sessions:,} sessions in {took:.1f} s; settling {ns.settle:g} s")
        time.sleep(ns.settle)
        assert srv.data_dir is not None
        parts = procstat.rss_parts(srv.pid)
        return {"store": "shardstate shard" + (" (raw Batch)" if ns.raw else "") + (f" {ns.shard_args}" if ns.shard_args else ""), "sessions": ns.sessions, "load_s": round(took, 1),
                "load_rate": round(ns.sessions / took), "rss_before_bytes": rss0,
                "rss_bytes": parts["rss"], "rss_anon_bytes": parts["anon"], "rss_file_bytes": parts["file"],
                "disk_bytes": procstat.dir_bytes(srv.data_dir)}
    finally:
        srv.stop()


def run_redis(ns: argparse.Namespace, workdir: Path, values: Values, console: Console) -> dict[str, Any]:
    srv = servers.start_redis(workdir)
    try:
        rss0 = procstat.rss_bytes(srv.pid)
        took, info = asyncio.run(load_redis(srv.address, ns, values, console))
        console.print(f"redis: loaded {ns.sessions:,} sessions in {took:.1f} s")
        assert srv.data_dir is not None
        parts = procstat.rss_parts(srv.pid)
        return {"store": f"Redis {servers.redis_version()}", "sessions": ns.sessions, "load_s": round(took, 1),
                "load_rate": round(ns.sessions / took), "rss_before_bytes": rss0,
                "rss_bytes": parts["rss"], "rss_anon_bytes": parts["anon"], "rss_file_bytes": parts["file"],
                "disk_bytes": procstat.dir_bytes(srv.data_dir), **info}
    finally:
        srv.stop()


def human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def table(results: list[dict[str, Any]], value_size: int) -> Table:
    t = Table(title=f"{results[0]['sessions']:,} sessions x {value_size} B of state")
    for col in ("store", "load", "RSS", "anon / file", "RSS / session", "used_memory", "used_memory / session",
                "on disk", "disk / session"):
        t.add_column(col, justify="left" if col == "store" else "right")
    for r in results:
        n = r["sessions"]
        used = r.get("used_memory")
        t.add_row(r["store"], f"{r['load_s']:.1f} s ({r['load_rate']:,}/s)", human(r["rss_bytes"]),
                  f"{human(r.get('rss_anon_bytes'))} / {human(r.get('rss_file_bytes'))}",
                  f"{r['rss_bytes'] / n:,.0f} B", human(used), f"{used / n:,.0f} B" if used else "-",
                  human(r["disk_bytes"]), f"{r['disk_bytes'] / n:,.0f} B")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/memory_scale.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=2_000_000, help="sessions to load (default 2000000)")
    p.add_argument("--value-size", type=int, default=1024, help="bytes of state per session (default 1024)")
    p.add_argument("--batch", type=int, default=500, help="puts per Batch RPC / Redis pipeline (default 500)")
    p.add_argument("--inflight", type=int, default=8, help="batches in flight at once (default 8)")
    p.add_argument("--stores", default="shard,redis", help="which to load: shard,redis (default both)")
    p.add_argument("--raw", action="store_true",
                   help="load the shard with plain State.Batch stubs and no request ids (the client "
                        "library's puts each leave a 10-minute idempotency record, which this leaves out)")
    p.add_argument("--settle", type=float, default=SETTLE_S,
                   help=f"seconds to wait after loading the shard before reading sizes (default {SETTLE_S:g})")
    p.add_argument("--shard-args", default="", help='extra flags for the shard, e.g. "--block-cache-mib 16"')
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ns = p.parse_args(argv)
    if ns.sessions < 1 or ns.batch < 1 or ns.inflight < 1 or not 1 <= ns.value_size <= 1 << 20:
        p.error("--sessions, --batch, --inflight must be >= 1 and --value-size 1..1048576")
    stores = [s.strip() for s in ns.stores.split(",") if s.strip()]
    if not set(stores) <= {"shard", "redis"} or not stores:
        p.error("--stores takes shard and/or redis")
    if "redis" in stores and not servers.have("redis-server"):
        p.error("redis-server is not installed: run benchmarks/install-peers.sh")
    console = Console(stderr=True)
    out = Console() if Console().is_terminal else Console(width=160)
    values = Values(ns.value_size)
    servers.term_as_exit()
    workdir = Path(tempfile.mkdtemp(prefix="shardstate-memory-"))
    free = shutil.disk_usage(workdir).free
    need = ns.sessions * ns.value_size * 3  # shard + redis AOF, with headroom
    if free < need:
        console.print(f"[yellow]memory_scale: only {human(free)} free in {workdir}; this run may need {human(need)}[/]")
    results = []
    try:
        for store in stores:
            runner = run_shard if store == "shard" else run_redis
            results.append(runner(ns, workdir / store, values, console))
    except KeyboardInterrupt:
        console.print("memory_scale: interrupted; servers stopped")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out.print(table(results, ns.value_size))
    m = procstat.machine()
    out.print(f"machine: {m['cores']} cores ({m['cpu_model']}), {human(m['memory_bytes'])} RAM; "
              f"Redis: appendonly yes, appendfsync everysec, no RDB; shard: one LevelDB, no replica")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"machine": m, "value_size": ns.value_size, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
