"""The per-session-handle memory of the last record seen per key, so a single writer's
`update()` is one compare-and-swap instead of a read plus a compare-and-swap.

Never trusted for reads: it only seeds a CAS, which fails (and refreshes it) if it is stale.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Final

from shardstate.records import Record


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()


class VersionCache:
    """LRU of key -> last seen Record (or None when the key was seen absent)."""

    def __init__(self, size: int = 256, max_value_bytes: int = 64 * 1024) -> None:
        self.size = size
        self.max_value_bytes = max_value_bytes
        self._items: OrderedDict[str, Record | None] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, key: str) -> Record | _Unknown | None:
        with self._lock:
            if key not in self._items:
                return UNKNOWN
            self._items.move_to_end(key)
            return self._items[key]

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
        with self._lock:
            if version is not None:
                cur = items.get(key)
                if cur is not None and cur.version > version:
                    return
            if record is not None and len(record.value) > self.max_value_bytes:
                items.pop(key, None)  # big values are not worth keeping; update() will read
                return
            items[key] = record
            items.move_to_end(key)
            while len(items) > self.size:
                items.popitem(last=False)

    def forget(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
