"""LangGraph checkpointers, the same agent loop for each: one step on a thread = `aput` of a
checkpoint whose `messages` channel grows by one ~300-byte message (a thread is done after 50
and a new one starts), then `aput_writes` of 2 writes, then `aget_tuple` of the latest; 32
threads at once. Prints steps/s and p50/p99 of a step per saver (a benchmark, not a test).

    python -m benchmarks.saver_bench [--duration 20] [--threads 32] [--savers memory,sqlite,postgres,shardstate]

Postgres is started here from Debian's `postgresql` binaries (initdb in a temporary directory,
a free port, as the `postgres` user when run as root); without them: `apt-get install -y
postgresql`. shardstate runs as `shardstate dev` on a temporary directory (its defaults: a
shard per core up to 3, one replica each).
"""

from __future__ import annotations

import shardstate.bench  # noqa: F401  (first: chooses grpc's transport before grpc loads)

# isort: split

import argparse
import asyncio
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver, Checkpoint
from langgraph.checkpoint.base.id import uuid6

from shardstate.server import launch

MESSAGE = "m" * 300
STEPS_PER_THREAD = 50


def checkpoint(step: int, messages: list[str], version: Any) -> Checkpoint:
    return Checkpoint(v=1, id=str(uuid6(clock_seq=step)), ts=datetime.now(UTC).isoformat(),
                      channel_values={"messages": messages},
                      channel_versions={"messages": version},
                      versions_seen={"agent": {"messages": version}},
                      updated_channels=["messages"])


async def worker(saver: BaseCheckpointSaver[Any], w: int, stop_at: float,
                 lat: list[float]) -> int:
    steps = 0
    n_thread = 0
    while time.monotonic() < stop_at:
        n_thread += 1
        tid = f"bench-{os.getpid()}-{w}-{n_thread}"
        config: Any = {"configurable": {"thread_id": tid, "checkpoint_ns": ""}}
        messages: list[str] = []
        version = None
        for step in range(STEPS_PER_THREAD):
            if time.monotonic() >= stop_at:
                break
            t0 = time.perf_counter()
            messages = [*messages, f"{step:04d}{MESSAGE}"]
            version = saver.get_next_version(version, None)
            cp = checkpoint(step, messages, version)
            md: Any = {"source": "loop", "step": step, "parents": {}, "run_id": tid}
            config = await saver.aput(config, cp, md, {"messages": version})
            await saver.aput_writes(config, [("messages", f"w{step}"), ("branch:agent", None)],
                                    f"task-{step}")
            got = await saver.aget_tuple({"configurable": {"thread_id": tid, "checkpoint_ns": ""}})
            assert got is not None and len(got.checkpoint["channel_values"]["messages"]) == step + 1
            lat.append(time.perf_counter() - t0)
            steps += 1
    return steps


async def measure(name: str, saver: BaseCheckpointSaver[Any], threads: int, duration: float) -> dict[str, Any]:
    await worker(saver, -1, time.monotonic() + min(2.0, duration / 5), [])  # warm up
    lat: list[float] = []
    t0 = time.monotonic()
    counts = await asyncio.gather(*(worker(saver, w, t0 + duration, lat) for w in range(threads)))
    elapsed = time.monotonic() - t0
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    row = {"saver": name, "steps": sum(counts), "steps_s": sum(counts) / elapsed,
           "p50_ms": pct(0.50), "p99_ms": pct(0.99)}
    print(f"{name:22s} {row['steps_s']:8.0f} steps/s  p50 {row['p50_ms']:6.1f} ms  "
          f"p99 {row['p99_ms']:6.1f} ms  ({row['steps']} steps in {elapsed:.1f} s)", flush=True)
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the savers, each an async context manager yielding a ready saver ----

@contextlib.asynccontextmanager
async def memory_saver() -> AsyncIterator[BaseCheckpointSaver[Any]]:
    from langgraph.checkpoint.memory import InMemorySaver
    yield InMemorySaver()


@contextlib.asynccontextmanager
async def sqlite_saver() -> AsyncIterator[BaseCheckpointSaver[Any]]:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    with tempfile.TemporaryDirectory() as d:
        async with AsyncSqliteSaver.from_conn_string(str(Path(d) / "bench.sqlite")) as saver:
            await saver.setup()
            yield saver


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        sys.exit("Postgres binaries not found: apt-get install -y postgresql")
    return Path(found[-1]).parent


@contextlib.contextmanager
def throwaway_postgres() -> Any:
    """A Postgres server on a free port with its data in a temporary directory; the DSN."""
    bin_dir = pg_bin()
    root = os.geteuid() == 0
    d = tempfile.mkdtemp(prefix="pgbench-")
    os.chmod(d, 0o755)
    data = Path(d) / "data"
    as_user = ["runuser", "-u", "postgres", "--"] if root else []
    if root:
        shutil.chown(d, "postgres")
    port = free_port()
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", f"{d}/log", "-w",
                        "-o", f"-p {port} -k {d} -c listen_addresses=127.0.0.1 -c max_connections=100 "
                              "-c fsync=on -c synchronous_commit=on", "start"],
                       check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def postgres_saver() -> AsyncIterator[BaseCheckpointSaver[Any]]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool
    with throwaway_postgres() as dsn:
        async with AsyncConnectionPool(dsn, min_size=32, max_size=32, open=False, kwargs={
                "autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}) as pool:
            saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
            await saver.setup()
            yield saver


DIRECT = False  # --direct: the saver's AsyncClient sends each call to its shard (where supported)


@contextlib.asynccontextmanager
async def shardstate_saver() -> AsyncIterator[BaseCheckpointSaver[Any]]:
    from shardstate import AsyncClient
    from shardstate.integrations.langgraph import AsyncShardStateSaver
    d = tempfile.mkdtemp(prefix="ssbench-")
    dev = launch.Dev(Path(d) / "data")
    try:
        router = dev.wait_router()
        client = AsyncClient(router, direct=DIRECT)
        async with client:
            yield AsyncShardStateSaver(client)
    finally:
        dev.stop()
        shutil.rmtree(d, ignore_errors=True)


SAVERS: dict[str, tuple[str, Callable[[], Any]]] = {
    "memory": ("InMemorySaver", memory_saver),
    "sqlite": ("AsyncSqliteSaver", sqlite_saver),
    "postgres": ("AsyncPostgresSaver", postgres_saver),
    "shardstate": ("AsyncShardStateSaver", shardstate_saver),
}


async def main(args: argparse.Namespace) -> None:
    rows = {}
    for key in args.savers.split(","):
        name, make = SAVERS[key]
        async with make() as saver:
            rows[key] = await measure(name, saver, args.threads, args.duration)
    if "postgres" in rows and "shardstate" in rows:
        pg, ss = rows["postgres"], rows["shardstate"]
        print(f"shardstate / postgres: {ss['steps_s'] / pg['steps_s']:.2f}x steps/s (goal >= 3), "
              f"p99 {ss['p99_ms'] / pg['p99_ms']:.2f}x (goal <= 0.33)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per saver")
    p.add_argument("--threads", type=int, default=32, help="threads stepping at once")
    p.add_argument("--savers", default="memory,sqlite,postgres,shardstate")
    p.add_argument("--direct", action="store_true",
                   help="the shardstate saver's AsyncClient in direct mode (calls go to the shards)")
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    parsed = p.parse_args()
    DIRECT = parsed.direct
    asyncio.run(main(parsed))
