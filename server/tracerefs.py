"""Traced writes' trace context, handed from the shard's write handler to the Follow streams
so that a replica's apply and ack join the writer's trace (only with --otel).

The handler notes `revision -> traceparent` after a traced write commits; the leader sends the
refs of a batch's revisions beside its entries (ChangeBatch.traces); the follower ends a span
`replica apply` per ref once its ack for that revision is on the wire. Kept in memory only,
the newest KEEP writes: a follower that reads older changes (catching up) gets no refs.
"""

from __future__ import annotations

from collections import OrderedDict

KEEP = 4096
_refs: OrderedDict[int, str] = OrderedDict()


def note(revision: int, traceparent: str) -> None:
    _refs[revision] = traceparent
    if len(_refs) > KEEP:
        _refs.popitem(last=False)


def between(first: int, last: int) -> list[tuple[int, str]]:
    """The refs of revisions first..last, oldest first."""
    if not _refs or next(reversed(_refs)) < first:
        return []
    return [(r, t) for r, t in _refs.items() if first <= r <= last]
