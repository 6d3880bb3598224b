"""Writing a prepared write to LevelDB: directly, or group-committed when every write syncs.

A `Pending` is one operation's whole WriteBatch (record, meta, indexes, idempotency record,
change-log entry, `_|revision`). With sync writes, concurrent writers queue their Pendings and
one task merges the queue into a single synced WriteBatch (LevelDB's DBImpl::Write does the
same), so an fsync costs little per op.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import encoding as enc

Op = tuple[bytes, bytes | None]  # value None = delete
REVISION_KEY = enc.node_key("revision")


@dataclass(slots=True)
class Pending:
    revision: int  # what it writes at `_|revision` (REVISION_KEY), when it writes there
    ops: list[Op]
    # Session meta now on disk, for the meta cache: meta key -> SessionInfo (None = gone).
    metas: dict[bytes, Any] = field(default_factory=dict)
    changes: int = 1  # change-log entries this write adds
    # Every record (d| key) it writes, for the record cache: key -> bytes (None = deleted).
    # None = not known (e.g. a replica's applied entries): the whole record cache is dropped.
    records: dict[bytes, bytes | None] | None = None
    # (namespace, sessions, bytes) it adds to what the shard holds (storage/usage.py), if any.
    usage: tuple[str, int, int] | None = None


def write_batch(db: Any, pendings: list[Pending], sync: bool) -> None:
    wb = db.write_batch(sync=sync)
    put, delete = wb.put, wb.delete
    if len(pendings) == 1:
        for k, v in pendings[0].ops:
            if v is None:
                delete(k)
            else:
                put(k, v)
        wb.write()
        return
    # In one atomic WriteBatch only the highest `_|revision` counts: write that one alone
    # (a LevelDB insert per op of a grouped Batch otherwise).
    top: tuple[int, bytes] | None = None
    for p in pendings:
        for k, v in p.ops:
            if v is None:
                delete(k)
            elif k == REVISION_KEY:
                if top is None or p.revision > top[0]:
                    top = (p.revision, v)
            else:
                put(k, v)
    if top is not None:
        put(REVISION_KEY, top[1])
    wb.write()


class GroupCommitter:
    """Merges the Pendings queued while a synced write is in flight into the next one."""

    def __init__(self, db: Any, on_written: Callable[[Pending], None]) -> None:
        self._db = db
        self._on_written = on_written
        self._queue: list[tuple[Pending, asyncio.Future[None]]] = []
        self._running = False

    async def commit(self, pending: Pending) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((pending, fut))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The caller went away, but its write is queued: hold its session lock until
            # the write lands, or the next writer of the session would plan on stale state.
            if not fut.done():
                await asyncio.wait([fut])
            raise

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                group, self._queue = self._queue, []
                pendings = [p for p, _ in group]
                try:
                    # plyvel releases the GIL while LevelDB writes and syncs its log.
                    await loop.run_in_executor(None, write_batch, self._db, pendings, True)
                except Exception as e:
                    for _, fut in group:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for p, fut in group:
                    self._on_written(p)
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._running = False

    def idle(self) -> bool:
        return not self._running and not self._queue
