"""The storage engine of a shard: every State operation on one LevelDB, one WriteBatch each,
plus the change-log, snapshot and apply API that replication and migration build on.

Independent of gRPC: takes and returns shardstate.v1 protobuf messages (replies without their
header, except `header.replayed`), raises shardstate.common.errors exceptions.

API for replication / migration / routers (all on the event loop thread):

    Engine.open(config: ShardConfig) -> Engine
    engine.revision() -> int                 # highest committed revision (applied on a replica)
    engine.oldest_revision() -> int          # lowest from_revision changes_since still serves
    engine.changes_since(from_revision, limit) -> list[ChangeEntry]   # revision >= from, oldest
    engine.changes_since_raw(from_revision, limit) -> list[(revision, bytes)]  #   first; raises
                                             # HistoryCompactedError below oldest_revision()
    await engine.wait_for_revision(rev, timeout_s) -> bool  # True once rev is committed
    await engine.wait_for_change(timeout_s)  # returns at the next commit (or timeout / close)
    await engine.apply_changes(entries) -> int   # replica: raw ops + ~| entries + revision in
                                             # one WriteBatch; entries <= revision() skipped
    engine.snapshot() -> Snapshot            # `with` it; .revision; iterates raw (key, value)
                                             # of all data (no ~|, no _|)
    engine.install_snapshot_chunk(ops, first, revision_or_None)   # follower side
    await engine.raise_revision(floor)       # never hand out a revision <= floor (persisted)
    engine.retention_hold = lambda: rev      # change-log trim keeps revisions >= rev (0 = none)
    engine.sweeping = False                  # replicas: do not reclaim expired data themselves
    engine.set_node_meta(name, bytes) / engine.node_meta(name)   # `_|name`, local, synced

Writers of one session are serialized: plain writes run from read to LevelDB write without
yielding to the event loop; with --fsync a write waits for its group commit while holding a
per-session lock. Reads never wait.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from shardstate.server.config import ShardConfig
from shardstate.v1 import replication_pb2, state_pb2, types_pb2

from . import changelog, expiry, idempotency, keys, logs, sessions, snapshot, txn
from . import encoding as enc
from .context import WriteContext, node_write
from .locks import SessionLocks
from .revision import wall_ms
from .store import MB, CacheSizes, Store
from .validation import SessionRef, key_bytes, session_ref, stream_bytes, ttl
from .values import unpack_u64

log = logging.getLogger("shardstate.engine")
R = TypeVar("R")
SWEEP_BATCH = 500
IDEMPOTENCY_RESCAN_MS = 60_000  # the idempotency collector reads its index from the start this often
TRIM_CHUNK = 1000  # change-log entries deleted per WriteBatch by the sweeper (~1 ms each)


class Engine:
    def __init__(self, config: ShardConfig, clock: Callable[[], int] = wall_ms) -> None:
        self.config = config
        # The wall clock (ms) every TTL, expiry and timestamp is judged by; tests pass one
        # they control. Revisions keep their own clock (revision.py): they only ever increase.
        self.now_ms = clock
        self.limits = config
        self.shard_id = config.id
        self.store = Store(config.data_dir, config, fsync=config.fsync, compression=config.compression,
                           background_nice=config.compaction_nice, sizes=CacheSizes(
                               block_cache_bytes=config.block_cache_mib * MB,
                               write_buffer_bytes=config.write_buffer_mib * MB,
                               max_open_files=config.max_open_files,
                               metas=config.session_cache, records=config.record_cache))
        self._ref_cap = config.session_cache
        self._locks = SessionLocks() if self.store.group_commit else None
        self._window_ms = int(config.idempotency_window_s * 1000)
        self.retention_hold: Callable[[], int] | None = None
        self._refs: dict[tuple[str, str], SessionRef] = {}
        self.sweeping = True
        # Sessions the sweeper may reclaim (None: all): a shard leaves alone the sessions it
        # holds but does not own (copied in by a rebalance, or moved away and not yet dropped).
        self.owns: Callable[[bytes, bytes], bool] | None = None
        self.on_sweep: Callable[[dict[str, int]], None] | None = None  # metrics (opmetrics.py)
        # Namespace limits (server/quota.py): raises for a write that would pass one; set with
        # store.usage only when a namespace has a sessions or bytes limit.
        self.quota: Callable[[tuple[str, int, int]], None] | None = None
        # Request ids with no stored record (made at the first write with one; dropped by
        # every write path other than _write, which must add each record it stores).
        self._absent: idempotency.Absent | None = None
        # The latest expiry of a record this process stored: a new filter waits for it too,
        # since records still held in a group or an fsync are not in LevelDB yet.
        self._recorded_until = 0
        # Where the idempotency index's entries not yet collected start (None: not known), and
        # when the collector last read it from the beginning.
        self._idem_from: bytes | None = None
        self._idem_from_ms = 0

    @classmethod
    def open(cls, config: ShardConfig, clock: Callable[[], int] = wall_ms) -> Engine:
        return cls(config, clock)

    def ref(self, namespace: str, session_id: str) -> SessionRef:
        # Validating and encoding the names costs more than the lookup: remember recent ones.
        refs = self._refs
        ref = refs.get((namespace, session_id))
        if ref is None:
            ref = session_ref(namespace, session_id, self.limits)
            if len(refs) >= self._ref_cap:
                refs.clear()
            if self._ref_cap:
                refs[(namespace, session_id)] = ref
        return ref

    def check(self, kind: str, req: Any) -> None:
        """The input checks of a request of `kind` (a State method in snake case) that read no
        data - keys, stream names, sizes, TTLs, request_id, a Txn's compares and ops; `ref` checks
        the names. The service makes them where it would redirect the request, so that a bad
        request gets the same answer from every node (docs/design.md §9); the ops make them."""
        limits = self.limits
        if kind in ("put", "delete", "increment", "append"):
            txn.check_op_input(kind, req, limits)
        elif kind == "txn":
            txn.validate(req, limits)
        elif kind == "get":
            key_bytes(req.key, limits)
        elif kind in ("read_log", "trim_log", "pop_last"):
            stream_bytes(req.stream, limits)
        elif kind == "touch":
            ttl(req.ttl_ms, "ttl_ms")
        rid = getattr(req, "request_id", "")
        if rid:
            idempotency.request_id_bytes(rid)

    # ---- reads: no locks, one DB read plus the (cached) session meta ----

    def get(self, req: state_pb2.GetRequest) -> state_pb2.GetResponse:
        return keys.get(self.store, self.ref(req.namespace, req.session_id), req, self.now_ms())

    def scan(self, req: state_pb2.ScanRequest) -> state_pb2.ScanResponse:
        return keys.scan(self.store, self.ref(req.namespace, req.session_id), req, self.now_ms())

    def read_log(self, req: state_pb2.ReadLogRequest) -> state_pb2.ReadLogResponse:
        return logs.read_log(self.store, self.ref(req.namespace, req.session_id), req, self.now_ms())

    def get_session(self, req: state_pb2.GetSessionRequest) -> state_pb2.GetSessionResponse:
        return sessions.get_session(self.store, self.ref(req.namespace, req.session_id), self.now_ms(), self.shard_id)

    def list_sessions(
        self, req: state_pb2.ListSessionsRequest, owned: Callable[[str, str], bool] | None = None
    ) -> state_pb2.ListSessionsResponse:
        return sessions.list_sessions(self.store, req, self.now_ms(), self.shard_id, owned)

    # ---- writes (each returns the coroutine of _write: one frame less per op) ----

    def put(self, req: state_pb2.PutRequest) -> Coroutine[Any, Any, state_pb2.PutResponse]:
        return self._write(req, keys.op_put, state_pb2.PutResponse)

    def delete(self, req: state_pb2.DeleteRequest) -> Coroutine[Any, Any, state_pb2.DeleteResponse]:
        return self._write(req, keys.op_delete, state_pb2.DeleteResponse)

    def increment(self, req: state_pb2.IncrementRequest) -> Coroutine[Any, Any, state_pb2.IncrementResponse]:
        return self._write(req, keys.op_increment, state_pb2.IncrementResponse)

    def txn(self, req: state_pb2.TxnRequest) -> Coroutine[Any, Any, state_pb2.TxnResponse]:
        return self._write(req, txn.op_txn, state_pb2.TxnResponse)

    def append(self, req: state_pb2.AppendRequest) -> Coroutine[Any, Any, state_pb2.AppendResponse]:
        return self._write(req, logs.op_append, state_pb2.AppendResponse)

    def trim_log(self, req: state_pb2.TrimLogRequest) -> Coroutine[Any, Any, state_pb2.TrimLogResponse]:
        return self._write(req, logs.op_trim, state_pb2.TrimLogResponse)

    def pop_last(self, req: state_pb2.PopLastRequest) -> Coroutine[Any, Any, state_pb2.PopLastResponse]:
        return self._write(req, logs.op_pop, state_pb2.PopLastResponse)

    def touch(self, req: state_pb2.TouchRequest) -> Coroutine[Any, Any, state_pb2.TouchResponse]:
        return self._write(req, sessions.op_touch, state_pb2.TouchResponse)

    def delete_session(self, req: state_pb2.DeleteSessionRequest) -> Coroutine[Any, Any, state_pb2.DeleteSessionResponse]:
        return self._write(req, sessions.op_delete_session, state_pb2.DeleteSessionResponse)

    async def _write(self, req: Any, op: Callable[[WriteContext, Any], R], reply: type[Any]) -> R:
        ref = self.ref(req.namespace, req.session_id)
        ridb = idempotency.request_id_bytes(req.request_id) if req.request_id else b""
        locks = self._locks
        if locks is not None:
            await locks.acquire(ref.mkey)
        try:
            now = self.now_ms()
            extra = ikey = absent = crc = None
            if ridb:
                ikey = idempotency.key(ref, ridb)
                crc = idempotency.fingerprint(req)  # before the op, which must not change it
                absent = self._idempotency_filter(now)
                if not absent.absent(ikey, now):
                    stored = idempotency.lookup(self.store, ikey, ridb, reply, now, crc)
                    if stored is not None:
                        return stored  # type: ignore[no-any-return]
            ctx = WriteContext(self.store, ref, now)
            resp = op(ctx, req)
            if ikey is not None and absent is not None and ctx.writes:
                extra = idempotency.record(ref, ridb, ikey, resp, now, self._window_ms, crc)
                absent.add(ikey)  # before it lands: a failed write only costs a LevelDB get
                if now + self._window_ms > self._recorded_until:
                    self._recorded_until = now + self._window_ms
            pending = ctx.finish(extra)
            if pending is not None:
                if pending.usage is not None and self.quota is not None:
                    self.quota(pending.usage)  # refused: nothing is written
                await self.store.commit(pending, hold=True)
            return resp
        finally:
            if locks is not None:
                locks.release(ref.mkey)

    def _idempotency_filter(self, now: int) -> idempotency.Absent:
        absent = self._absent
        # (A window made longer - tests do - needs a filter that keeps keys that long.)
        if absent is None or absent.window_ms < self._window_ms or not absent.valid(now):
            armed_at = max(idempotency.latest_expiry(self.store), self._recorded_until)
            absent = self._absent = idempotency.Absent(armed_at, self._window_ms, now)
        return absent

    # ---- change log, replication, snapshots ----

    def session_revision(self, namespace: str, session_id: str) -> int:
        """The revision of the session's last write (deletes included: a deleted session's
        tombstone keeps it); 0 for a session never written. A read of the session shows
        nothing written after it."""
        ref = self.ref(namespace, session_id)
        meta = self.store.load_meta(ref.mkey)
        if meta is not None:
            return meta.max_version
        tomb = self.store.get(enc.tombstone_key(ref.nsb, ref.sidb))
        return unpack_u64(tomb) if tomb is not None else 0

    def revision(self) -> int:
        return self.store.committed

    def oldest_revision(self) -> int:
        return changelog.oldest_revision(self.store)

    def changes_since(self, from_revision: int, limit: int) -> list[replication_pb2.ChangeEntry]:
        return changelog.changes_since(self.store, from_revision, limit)

    def changes_since_raw(self, from_revision: int, limit: int) -> list[tuple[int, bytes]]:
        return changelog.changes_since_raw(self.store, from_revision, limit)

    async def wait_for_revision(self, revision: int, timeout: float) -> bool:
        return await self.store.wait_for_revision(revision, timeout)

    async def wait_for_change(self, timeout: float) -> None:
        await self.store.wait_for_change(timeout)

    def wake_waiters(self) -> None:
        """Wake every wait_for_* now (shutdown: watchers re-check whether to stop)."""
        self.store.wake()

    async def apply_changes(self, entries: Sequence[bytes | replication_pb2.ChangeEntry]) -> int:
        """Replica: apply a primary's entries in one WriteBatch; returns the applied revision."""
        self._absent = self._idem_from = None  # the entries may store idempotency records
        if self.store.usage is not None:
            self.store.usage.forget()
        pending = changelog.replica_pending(self.store, entries)
        if pending is not None:
            await self.store.commit(pending)
        return self.store.committed

    def snapshot(self) -> snapshot.Snapshot:
        return snapshot.Snapshot(self.store)

    def install_snapshot_chunk(
        self, ops: Iterable[tuple[bytes, bytes | None]], first: bool, revision: int | None
    ) -> None:
        """Follower: `first` clears all data (node meta kept); `revision` (last chunk) sets the
        applied revision and makes it the start of the follower's change-log history."""
        self._absent = self._idem_from = None  # the chunk may store idempotency records
        if self.store.usage is not None:
            self.store.usage.forget()
        if first:
            snapshot.clear_data(self.store)
        snapshot.write_chunk(self.store, ops, revision)

    async def write_raw(self, ops: list[tuple[bytes, bytes | None]], floor: int = 0) -> int:
        """Rebalancing: raw ops copied from another shard (or dropping sessions that moved
        away), as one write with its own revision and a change-log entry of no session and no
        events (replicas apply it; watchers see nothing). `floor`: later revisions are above it.
        Returns the write's revision."""
        self._absent = self._idem_from = None  # the ops may store idempotency records
        if floor:
            self.store.clock.raise_to(floor)
        if self.store.usage is not None:
            self.store.usage.raw(ops)
        pending = node_write(self.store, ops, self.now_ms())
        await self.store.commit(pending)
        meta = enc.META[0]
        for k, _ in ops:
            if k and k[0] == meta:
                self.store.forget_meta(k)
        return pending.revision

    async def raise_revision(self, floor: int) -> int:
        """Promotion guard rail: every later revision is above `floor`. Written as an empty
        change-log entry at the raised revision, so that replicas following this node reach
        its revision (and count as caught up) before its next write."""
        self.store.clock.raise_to(floor)
        # Through the commit path, so a queued group commit cannot persist a lower revision after it.
        pending = node_write(self.store, [], self.now_ms())
        await self.store.commit(pending)
        return pending.revision

    def set_node_meta(self, name: str, value: bytes) -> None:
        self.store.set_node_meta(name, value)

    def node_meta(self, name: str) -> bytes | None:
        return self.store.node_meta(name)

    # ---- expiry sweeper and retention ----

    async def sweep_once(self) -> dict[str, int]:
        """One pass: reclaim due sessions and keys, collect idempotency records, trim the
        change log. Returns what it did (for logs and tests)."""
        done = {"sessions": 0, "keys": 0, "idempotency": 0, "changes_trimmed": 0}
        store = self.store
        if self.sweeping:
            owns = self.owns
            for exp, ns, sid in expiry.due_sessions(store, self.now_ms(), SWEEP_BATCH):
                if owns is not None and not owns(ns, sid):
                    continue
                if await self._reclaim_session(ns, sid, exp):
                    done["sessions"] += 1
                await asyncio.sleep(0)
            for (ns, sid), due in expiry.due_keys(store, self.now_ms(), SWEEP_BATCH).items():
                if owns is not None and not owns(ns, sid):
                    continue
                done["keys"] += await self._reclaim_keys(ns, sid, due)
                await asyncio.sleep(0)
            await self._collect_idempotency(done)
        # In chunks, letting requests in between: a busy shard has thousands of entries to drop
        # every second, and one WriteBatch of 5 000 held the event loop for ~5 ms.
        while True:
            hold = self.retention_hold() if self.retention_hold is not None else 0
            n = changelog.trim(store, self.now_ms(), self.config.changelog_retention,
                               self.config.changelog_retention_s, hold, max_ops=TRIM_CHUNK)
            done["changes_trimmed"] += n
            if n < TRIM_CHUNK:
                return done
            await asyncio.sleep(0)

    async def _collect_idempotency(self, done: dict[str, int]) -> None:
        """Every record whose window has passed, SWEEP_BATCH index entries per write (a busy
        shard stores thousands a second), resuming where the last scan stopped; from the
        beginning again every IDEMPOTENCY_RESCAN_MS, so nothing can stay behind for longer."""
        now = self.now_ms()
        if self._idem_from is not None and not 0 <= now - self._idem_from_ms < IDEMPOTENCY_RESCAN_MS:
            self._idem_from = None
        if self._idem_from is None:
            self._idem_from_ms = now
        while True:
            ops, self._idem_from = idempotency.expired(self.store, self.now_ms(), SWEEP_BATCH, self._busy, self._idem_from)
            if ops:
                await self.store.commit(node_write(self.store, ops, self.now_ms()))
                done["idempotency"] += sum(1 for k, _ in ops if k[:1] == enc.IDEMPOTENCY)
            if len(ops) < SWEEP_BATCH:
                return

    def locked_metas(self) -> list[bytes]:
        """Meta keys of the sessions whose writes are in flight (group commit only; without
        it a write never suspends, so none is ever in flight between two events)."""
        return self._locks.held() if self._locks is not None else []

    def _busy(self, mkey: bytes) -> bool:
        return self._locks is not None and self._locks.busy(mkey)

    async def _locked(self, ref: SessionRef, fn: Callable[[], Any]) -> Any:
        if self._locks is None:
            return await fn()
        await self._locks.acquire(ref.mkey)
        try:
            return await fn()
        finally:
            self._locks.release(ref.mkey)

    async def _reclaim_session(self, ns: bytes, sid: bytes, expires_at: int) -> bool:
        ref = SessionRef.of(ns.decode(), sid.decode(), ns, sid)

        async def run() -> bool:
            ctx = WriteContext(self.store, ref, self.now_ms())
            if not expiry.reclaim_session(ctx, expires_at):
                # stale index entry; local clean-up
                self.store.db.delete(enc.session_expiry_key(expires_at, ns, sid))
                return False
            pending = ctx.finish()
            if pending is not None:
                await self.store.commit(pending)
            return True

        return bool(await self._locked(ref, run))

    async def _reclaim_keys(self, ns: bytes, sid: bytes, due: list[tuple[int, bytes]]) -> int:
        ref = SessionRef.of(ns.decode(), sid.decode(), ns, sid)

        async def run() -> int:
            ctx = WriteContext(self.store, ref, self.now_ms())
            n, stale = expiry.reclaim_keys(ctx, due)
            pending = ctx.finish()
            if pending is not None:
                await self.store.commit(pending)
            for k in stale:
                self.store.db.delete(k)  # stale index entries; local clean-up
            return n

        return int(await self._locked(ref, run))

    async def run_sweeper(self) -> None:
        """Background task: sweep every sweep_interval_s until cancelled."""
        while True:
            try:
                done = await self.sweep_once()
                if self.on_sweep is not None:
                    self.on_sweep(done)
                if any(done.values()):
                    log.info("sweep", extra={"fields": done})
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep failed")
            await asyncio.sleep(self.config.sweep_interval_s)

    # ---- status ----

    def count_sessions(self) -> tuple[int, int]:
        """(live sessions, keys): a scan of the session metas; run it off the event loop."""
        now = self.now_ms()
        n = nkeys = 0
        for _, raw in self.store.db.iterator(prefix=enc.META):
            m = types_pb2.SessionInfo.FromString(raw)
            if m.expires_at_ms and m.expires_at_ms <= now:
                continue
            n += 1
            nkeys += m.key_count
        return n, nkeys

    def disk_bytes(self) -> int:
        total = 0
        with os.scandir(self.store.path) as it:
            for e in it:
                if e.is_file():
                    total += e.stat().st_size
        return total

    async def close(self) -> None:
        await self.store.drain()
        self.store.close()
