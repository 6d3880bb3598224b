"""The workloads (step, read, append, mixed) and how sessions are picked (uniform or Zipf).

A workload turns "one op on session S" into Backend calls; the outcome is OK or CONFLICT, and an
exception is an error. Every store runs exactly this code.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Awaitable, Callable

from shardstate.bench.backends import Backend
from shardstate.bench.stats import CONFLICT, OK

WORKLOADS = ("step", "read", "append", "mixed")
# mixed: what an agent fleet mostly does: read state, sometimes step, sometimes log an event.
MIXED = (("read", 0.6), ("step", 0.3), ("append", 0.1))
READ_LAST = 10  # the append workload reads back the newest 10 entries
VALUE_POOL = 16  # distinct random values cycled through, so a CAS writes different bytes


def session_ids(n: int) -> list[str]:
    return [f"bench-{i:08d}" for i in range(n)]


class SessionPicker:
    """Uniform over the sessions, or Zipf with exponent `zipf` (> 0) over a shuffled ranking.

    The ranking is shuffled with the seed so hot sessions are spread over shards, not all
    the lexically first ids.
    """

    def __init__(self, ids: list[str], zipf: float, rng: random.Random) -> None:
        self.ids = ids
        self.rng = rng
        self.cdf: list[float] = []
        if zipf > 0:
            self.ids = ids[:]
            rng.shuffle(self.ids)
            self.cdf = list(itertools.accumulate(1.0 / (k + 1) ** zipf for k in range(len(ids))))

    def pick(self) -> str:
        if not self.cdf:
            return self.ids[int(self.rng.random() * len(self.ids))]
        i = bisect.bisect_left(self.cdf, self.rng.random() * self.cdf[-1])
        return self.ids[min(i, len(self.ids) - 1)]


class Values:
    """A small pool of random (incompressible) values of the configured size, cycled."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.pool = [rng.randbytes(size) for _ in range(VALUE_POOL)]
        self._next = itertools.cycle(self.pool)

    def next(self) -> bytes:
        return next(self._next)


def make_op(workload: str, backend: Backend, values: Values, rng: random.Random,
            entry_size: int = 128) -> Callable[[str], Awaitable[int]]:
    """The coroutine function doing one op of `workload` on a session, returning OK or CONFLICT."""
    entry = rng.randbytes(entry_size)

    async def step(sid: str) -> int:
        return OK if await backend.step(sid, values.next()) else CONFLICT

    async def read(sid: str) -> int:
        await backend.read(sid)
        return OK

    async def append(sid: str) -> int:
        await backend.append(sid, entry, READ_LAST)
        return OK

    ops = {"step": step, "read": read, "append": append}
    if workload in ops:
        return ops[workload]
    if workload != "mixed":
        raise ValueError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")
    names = [n for n, _ in MIXED]
    cum = list(itertools.accumulate(w for _, w in MIXED))

    async def mixed(sid: str) -> int:
        name = names[min(bisect.bisect_left(cum, rng.random() * cum[-1]), len(names) - 1)]
        return await ops[name](sid)

    return mixed
