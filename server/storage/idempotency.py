"""The idempotency window: the reply of a mutation with a request_id is stored under
(ns, session, request_id) in the write's own batch, and a retry within the window gets it back
with header.replayed=true instead of applying twice.

`j|expires_at|ns|session|request_id` indexes the records by expiry for garbage collection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shardstate.errors import InvalidArgumentError
from shardstate.v1 import state_pb2

from . import encoding as enc
from .commit import Op
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


def lookup(store: Store, ref: SessionRef, ridb: bytes, reply: type[Any], now: int) -> Any | None:
    """The stored reply for this request_id (replayed=true), or None."""
    raw = store.db.get(enc.idempotency_key(ref.nsb, ref.sidb, ridb))
    if raw is None:
        return None
    expires, kind, body = unpack_idempotency(raw)
    if expires <= now:
        return None
    if kind != KINDS[reply]:
        raise InvalidArgumentError(
            f"request_id {ridb.decode(errors='replace')!r} was already used for a different operation"
        )
    resp = reply.FromString(body)
    resp.header.replayed = True
    return resp


def record(ref: SessionRef, ridb: bytes, resp: Any, now: int, window_ms: int) -> list[Op]:
    expires = now + window_ms
    return [
        (enc.idempotency_key(ref.nsb, ref.sidb, ridb), pack_idempotency(expires, KINDS[type(resp)], resp.SerializeToString())),
        (enc.idempotency_expiry_key(expires, ref.nsb, ref.sidb, ridb), b""),
    ]


def expired(store: Store, now: int, limit: int, busy: Callable[[bytes], bool]) -> list[Op]:
    """Deletes for up to `limit` records whose window has passed. Sessions with a write in
    flight (`busy(meta_key)`) are left for the next round: their write may renew a record."""
    ops: list[Op] = []
    db = store.db
    stop = enc.expiry_bound(enc.IDEMPOTENCY_EXPIRY, now)
    for k in db.iterator(start=enc.IDEMPOTENCY_EXPIRY, stop=stop, include_value=False):
        expires, ns, sid, rid = enc.decode(k, "qbbb")
        assert isinstance(ns, bytes) and isinstance(sid, bytes) and isinstance(rid, bytes)
        if busy(enc.meta_key(ns, sid)):
            continue
        ops.append((k, None))
        ikey = enc.idempotency_key(ns, sid, rid)
        raw = db.get(ikey)
        if raw is not None and unpack_idempotency(raw)[0] == expires:
            ops.append((ikey, None))
        if len(ops) >= limit:
            break
    return ops
