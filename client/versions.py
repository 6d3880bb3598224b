"""The per-session-handle memory of the last record seen per key, so a single writer's
`update()` is one compare-and-swap instead of a read plus a compare-and-swap.

Never trusted for reads: it only seeds a CAS, which fails (and refreshes it) if it is stale.
"""

from __future__ import annotations

from typing import Final

from shardstate.common.records import Record


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()


class VersionCache:
    """Key -> last seen Record (or None when the key was seen absent), at most `size` keys,
    the least recently used dropped first (a read refreshes a key only once the cache is full).

    No lock: every step is one atomic dict operation, and the worst two threads racing on
    one handle can do is leave an entry stale or missing, which costs a failed CAS (that
    refreshes it) or a read."""

    def __init__(self, size: int = 256, max_value_bytes: int = 64 * 1024) -> None:
        self.size = size
        self.max_value_bytes = max_value_bytes
        self._items: dict[str, Record | None] = {}  # oldest first

    def lookup(self, key: str) -> Record | _Unknown | None:
        items = self._items
        rec = items.get(key, UNKNOWN)
        if rec is not UNKNOWN and len(items) >= self.size:
            items.pop(key, None)  # to the end: not the next one dropped
            items[key] = rec  # type: ignore[assignment]
        return rec

    def remember(self, key: str, record: Record | None) -> None:
        self._store(key, record, None)

    def remember_if_newer(self, key: str, record: Record | None, version: int) -> None:
        """Remember unless what is cached was written after `version` (concurrent callers
        on one handle may answer out of order)."""
        self._store(key, record, version)

    def _store(self, key: str, record: Record | None, version: int | None) -> None:
        if self.size <= 0:
            return
        items = self._items
        cur = items.pop(key, None)
        if version is not None and cur is not None and cur.version > version:
            items[key] = cur  # keep the newer one
            return
        if record is not None and len(record.value) > self.max_value_bytes:
            return  # big values are not worth keeping; update() will read
        items[key] = record  # last: the most recently used
        while len(items) > self.size:
            try:
                del items[next(iter(items))]
            except (KeyError, StopIteration, RuntimeError):
                break  # another thread changed it meanwhile

    def forget(self, key: str) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
