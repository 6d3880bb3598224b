"""The shard's one LevelDB and the state every operation shares: revision clock, meta cache,
change-log bookkeeping, commit (direct or group-committed) and waiting for new revisions.

Nothing here is the only copy of anything: the meta cache and the counters are rebuilt from
disk at open, and every write lands in LevelDB before its effects reach them.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass
from typing import Any

import plyvel

from shardstate.common.config import Limits
from shardstate.v1 import types_pb2

from .. import cpu
from . import encoding as enc
from .commit import REVISION_KEY, GroupCommitter, Pending, write_batch
from .revision import RevisionClock
from .values import unpack_u64

COMPACTED_KEY = enc.node_key("compacted")
META_CACHE_SIZE = 20_000
# Recently written or read records (d| keys): a CAS reads its record first, and a LevelDB get
# cost more than the rest of the read. Bounded: at most this many, each at most this big.
RECORD_CACHE_SIZE = 16_384
RECORD_CACHE_MAX_BYTES = 4096
_MISSING: Any = object()
MB = 1024 * 1024


# LevelDB's table block: 32 KiB instead of its 4 KiB default. A write puts ~2.4 KB in 5-6 keys
# (record, change-log entry, meta, idempotency); with 4 KiB blocks, flushes and compactions
# spend their time per block (index entries, checksums, bloom probes). Measured with that
# key pattern by benchmarks/leveldb_blocks.py (400k writes, compactions included): 4 KiB
# 29 us/write, 16 KiB 24, 32 KiB 21, 64 KiB 20 - larger blocks make a cold point read copy
# more, so 32 KiB. The record and meta caches keep hot reads out of LevelDB.
BLOCK_SIZE = 32 * 1024

# LevelDB's memtable: flushed to a level-0 file when full, and four such files start a
# compaction. Shards (and their replicas) that take the same write rate would fill theirs
# together and flush and compact at the same moment, every one of them competing for the CPU
# at once: each process draws its size from +-25% around the mean so they drift apart.
WRITE_BUFFER_MEAN = 32 * MB
WRITE_BUFFER_JITTER = 0.25


def write_buffer_size(rng: random.Random | None = None, mean: int = WRITE_BUFFER_MEAN) -> int:
    r = (rng or random).random()
    return int(mean * (1 - WRITE_BUFFER_JITTER + 2 * WRITE_BUFFER_JITTER * r))


@dataclass(frozen=True)
class CacheSizes:
    """What the store keeps in memory: LevelDB's block cache, memtable and open tables, and the
    store's own meta and record caches (ShardConfig's --block-cache-mib and the rest)."""

    block_cache_bytes: int = 64 * MB
    write_buffer_bytes: int = WRITE_BUFFER_MEAN
    max_open_files: int = 1000
    metas: int = META_CACHE_SIZE
    records: int = RECORD_CACHE_SIZE


LEGACY_MOVE_CHUNK = 1000


def move_legacy_changes(db: Any) -> int:
    """Move change-log entries a store written before the tag change keeps under the old tag
    to the current one (encoding.py says why), LEGACY_MOVE_CHUNK per WriteBatch: each entry's
    move is atomic, so an interrupted open finishes the rest at the next. Returns how many."""
    moved = 0
    start = enc.LEGACY_CHANGE  # reading on after the last key moved, not over its deletion
    while True:
        chunk = list(itertools.islice(
            db.iterator(start=start, stop=enc.LEGACY_CHANGE_END, include_start=not moved),
            LEGACY_MOVE_CHUNK))
        if not chunk:
            return moved
        with db.write_batch() as wb:
            for k, v in chunk:
                wb.put(enc.CHANGE + k[1:], v)
                wb.delete(k)
        moved += len(chunk)
        start = chunk[-1][0]


class Store:
    def __init__(self, path: str, limits: Limits, *, fsync: bool = False, compression: str = "none",
                 background_nice: int = 0, sizes: CacheSizes = CacheSizes()) -> None:
        # LevelDB records each block's compression, so a store written with either setting
        # opens with the other; only new blocks follow the current one.
        self.db: Any = plyvel.DB(
            path, create_if_missing=True, write_buffer_size=write_buffer_size(mean=sizes.write_buffer_bytes),
            lru_cache_size=sizes.block_cache_bytes, max_open_files=sizes.max_open_files,
            bloom_filter_bits=10, block_size=BLOCK_SIZE,
            compression=None if compression == "none" else compression,
        )
        cpu.start_leveldb_background(self.db, background_nice)
        self.path = path
        self.limits = limits
        self.sizes = sizes
        self.fsync = fsync
        move_legacy_changes(self.db)
        last = unpack_u64(self.db.get(REVISION_KEY))
        self.compacted = unpack_u64(self.db.get(COMPACTED_KEY))
        self.change_count = 0
        # Entries up to `compacted` are gone (their deletions may not be: start after them).
        for k in self.db.iterator(start=enc.change_key(self.compacted + 1), stop=enc.CHANGE_END,
                                  include_value=False):
            self.change_count += 1
            last = max(last, enc.revision_of_change_key(k))
        self.clock = RevisionClock(last)
        self.committed = last  # highest revision whose write is in LevelDB
        self._meta: dict[bytes, types_pb2.SessionInfo | None] = {}
        # d| key -> stored bytes (None = absent), always what LevelDB holds: filled by reads
        # (synchronous, on the loop thread) and by written(); dropped by bulk writes.
        self._records: dict[bytes, bytes | None] = {}
        self._changed = asyncio.Event()
        self._committer = GroupCommitter(self.db, self.written) if fsync else None
        self._group: list[Pending] | None = None  # begin_group() .. end_group(): writes held
        self.closed = False

    # ---- session meta (read-only objects: writers copy before changing) ----

    def load_meta(self, mkey: bytes) -> types_pb2.SessionInfo | None:
        try:
            return self._meta[mkey]
        except KeyError:
            pass
        raw = self.db.get(mkey)
        meta = types_pb2.SessionInfo.FromString(raw) if raw is not None else None
        self._cache_meta(mkey, meta)
        return meta

    def _cache_meta(self, mkey: bytes, meta: types_pb2.SessionInfo | None) -> None:
        metas, cap = self._meta, self.sizes.metas
        if len(metas) >= cap and mkey not in metas:
            if not cap:
                return
            for k in list(metas)[: cap // 10 or 1]:  # the oldest tenth (dicts keep insertion order)
                del metas[k]
        metas[mkey] = meta

    def live_meta(self, mkey: bytes, now: int) -> types_pb2.SessionInfo | None:
        """The session's meta, or None when it does not exist or has expired."""
        meta = self.load_meta(mkey)
        if meta is None or (meta.expires_at_ms and meta.expires_at_ms <= now):
            return None
        return meta

    def cached(self) -> tuple[int, int]:
        """(session metas, records) held in memory now."""
        return len(self._meta), len(self._records)

    def meta_cached(self, mkey: bytes) -> bool:
        return mkey in self._meta

    def forget_meta(self, mkey: bytes | None = None) -> None:
        """Drop the cached meta of `mkey`; without one (after a bulk write: a snapshot), every
        cached meta and record."""
        if mkey is None:
            self._meta.clear()
            self._records.clear()
        else:
            self._meta.pop(mkey, None)

    # ---- records (d| keys) ----

    def load_record(self, dkey: bytes) -> bytes | None:
        """The stored bytes at a d| key (None: absent), from the record cache when it has them."""
        raw = self._records.get(dkey, _MISSING)
        if raw is _MISSING:
            raw = self.db.get(dkey)
            self._remember(dkey, raw)
        return raw  # type: ignore[no-any-return]

    def get(self, key: bytes) -> bytes | None:
        """db.get, through the record cache for d| keys."""
        if key[:1] == enc.DATA:
            return self.load_record(key)
        value: bytes | None = self.db.get(key)
        return value

    def _remember(self, dkey: bytes, raw: bytes | None) -> None:
        records = self._records
        if raw is not None and len(raw) > RECORD_CACHE_MAX_BYTES:
            records.pop(dkey, None)
            return
        cap = self.sizes.records
        if len(records) >= cap:
            if not cap:
                return
            for k in list(records)[: cap // 10 or 1]:
                del records[k]
        records[dkey] = raw

    # ---- commit ----

    async def commit(self, pending: Pending, hold: bool = False) -> None:
        """Write `pending`; `hold` (request handlers): join the open group, if any."""
        usage = self.usage
        if usage is not None and pending.usage is not None:
            # Counted before it lands, so that the next write's limit check (which may come
            # before this one's group or fsync is written) sees it.
            usage.add(pending.usage)
        try:
            if self._committer is None:
                if hold and self._group is not None:
                    self._group.append(pending)  # lands at end_group(), before anyone is answered
                    return
                # Unsynced writes return once LevelDB's log has the batch (a kill -9 loses nothing).
                write_batch(self.db, [pending], False)
                self.written(pending)
            else:
                await self._committer.commit(pending)
        except BaseException:
            if usage is not None:
                usage.forget()  # it may or may not have landed: count again
            raise

    def begin_group(self) -> bool:
        """Hold the unsynced request writes (commit(hold=True)) that follow until end_group() and write them as one
        WriteBatch (one log write instead of one per op). Only for a run of writes that never
        yields to the event loop and never reads what an earlier write of the run wrote (the
        caller keeps each session to one op per group): the writes are not visible - in
        LevelDB, the meta cache or `committed` - until end_group(). False (nothing held) with
        --fsync, where the group committer batches already."""
        if self._committer is not None or self._group is not None:
            return False
        self._group = []
        return True

    def end_group(self) -> None:
        """Write what begin_group() held (raises what LevelDB raised; then nothing landed)."""
        group, self._group = self._group, None
        if not group:
            return
        try:
            write_batch(self.db, group, False)
        except BaseException:
            if self.usage is not None:
                self.usage.forget()
            raise
        for p in group:
            self.written(p, wake=False)
        self.wake()

    @property
    def group_commit(self) -> bool:
        return self._committer is not None

    tail: Any = None  # changelog.Tail of recent change-log entries (primary only), or None
    usage: Any = None  # usage.Usage when namespace limits need it (server/quota.py), or None

    def written(self, p: Pending, wake: bool = True) -> None:
        if self.tail is not None:
            self.tail.add(p)
        for mkey, meta in p.metas.items():
            self._cache_meta(mkey, meta)
        if p.records is None:
            self._records.clear()
        else:
            for dkey, raw in p.records.items():
                self._remember(dkey, raw)
        self.change_count += p.changes
        if p.revision > self.committed:
            self.committed = p.revision
        if wake:
            self.wake()

    def wake(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def wait_for_revision(self, revision: int, timeout: float) -> bool:
        """True once `revision` is committed; False after `timeout` seconds (or at close)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.committed < revision and not self.closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return self.committed >= revision
        return self.committed >= revision

    async def wait_for_change(self, timeout: float) -> None:
        """Return at the next commit, after `timeout` seconds, or at close."""
        if self.closed:
            return
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    def set_node_meta(self, name: str, value: bytes) -> None:
        """Node-local metadata (`_|name`), synced; never replicated."""
        self.db.put(enc.node_key(name), value, sync=True)

    def node_meta_names(self, prefix: str) -> list[str]:
        """Names of the node meta entries starting with `prefix`."""
        keys = self.db.iterator(prefix=enc.prefix(enc.NODE, partial=prefix.encode()), include_value=False)
        return [bytes(enc.decode(k, "b")[0]).decode() for k in keys]  # type: ignore[arg-type]

    def node_meta(self, name: str) -> bytes | None:
        value: bytes | None = self.db.get(enc.node_key(name))
        return value

    async def drain(self) -> None:
        """Wait until queued group commits have landed."""
        while self._committer is not None and not self._committer.idle():
            await asyncio.sleep(0.005)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.wake()
            self.db.close()
