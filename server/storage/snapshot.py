"""Consistent snapshots of a shard's data (for a follower behind the retained change log, and
for backups), and installing one on a follower.

A snapshot carries every key but the change log and node meta (`~|`, `_|`); its revision is the
`_|revision` inside the snapshot, so the follower continues the log from revision + 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from . import encoding as enc
from .store import COMPACTED_KEY, REVISION_KEY, Store
from .values import pack_u64, unpack_u64

_SKIP = (enc.CHANGE[0], enc.NODE[0])
_KEEP_ON_RESET = enc.NODE  # node meta (cluster map) survives a snapshot install


class Snapshot:
    """`for key, value in snap` yields the raw data; `snap.revision` is what it reflects."""

    def __init__(self, store: Store) -> None:
        self._snap: Any = store.db.snapshot()
        self.revision = unpack_u64(self._snap.get(REVISION_KEY))

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        for k, v in self._snap.iterator():
            if k[0] not in _SKIP:
                yield k, v

    def keys(self, tag: bytes) -> Iterator[bytes]:
        """The keys of one family (e.g. enc.META: one per session)."""
        yield from self._snap.iterator(prefix=tag, include_value=False)

    def close(self) -> None:
        self._snap.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def clear_data(store: Store, batch: int = 10_000) -> None:
    """Delete every key but node meta (first chunk of a snapshot install)."""
    while True:
        wb = store.db.write_batch()
        n = 0
        for k in store.db.iterator(include_value=False):
            if k.startswith(_KEEP_ON_RESET):
                continue
            wb.delete(k)
            n += 1
            if n >= batch:
                break
        wb.write()
        if n < batch:
            break
    store.forget_meta()
    store.change_count = 0


def write_chunk(store: Store, ops: Iterable[tuple[bytes, bytes | None]], revision: int | None) -> None:
    """Write snapshot data; with `revision` (the last chunk) the follower's history starts
    after it: applied revision = compacted = revision."""
    wb = store.db.write_batch(sync=store.fsync)
    for k, v in ops:
        if v is None:
            wb.delete(k)
        else:
            wb.put(k, v)
    if revision is not None:
        wb.put(REVISION_KEY, pack_u64(revision))
        wb.put(COMPACTED_KEY, pack_u64(revision))
    wb.write()
    store.forget_meta()
    if revision is not None:
        store.compacted = revision
        store.clock.raise_to(revision)
        store.committed = revision
        store.wake()
