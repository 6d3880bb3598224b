"""Per-session asyncio locks, created on demand and dropped when nobody holds or waits.

Only needed when a write can suspend between reading a session and landing its batch (group
commit); plain writes run from read to write without yielding to the event loop.
"""

from __future__ import annotations

import asyncio


class SessionLocks:
    def __init__(self) -> None:
        self._locks: dict[bytes, tuple[asyncio.Lock, list[int]]] = {}

    async def acquire(self, key: bytes) -> None:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        entry[1][0] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._drop(key, entry)
            raise

    def release(self, key: bytes) -> None:
        entry = self._locks[key]
        entry[0].release()
        self._drop(key, entry)

    def _drop(self, key: bytes, entry: tuple[asyncio.Lock, list[int]]) -> None:
        entry[1][0] -= 1
        if not entry[1][0]:
            del self._locks[key]

    def busy(self, key: bytes) -> bool:
        return key in self._locks

    def held(self) -> list[bytes]:
        """The keys held or waited for now."""
        return list(self._locks)
