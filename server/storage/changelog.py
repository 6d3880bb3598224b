"""The change log (`~|revision` -> ChangeEntry): reading it from a revision, retention
(count + age), and applying a primary's entries on a replica.

History is complete for revisions above `_|compacted` (the highest revision trimmed, or the
revision of an installed snapshot); `oldest_revision = compacted + 1`.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence

from shardstate.common.errors import HistoryCompactedError
from shardstate.v1 import replication_pb2, types_pb2

from . import encoding as enc
from . import entries
from .commit import Op, Pending
from .revision import LOGICAL_BITS
from .store import COMPACTED_KEY, REVISION_KEY, Store
from .values import pack_u64

_CHANGE = enc.CHANGE
_U64_AT_1 = struct.Struct(">Q").unpack_from  # a change key's revision: enc.revision_of_change_key


def oldest_revision(store: Store) -> int:
    return store.compacted + 1


class Tail:
    """The change-log entries committed lately, in memory, so that readers following the head
    (replication, Watch) do not read back from LevelDB what was just written. Complete from
    `start`: every entry with revision >= start that is in LevelDB is here, in revision order.
    Fed by Store.written (after each write lands); bounded by `max_bytes` (oldest dropped)."""

    def __init__(self, start: int, max_bytes: int = 8 << 20) -> None:
        self.start = start
        self.max_bytes = max_bytes
        self.items: list[tuple[int, bytes]] = []  # (revision, serialized ChangeEntry)
        self.size = 0

    def add(self, p: Pending) -> None:
        ops = p.ops
        if p.changes == 1 and len(ops) >= 2:  # the usual layout: ..., ~|entry, _|revision
            key, raw = ops[-2]
            if key[:1] == _CHANGE:
                self._add(_U64_AT_1(key, 1)[0], raw)
                return
        if p.changes:
            for key, raw in ops:
                if key[:1] == _CHANGE:
                    self._add(_U64_AT_1(key, 1)[0], raw)

    def _add(self, rev: int, raw: bytes | None) -> None:
        items = self.items
        if raw is None or (items and rev <= items[-1][0]):
            if rev >= self.start:  # not in order (never expected): start over above both
                self.start = max(rev, items[-1][0] if items else 0) + 1
                items.clear()
                self.size = 0
        elif rev >= self.start:
            items.append((rev, raw))
            self.size += len(raw)
            if self.size > self.max_bytes:
                self._drop()

    def _drop(self) -> None:
        """The oldest go, down to 3/4 of max_bytes (each entry is dropped once)."""
        items, size, n = self.items, self.size, 0
        while size > self.max_bytes * 3 // 4:
            size -= len(items[n][1])
            n += 1
        self.size = size
        self.start = items[n - 1][0] + 1
        del items[:n]

    def since(self, from_revision: int, limit: int) -> list[tuple[int, bytes]] | None:
        """Like changes_since_raw, or None when the tail does not reach back to from_revision."""
        if from_revision < self.start:
            return None
        i = bisect.bisect_left(self.items, from_revision, key=_first)
        return self.items[i:i + limit]


def _first(item: tuple[int, bytes]) -> int:
    return item[0]


def keep_tail(store: Store, on: bool) -> None:
    """Keep (or stop keeping) a Tail of what commits from now on. Only while this node is the
    primary: a follower's snapshot installs and set-asides change the log behind Store.written."""
    if not on:
        store.tail = None
    elif store.tail is None:
        store.tail = Tail(store.committed + 1)


def changes_since_raw(store: Store, from_revision: int, limit: int) -> list[tuple[int, bytes]]:
    """(revision, serialized ChangeEntry) with revision >= from_revision, oldest first."""
    if store.compacted and from_revision <= store.compacted:
        raise HistoryCompactedError.of(from_revision, store.compacted + 1)
    out: list[tuple[int, bytes]] = []
    if limit <= 0:
        return out
    tail: Tail | None = store.tail
    if tail is not None:
        recent = tail.since(from_revision, limit)
        if recent is not None:
            return recent
    start = enc.change_key(max(from_revision, 0))
    for k, v in store.db.iterator(start=start, stop=enc.CHANGE_END):
        out.append((enc.revision_of_change_key(k), v))
        if len(out) >= limit:
            break
    return out


def changes_since(store: Store, from_revision: int, limit: int) -> list[replication_pb2.ChangeEntry]:
    """Parsed entries, their events complete (values filled back from the ops, entries.py)."""
    return [entries.parse(v) for _, v in changes_since_raw(store, from_revision, limit)]


def trim(store: Store, now_ms: int, keep: int, keep_s: float, hold_from: int = 0, max_ops: int = 10_000) -> int:
    """Delete the oldest entries beyond `keep` entries or older than `keep_s`, never one at or
    above `hold_from` (> 0: a follower still needs it), at most `max_ops` of them. Local: not
    itself a change.

    It reads from just after `store.compacted` (every entry up to it is gone): LevelDB keeps the
    deletions of earlier trims until compaction drops them, and a scan from the start of the
    log would step over all of them, once a second, more each time."""
    excess = store.change_count - keep
    cutoff = max(0, now_ms - int(keep_s * 1000)) << LOGICAL_BITS
    victims: list[bytes] = []
    last = 0
    for k in store.db.iterator(start=enc.change_key(store.compacted + 1), stop=enc.CHANGE_END, include_value=False):
        rev = enc.revision_of_change_key(k)
        if (hold_from and rev >= hold_from) or (excess <= 0 and rev >= cutoff):
            break
        victims.append(k)
        excess -= 1
        last = rev
        if len(victims) >= max_ops:
            break
    if not victims:
        return 0
    wb = store.db.write_batch()
    for k in victims:
        wb.delete(k)
    wb.put(COMPACTED_KEY, pack_u64(last))
    wb.write()
    store.compacted = last
    store.change_count -= len(victims)
    return len(victims)


def replica_pending(store: Store, entries: Sequence[bytes | replication_pb2.ChangeEntry]) -> Pending | None:
    """One WriteBatch applying a primary's entries (raw ops + ~| entries + revision); entries
    at or below the applied revision are skipped, so re-sending a batch is harmless.

    Entries are best given serialized (as they come off the wire): each is stored verbatim
    and only its revision and raw ops are decoded (ChangeEntryOps), never its events."""
    ops: list[Op] = []
    metas: dict[bytes, types_pb2.SessionInfo | None] = {}
    top = store.committed
    n = 0
    view = replication_pb2.ChangeEntryOps.FromString
    meta_tag = enc.META[0]
    # The meta cache needs the new value of a session meta it holds, or that an earlier
    # entry of this batch set (a deleted session created again). Another stays out of it
    # (the next read loads it from LevelDB), unless a group commit leaves time for a reader
    # to cache the old value before this write lands.
    cached = None if store.group_commit else store.meta_cached
    for raw in entries:
        if not isinstance(raw, bytes):
            raw = raw.SerializeToString()
        e = view(raw)
        if e.revision <= top:
            continue
        top = e.revision
        n += 1
        for op in e.ops:
            key = op.key
            if op.delete:
                ops.append((key, None))
                if key and key[0] == meta_tag:
                    metas[key] = None
            else:
                value = op.value
                ops.append((key, value))
                if key and key[0] == meta_tag and (cached is None or cached(key) or key in metas):
                    metas[key] = types_pb2.SessionInfo.FromString(value)
        ops.append((enc.change_key(top), raw))
    if not n:
        return None
    ops.append((REVISION_KEY, pack_u64(top)))
    store.clock.raise_to(top)
    return Pending(top, ops, metas, changes=n)
