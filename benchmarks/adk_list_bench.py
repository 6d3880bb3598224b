"""ADK `list_sessions` for one user with many sessions: ShardStateSessionService on
`shardstate dev` against ADK's DatabaseSessionService on SQLite (and ADK's SqliteSessionService).

Each backend gets the same sessions through its own `create_session` (a small state each,
beside a few sessions of other users), then `list_sessions(app_name, user_id)` is timed
`--repeat` times; every listing must return all of the user's sessions.

    .venv/bin/python -m benchmarks.adk_list_bench                       # 100 000 sessions
    .venv/bin/python -m benchmarks.adk_list_bench --sessions 2000       # a quick check
    .venv/bin/python -m benchmarks.adk_list_bench --address 127.0.0.1:7400  # a running cluster
"""

from __future__ import annotations

import shardstate.bench  # noqa: F401  (first: chooses grpc's transport before grpc loads)

# isort: split

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from importlib.metadata import version
from pathlib import Path
from typing import Any

from google.adk.sessions.base_session_service import BaseSessionService
from google.adk.sessions.database_session_service import DatabaseSessionService
from google.adk.sessions.sqlite_session_service import SqliteSessionService

from shardstate.integrations.adk import ShardStateSessionService
from shardstate.server import launch

USER, OTHERS = "ada", ("bob", "eve")
START_TIMEOUT_S = 120.0


async def populate(svc: BaseSessionService, app: str, n: int, concurrency: int) -> float:
    """n sessions of USER and 10 of each other user, through create_session; seconds taken."""
    gate = asyncio.Semaphore(concurrency)

    async def one(user: str, i: int) -> None:
        async with gate:
            await svc.create_session(app_name=app, user_id=user, session_id=f"s{i:07d}",
                                     state={"title": f"conversation {i}", "turns": i % 50})

    t0 = time.perf_counter()
    jobs = [one(USER, i) for i in range(n)] + [one(u, i) for u in OTHERS for i in range(10)]
    for k in range(0, len(jobs), 10_000):  # bounded: not 100 000 pending coroutines at once
        await asyncio.gather(*jobs[k:k + 10_000])
    return time.perf_counter() - t0


async def time_listing(svc: BaseSessionService, app: str, n: int, repeat: int) -> list[float]:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = await svc.list_sessions(app_name=app, user_id=USER)
        runs.append(time.perf_counter() - t0)
        if len(got.sessions) != n:
            raise SystemExit(f"{type(svc).__name__} listed {len(got.sessions)} sessions, not {n}")
    return runs


async def measure(name: str, make: Callable[[], Coroutine[Any, Any, BaseSessionService]],
                  n: int, repeat: int, concurrency: int) -> None:
    svc = await make()
    app = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        fill = await populate(svc, app, n, concurrency)
        runs = await time_listing(svc, app, n, repeat)
    finally:
        close = getattr(svc, "close", None)
        if close is not None:
            await close()
    best = min(runs)
    print(f"{name:<40} list_sessions {best:8.3f} s best of {repeat} "
          f"({', '.join(f'{r:.3f}' for r in runs)}); {n / best:10.0f} sessions/s; "
          f"create_session x{n + 10 * len(OTHERS)} took {fill:.1f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=100_000, help="sessions of the one user [100000]")
    p.add_argument("--repeat", type=int, default=3, help="listings timed per backend [3]")
    p.add_argument("--address", help="a running shardstate cluster (else `shardstate dev` is started)")
    p.add_argument("--concurrency", type=int, default=64,
                   help="create_session calls in flight, shardstate [64]; SQLite ones get 1")
    p.add_argument("--only", choices=["shardstate", "database", "sqlite"], action="append",
                   help="run only these backends (repeatable) [all three]")
    args = p.parse_args()
    only = set(args.only or ["shardstate", "database", "sqlite"])
    print(f"ADK list_sessions, one user with {args.sessions} sessions; google-adk "
          f"{version('google-adk')}, SQLAlchemy {version('sqlalchemy')}", flush=True)

    with tempfile.TemporaryDirectory(prefix="adk-list-bench-") as tmp:
        dev = None
        address = args.address
        if address is None and "shardstate" in only:
            dev = launch.Dev(Path(tmp) / "dev")
            address = dev.wait_router(START_TIMEOUT_S)
        try:
            async def run_all() -> None:
                if "shardstate" in only:
                    async def make_ss() -> BaseSessionService:
                        return ShardStateSessionService(address)
                    await measure(f"ShardStateSessionService ({'shardstate dev' if dev else address})",
                                  make_ss, args.sessions, args.repeat, args.concurrency)
                if "database" in only:
                    async def make_db() -> BaseSessionService:
                        return DatabaseSessionService(f"sqlite+aiosqlite:///{tmp}/database.db")
                    # one writer: 64 concurrent create_session calls fail with "database is
                    # locked" within a few thousand sessions
                    await measure("DatabaseSessionService (SQLite, 1 writer)", make_db,
                                  args.sessions, args.repeat, 1)
                if "sqlite" in only:
                    async def make_sq() -> BaseSessionService:
                        return SqliteSessionService(f"{tmp}/sqlite.db")
                    await measure("SqliteSessionService (1 writer)", make_sq, args.sessions,
                                  args.repeat, 1)

            asyncio.run(run_all())
        finally:
            if dev is not None:
                dev.stop()


if __name__ == "__main__":
    main()
