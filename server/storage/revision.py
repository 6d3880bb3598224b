"""The shard's revision: a persisted, strictly increasing hybrid logical clock.

next = max(last + 1, wall_ms << 20): revisions follow real time across shards and restarts,
and stay strictly increasing when the wall clock steps back. The engine persists the last
revision handed out in `_|revision` inside the WriteBatch of the write that took it.
"""

from __future__ import annotations

import time

from shardstate.common.hlc import LOGICAL_BITS, ms_of

__all__ = ["LOGICAL_BITS", "RevisionClock", "ms_of", "wall_ms"]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class RevisionClock:
    """Hands out revisions; `last` is the highest one handed out (persisted or not)."""

    __slots__ = ("last",)

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def next(self) -> int:
        wall = (time.time_ns() // 1_000_000) << LOGICAL_BITS
        last = self.last + 1
        self.last = last if last > wall else wall
        return self.last

    def raise_to(self, floor: int) -> None:
        """Never hand out a revision <= floor (promotion, migrated sessions)."""
        if floor > self.last:
            self.last = floor
