"""The idempotency window: the reply of a mutation with a request_id is stored under
(ns, session, request_id) in the write's own batch, and a retry within the window gets it back
with header.replayed=true instead of applying twice.

`j|expires_at|ns|session|request_id` indexes the records by expiry for garbage collection.

A record keeps the crc32 of the serialized request beside the reply: a request_id used again
within the window for a different request (another kind of op, or the same kind with other
arguments) is refused with INVALID_ARGUMENT instead of answered with the first request's reply,
as DynamoDB's ClientRequestToken (IdempotentParameterMismatch) and Stripe's idempotency keys
do. A retry sends the same message, which serializes to the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from zlib import crc32

from shardstate.common.errors import InvalidArgumentError
from shardstate.v1 import state_pb2

from . import encoding as enc
from .commit import Op
from .ranges import iterate
from .store import Store
from .validation import SessionRef
from .values import pack_idempotency, unpack_idempotency

# Reply type -> kind byte stored with it; a request_id reused for another kind is refused.
KINDS: dict[type[Any], int] = {
    state_pb2.PutResponse: 1,
    state_pb2.DeleteResponse: 2,
    state_pb2.TxnResponse: 3,
    state_pb2.IncrementResponse: 4,
    state_pb2.AppendResponse: 5,
    state_pb2.TrimLogResponse: 6,
    state_pb2.PopLastResponse: 7,
    state_pb2.TouchResponse: 8,
    state_pb2.DeleteSessionResponse: 9,
}
MAX_REQUEST_ID_BYTES = 256


def request_id_bytes(request_id: str) -> bytes:
    b = request_id.encode()
    if len(b) > MAX_REQUEST_ID_BYTES:
        raise InvalidArgumentError(f"request_id is {len(b)} bytes, over the maximum {MAX_REQUEST_ID_BYTES}")
    return b


def key(ref: SessionRef, ridb: bytes) -> bytes:
    return enc.idempotency_key_in(ref.part, ridb)


def fingerprint(req: Any) -> int:
    """The crc32 of the request as serialized: equal for a retry of the same message."""
    return crc32(req.SerializeToString())


def lookup(store: Store, ikey: bytes, ridb: bytes, reply: type[Any], now: int,
           request_crc: int | None = None) -> Any | None:
    """The stored reply for this request_id (ikey = key(ref, ridb)), replayed=true, or None.
    INVALID_ARGUMENT when the id's live record was made by a different request."""
    raw = store.db.get(ikey)
    if raw is None:
        return None
    expires, kind, stored_crc, body = unpack_idempotency(raw)
    if expires <= now:
        return None
    if kind != KINDS[reply]:
        raise InvalidArgumentError(
            f"request_id {ridb.decode(errors='replace')!r} was already used for a different operation"
        )
    if stored_crc is not None and request_crc is not None and stored_crc != request_crc:
        raise InvalidArgumentError(
            f"request_id {ridb.decode(errors='replace')!r} was already used for a different request "
            f"(the same kind of op with other arguments) within the idempotency window; "
            f"a retry must send the same request, a new request needs a new request_id"
        )
    resp = reply.FromString(body)
    resp.header.replayed = True
    return resp


def record(ref: SessionRef, ridb: bytes, ikey: bytes, resp: Any, now: int, window_ms: int,
           request_crc: int | None = None) -> list[Op]:
    expires = now + window_ms
    return [
        (ikey, pack_idempotency(expires, KINDS[type(resp)], resp.SerializeToString(), request_crc)),
        (enc.idempotency_expiry_key_in(expires, ref.part, ridb), b""),
    ]


def latest_expiry(store: Store) -> int:
    """The highest expiry of any stored record (0: none): every record has its `j|` entry
    until the collector removes both, so the last `j|` key bounds them all."""
    for k in iterate(store.db, prefix=enc.IDEMPOTENCY_EXPIRY, reverse=True, include_value=False):
        return int(enc.decode(k, "qbbb")[0])
    return 0


class Absent:
    """Which request ids certainly have no live record, so most new ids skip a LevelDB get that
    misses (~5% of a primary's CPU per write).

    A Bloom filter (2 bits per key) of the idempotency keys written through it, in two
    generations of one window each: a key added at t (record expiring at t + window) stays until
    the rotation after next, at or after its expiry, so only expired records are forgotten.
    Records it never saw - those in LevelDB when it was made - expire by `armed_at` (the highest
    stored expiry then); until then it answers nothing. So it can say "absent" only for a key
    with no live record, as long as every record written meanwhile goes through add(): the
    engine drops it whenever anything else writes (a replica applying entries, a snapshot).
    """

    BITS = 1 << 25  # 4 MiB a generation; ~2% false "maybe" at 2.4M keys (4k writes/s, 10 min)
    _MASK = BITS - 1

    def __init__(self, armed_at: int, window_ms: int, now: int) -> None:
        self.armed_at = armed_at
        self.window_ms = max(window_ms, 1)
        self.since = now  # start of the current generation
        self.cur = bytearray(self.BITS >> 3)
        self.prev = bytearray(self.BITS >> 3)

    def valid(self, now: int) -> bool:
        """False once the wall clock stepped back before the current generation: its timing
        no longer bounds the records' expiry (the engine makes a new one)."""
        if now < self.since:
            return False
        if now >= self.since + self.window_ms:
            # Keys added before `now` expire by now + window, before the next rotation.
            self.since = now
            self.prev, self.cur = self.cur, bytearray(self.BITS >> 3)
        return True

    def add(self, ikey: bytes) -> None:
        h = hash(ikey)
        a, b = h & self._MASK, (h >> 32) & self._MASK
        cur = self.cur
        cur[a >> 3] |= 1 << (a & 7)
        cur[b >> 3] |= 1 << (b & 7)

    def absent(self, ikey: bytes, now: int) -> bool:
        if now < self.armed_at:
            return False
        h = hash(ikey)
        a, b = h & self._MASK, (h >> 32) & self._MASK
        ia, ma, ib, mb = a >> 3, 1 << (a & 7), b >> 3, 1 << (b & 7)
        cur, prev = self.cur, self.prev
        return not ((cur[ia] & ma and cur[ib] & mb) or (prev[ia] & ma and prev[ib] & mb))


def expired(store: Store, now: int, limit: int, busy: Callable[[bytes], bool],
            start: bytes | None = None) -> tuple[list[Op], bytes]:
    """Deletes for up to `limit` index entries whose window has passed (and their records),
    reading the index from `start` (None: its beginning); and where the next call may start:
    the first index key this one leaves in place. Sessions with a write in flight
    (`busy(meta_key)`) are left for a later round: their write may renew a record.

    Starting where the last call stopped matters: LevelDB keeps the deletions of earlier rounds
    until compaction drops them, and a scan from the beginning steps over every one of them."""
    ops: list[Op] = []
    db = store.db
    stop = enc.expiry_bound(enc.IDEMPOTENCY_EXPIRY, now)
    resume: bytes | None = None
    for k in db.iterator(start=start or enc.IDEMPOTENCY_EXPIRY, stop=stop, include_value=False):
        if len(ops) >= limit:
            resume = resume or k
            break
        expires, ns, sid, rid = enc.decode(k, "qbbb")
        assert isinstance(ns, bytes) and isinstance(sid, bytes) and isinstance(rid, bytes)
        if busy(enc.meta_key(ns, sid)):
            resume = resume or k
            continue
        ops.append((k, None))
        ikey = enc.idempotency_key(ns, sid, rid)
        raw = db.get(ikey)
        if raw is not None and unpack_idempotency(raw)[0] == expires:
            ops.append((ikey, None))
    return ops, resume or stop
