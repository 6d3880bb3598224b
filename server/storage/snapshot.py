"""Consistent snapshots of a shard's data (for a follower behind the retained change log, and
for backups), and installing one on a follower.

A snapshot carries every key but the change log and node meta (`~|`, `_|`); its revision is the
`_|revision` inside the snapshot, so the follower continues the log from revision + 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from shardstate.v1 import replication_pb2

from . import encoding as enc
from .store import COMPACTED_KEY, REVISION_KEY, Store
from .values import pack_u64, unpack_u64

_SKIP = (enc.CHANGE[0], enc.NODE[0])
_KEEP_ON_RESET = enc.NODE  # node meta (cluster map) survives a snapshot install
CHUNK_OPS = 2000  # a chunk ends at whichever limit comes first
CHUNK_BYTES = 1 << 20
# What `count` reports per family tag, beside the total.
COUNTED = {enc.META[0]: "sessions", enc.DATA[0]: "records", enc.LOG[0]: "log_entries",
           enc.IDEMPOTENCY[0]: "idempotency", enc.TOMBSTONE[0]: "tombstones"}


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

    def count(self, keep: Callable[[bytes], bool] | None = None) -> dict[str, int]:
        """Keys per family (`COUNTED` names) and `entries`, all of them (or those `keep`
        accepts); reads no values."""
        out = dict.fromkeys(("entries", *COUNTED.values()), 0)
        for k in self._snap.iterator(include_value=False):
            if k[0] in _SKIP or (keep is not None and not keep(k)):
                continue
            out["entries"] += 1
            name = COUNTED.get(k[0])
            if name is not None:
                out[name] += 1
        return out

    def close(self) -> None:
        self._snap.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def take(it: Iterator[tuple[bytes, bytes]]) -> tuple[replication_pb2.SnapshotChunk, bool]:
    """The next chunk of a snapshot's iterator, and whether the iterator is done."""
    chunk = replication_pb2.SnapshotChunk()
    size = 0
    for k, v in it:
        chunk.ops.add(key=k, value=v)
        size += len(k) + len(v)
        if len(chunk.ops) >= CHUNK_OPS or size >= CHUNK_BYTES:
            return chunk, False
    return chunk, True


def holds_data(store: Store) -> bool:
    """Whether the store holds anything but node meta (data, tombstones, change log …)."""
    return any(not k.startswith(_KEEP_ON_RESET) for k in store.db.iterator(include_value=False))


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
