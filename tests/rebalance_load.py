"""The rebalancing tests' load (issue: 16 asyncio clients of CAS-increment loops over the
sessions, plus appends to each session's log), recording every acknowledged increment and
append, and the checks made afterwards: every counter equals its acknowledged increments,
every log holds exactly its acknowledged entries in seq order, no caller saw an error."""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

from shardstate import AsyncClient

COUNTER = "n"
LOG = "events"


class Load:
    """Runs in its own thread and event loop: `start()`, then `stop()` returns the record."""

    def __init__(self, routers: Sequence[str], sessions: int = 2000, workers: int = 16,
                 append_every: int = 4, prefix: str = "agent-") -> None:
        self.routers = list(routers)
        self.sids = [f"{prefix}{i}" for i in range(sessions)]
        self.workers = workers
        self.append_every = append_every
        self.increments: collections.Counter[str] = collections.Counter()
        self.appends: dict[str, list[tuple[int, bytes]]] = collections.defaultdict(list)
        self.errors: list[str] = []
        self.preloaded: set[str] = set()  # sessions given a blob before the load (tests' preload)
        self.ops = 0
        self.longest_pause_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress = threading.Condition()

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        return self

    def wait_ops(self, n: int, timeout: float = 120.0) -> None:
        """Until at least n more acknowledged operations (the load is really running)."""
        goal = self.ops + n
        end = time.monotonic() + timeout
        while self.ops < goal:
            assert not self.errors, self.errors[:5]
            assert time.monotonic() < end, f"the load made {self.ops} ops, waiting for {goal}"
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(120)
        assert not self._thread.is_alive(), "the load did not stop"

    async def _main(self) -> None:
        client = AsyncClient(self.routers, timeout=60.0)
        try:
            await asyncio.gather(*(self._worker(client, w) for w in range(self.workers)))
        finally:
            await client.close()

    async def _worker(self, client: AsyncClient, w: int) -> None:
        rng = random.Random(w)
        n = 0
        while not self._stop.is_set():
            sid = rng.choice(self.sids)
            s = client.session(sid)
            t0 = time.monotonic()
            try:
                if n % self.append_every == 0:
                    entry = f"w{w}-{n}".encode()
                    seqs = await s.append(LOG, [entry])
                    self.appends[sid].append((seqs[0], entry))
                else:
                    await s.update(COUNTER, lambda r: str(int(r.value) + 1 if r else 1))
                    self.increments[sid] += 1
            except Exception as e:
                self.errors.append(f"{sid}: {type(e).__name__}: {e}")
                return
            took = time.monotonic() - t0
            if took > self.longest_pause_s:
                self.longest_pause_s = took
            n += 1
            self.ops += 1

    # ---- checks ----

    def written(self) -> set[str]:
        """Sessions with an acknowledged write (the others were never created)."""
        return {s for s in self.sids if self.increments[s] or self.appends.get(s)} | self.preloaded

    async def _read_all(self) -> tuple[dict[str, int], dict[str, list[tuple[int, bytes]]]]:
        counters: dict[str, int] = {}
        logs: dict[str, list[tuple[int, bytes]]] = {}
        async with AsyncClient(self.routers, timeout=60.0) as client:
            sem = asyncio.Semaphore(64)

            async def one(sid: str) -> None:
                async with sem:
                    s = client.session(sid)
                    rec = await s.get(COUNTER)
                    counters[sid] = int(rec.value) if rec else 0
                    logs[sid] = [(e.seq, bytes(e.data)) for e in await s.read(LOG, limit=None)]

            await asyncio.gather(*(one(sid) for sid in self.sids))
        return counters, logs

    def check(self) -> dict[str, Any]:
        """Every acknowledged write is there exactly once; returns the figures."""
        assert not self.errors, f"callers saw errors: {self.errors[:5]}"
        counters, logs = asyncio.run(self._read_all())
        wrong = {sid: (counters[sid], self.increments[sid]) for sid in self.sids if counters[sid] != self.increments[sid]}
        assert not wrong, f"{len(wrong)} counters differ from their acknowledged increments (read, acked): {list(wrong.items())[:5]}"
        bad_logs = {sid: (logs[sid][:3], sorted(self.appends[sid])[:3]) for sid in self.sids
                    if logs[sid] != sorted(self.appends[sid])}
        assert not bad_logs, f"{len(bad_logs)} logs differ from their acknowledged appends: {list(bad_logs.items())[:3]}"
        return {"increments": sum(self.increments.values()), "appends": sum(len(v) for v in self.appends.values()),
                "longest_pause_s": self.longest_pause_s}


async def _preload(routers: Sequence[str], sids: Sequence[str], value_bytes: int) -> None:
    async with AsyncClient(list(routers), timeout=60.0) as client:
        sem = asyncio.Semaphore(64)
        blob = b"x" * value_bytes

        async def one(sid: str) -> None:
            async with sem:
                await client.session(sid).put("blob", blob)

        await asyncio.gather(*(one(s) for s in sids))


def preload(routers: Sequence[str], sids: Sequence[str], value_bytes: int) -> None:
    """A `blob` key of value_bytes in every session, so that copying them takes a while."""
    asyncio.run(_preload(routers, sids, value_bytes))
