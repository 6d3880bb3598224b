"""The revision format every shard hands out (a hybrid logical clock, docs/design.md §2.2):
wall-clock milliseconds above LOGICAL_BITS bits of counter. Shared so that routers can read
how far apart two revisions are in time."""

from __future__ import annotations

LOGICAL_BITS = 20


def ms_of(revision: int) -> int:
    """The wall-clock millisecond a revision was (at the latest) handed out in."""
    return revision >> LOGICAL_BITS
