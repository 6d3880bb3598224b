"""What this shard holds of each namespace (sessions, bytes), for the namespace limits
(docs/design.md §15): counted by a scan of the namespace's session metas the first time it is
asked, then kept by every write's delta.

A session counts from its first write to its deletion or reclaim (an expired session not yet
swept still counts); its bytes are its meta's `bytes` (keys + values + log entries). Writes
that do not go through a WriteContext (a replica's applied entries, a snapshot installed)
forget every figure: the next question scans again. Rebalancing's raw writes adjust them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from shardstate.v1 import types_pb2

from . import encoding as enc

if TYPE_CHECKING:
    from .store import Store

Delta = tuple[str, int, int]  # (namespace, sessions, bytes) a write adds (negative: removes)


def delta(namespace: str, before: types_pb2.SessionInfo | None, after: types_pb2.SessionInfo | None) -> Delta | None:
    """What replacing the session meta `before` with `after` (None: no session) adds."""
    ds = (after is not None) - (before is not None)
    db = (after.bytes if after is not None else 0) - (before.bytes if before is not None else 0)
    return (namespace, ds, db) if ds or db else None


class Usage:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._held: dict[str, list[int]] = {}  # namespace -> [sessions, bytes]

    def of(self, namespace: str) -> tuple[int, int]:
        held = self._held.get(namespace)
        if held is None:
            held = self._held[namespace] = list(self.scan(namespace))
        return held[0], held[1]

    def scan(self, namespace: str) -> tuple[int, int]:
        n = total = 0
        for _, raw in self.store.db.iterator(prefix=enc.encode(enc.META, (namespace or "default").encode())):
            n += 1
            total += types_pb2.SessionInfo.FromString(raw).bytes
        return n, total

    def add(self, d: Delta) -> None:
        held = self._held.get(d[0])
        if held is not None:
            held[0] += d[1]
            held[1] += d[2]

    def forget(self) -> None:
        self._held.clear()

    def raw(self, ops: Iterable[tuple[bytes, bytes | None]]) -> None:
        """Raw ops about to be written (rebalancing): their meta keys' deltas."""
        if not self._held:
            return
        meta = enc.META[0]
        for k, v in ops:
            if not k or k[0] != meta:
                continue
            ns = bytes(enc.decode(k, "bb")[0]).decode()  # type: ignore[arg-type]
            if ns not in self._held:
                continue
            before = self.store.load_meta(k)
            after = types_pb2.SessionInfo.FromString(v) if v is not None else None
            d = delta(ns, before, after)
            if d is not None:
                self.add(d)
