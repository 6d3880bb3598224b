"""One write in progress on one session: its pending ops, the session meta it changes, the
events it emits, and its revision; `finish()` turns it into the single WriteBatch (Pending).

Reads through the context see its own pending writes (a Txn's later ops see its earlier ones).
An expired session that was not swept yet is hidden from reads, and the first mutation
reclaims it (cascade delete, SESSION_EXPIRE) in the same batch before creating it anew.
"""

from __future__ import annotations

from typing import Any

from shardstate.v1 import types_pb2

from . import encoding as enc
from . import entries
from .commit import Op, Pending
from .store import REVISION_KEY, Store
from .usage import delta
from .validation import SessionRef
from .values import (
    StoredRecord,
    pack_record,
    pack_u64,
    record_expires_at,
    unpack_record,
    unpack_u64,
)

_MISSING = object()


class WriteContext:
    __slots__ = (
        "base", "db", "deleted", "dprefix", "events", "expired", "got", "limits", "loaded", "meta", "now",
        "pending", "ref", "rev", "session_ttl_ms", "store",
    )

    def __init__(self, store: Store, ref: SessionRef, now: int) -> None:
        self.store = store
        self.db = store.db
        self.limits = store.limits
        self.ref = ref
        self.now = now
        self.pending: dict[bytes, bytes | None] = {}
        self.got: dict[bytes, bytes | None] = {}  # LevelDB reads of this write
        self.events: list[types_pb2.Event | entries.PutEvent] = []
        self.rev = 0
        self.session_ttl_ms = 0
        self.meta: types_pb2.SessionInfo | None = None  # working copy once a mutation needs it
        self.deleted = False  # the session was deleted/reclaimed by this write
        self.dprefix = enc.data_prefix_in(ref.part)
        base = self.loaded = store.load_meta(ref.mkey)  # on disk before this write (namespace usage)
        self.expired: types_pb2.SessionInfo | None = None
        if base is not None and base.expires_at_ms and base.expires_at_ms <= now:
            self.expired, base = base, None
        self.base = base

    # ---- revision and raw access ----

    def revision(self) -> int:
        if not self.rev:
            self.rev = self.store.clock.next()
        return self.rev

    def read(self, key: bytes) -> bytes | None:
        v = self.pending.get(key, _MISSING)
        if v is _MISSING:
            # Nothing else writes the session meanwhile: a key read twice (a CAS checks the
            # record, then the write reads it again for sizes) needs one LevelDB get.
            got = self.got
            v = got.get(key, _MISSING)
            if v is _MISSING:
                v = got[key] = self.store.get(key)
        return v  # type: ignore[return-value]

    def put(self, key: bytes, value: bytes) -> None:
        self.pending[key] = value

    def delete(self, key: bytes) -> None:
        self.pending[key] = None

    @property
    def writes(self) -> bool:
        return bool(self.pending) or self.meta is not None

    # ---- session meta ----

    def live_meta(self) -> types_pb2.SessionInfo | None:
        """The session as this write sees it now (None: absent, expired or deleted)."""
        if self.meta is not None:
            return self.meta
        return None if self.deleted else self.base

    def session(self) -> types_pb2.SessionInfo:
        """The working meta for a mutation; creates the session (reclaiming an expired one)."""
        if self.meta is not None:
            return self.meta
        if self.expired is not None:
            self.cascade(types_pb2.SESSION_EXPIRE)
        m = types_pb2.SessionInfo()
        if self.base is not None and not self.deleted:
            m.CopyFrom(self.base)
        else:
            m.created_at_ms = self.now
            tkey = enc.tombstone_key(self.ref.nsb, self.ref.sidb)
            tomb = self.read(tkey)
            if tomb is not None:
                m.max_version = unpack_u64(tomb)
                self.delete(tkey)
            self.deleted = False
        self.meta = m
        return m

    def stream(self, name: str) -> types_pb2.StreamInfo | None:
        meta = self.live_meta()
        if meta is not None:
            for s in meta.streams:
                if s.name == name:
                    return s
        return None

    # ---- records ----

    def data_key(self, keyb: bytes) -> bytes:
        return self.dprefix + enc.component(keyb)

    def record(self, dkey: bytes) -> StoredRecord | None:
        """The live record at dkey (None when absent, expired, or its session is)."""
        if self.expired is not None and self.meta is None:
            return None
        raw = self.read(dkey)
        if raw is None:
            return None
        rec = unpack_record(raw)
        return rec if rec.live(self.now) else None

    def raw_record(self, dkey: bytes) -> StoredRecord | None:
        """The stored record at dkey even when its own TTL passed (for size bookkeeping)."""
        if self.expired is not None and self.meta is None:
            return None
        raw = self.read(dkey)
        return unpack_record(raw) if raw is not None else None

    # ---- session-wide ----

    def cascade(self, event_type: types_pb2.EventType.ValueType) -> tuple[int, int]:
        """Delete every key and log entry of the session, its meta and index entries; keep a
        tombstone with max_version so a recreated session continues above it."""
        ref, rev = self.ref, self.revision()
        meta = self.meta or self.base or self.expired
        keys = entries = 0
        plen = len(self.dprefix)
        for k, raw in self.db.iterator(prefix=self.dprefix):
            self.pending[k] = None
            keys += 1
            exp = record_expires_at(raw)
            if exp:
                self.pending[enc.key_expiry_key(exp, ref.nsb, ref.sidb, enc.last_component(k, plen))] = None
        for k in self.db.iterator(prefix=enc.log_prefix(ref.nsb, ref.sidb), include_value=False):
            self.pending[k] = None
            entries += 1
        self.pending[ref.mkey] = None
        if meta is not None and meta.expires_at_ms:
            self.pending[enc.session_expiry_key(meta.expires_at_ms, ref.nsb, ref.sidb)] = None
        self.pending[enc.tombstone_key(ref.nsb, ref.sidb)] = pack_u64(rev)
        self.events.append(types_pb2.Event(type=event_type, revision=rev))
        self.meta = self.base = self.expired = None
        self.deleted = True
        return keys, entries

    def put_record(self, keyb: bytes, dkey: bytes, create: int, expires: int, value: bytes) -> None:
        """Write the record at dkey with this write's revision, and its PUT event (kept
        unencoded: the change-log entry stores the value once, see entries.py)."""
        rev, now = self.revision(), self.now
        packed = pack_record(rev, create, expires, now, value)
        self.pending[dkey] = packed
        self.events.append(entries.PutEvent(keyb, dkey, packed, rev, create, expires, now, value))

    def event(self, **kw: Any) -> types_pb2.Event:
        ev = types_pb2.Event(revision=self.revision(), **kw)
        self.events.append(ev)
        return ev

    # ---- the batch ----

    def finish(self, extra: list[Op] | None = None) -> Pending | None:
        """The WriteBatch of this write (None when it changed nothing)."""
        if not self.writes:
            return None
        ref, rev, now = self.ref, self.revision(), self.now
        metas: dict[bytes, Any] = {}
        meta = self.meta
        usage = None
        if self.store.usage is not None:  # namespace limits are configured (server/quota.py)
            after = meta if meta is not None else (None if self.deleted else self.loaded)
            usage = delta(ref.ns, self.loaded, after) if after is not self.loaded else None
        if meta is not None:
            old_exp = self.base.expires_at_ms if self.base is not None else 0
            if self.session_ttl_ms:
                meta.expires_at_ms = now + self.session_ttl_ms
            meta.updated_at_ms = now
            meta.max_version = rev
            if meta.expires_at_ms != old_exp:
                if old_exp:
                    self.pending[enc.session_expiry_key(old_exp, ref.nsb, ref.sidb)] = None
                if meta.expires_at_ms:
                    self.pending[enc.session_expiry_key(meta.expires_at_ms, ref.nsb, ref.sidb)] = b""
            self.pending[ref.mkey] = meta.SerializeToString()
            metas[ref.mkey] = meta
        elif self.deleted:
            metas[ref.mkey] = None
        ops: list[Op] = list(self.pending.items())
        records = {k: v for k, v in ops if k[:1] == enc.DATA}
        if extra:
            ops.extend(extra)
        entry = entries.encode(rev, ref.nsb, ref.sidb, now, ops, self.events, self.pending)
        ops.append((enc.change_key(rev), entry))
        ops.append((REVISION_KEY, pack_u64(rev)))
        return Pending(rev, ops, metas, records=records, usage=usage)


def node_write(store: Store, ops: list[Op], now: int) -> Pending:
    """A maintenance write not tied to one session (idempotency GC): its own revision and a
    change-log entry with empty namespace/session_id carrying only raw ops, so followers
    apply it too."""
    rev = store.clock.next()
    entry = entries.encode(rev, b"", b"", now, ops, [])
    out = [*ops, (enc.change_key(rev), entry), (REVISION_KEY, pack_u64(rev))]
    return Pending(rev, out, records={k: v for k, v in ops if k[:1] == enc.DATA})
