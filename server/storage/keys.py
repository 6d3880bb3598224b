"""Key operations of a session: get, put (CAS, key TTL), delete (CAS), increment.

The `op_*` functions run inside a WriteContext (alone, or as ops of a Txn) and return the
reply protobuf; `get` is the lock-free read path used outside a write.
"""

from __future__ import annotations

import re

from shardstate.common.errors import InvalidArgumentError, LimitExceededError
from shardstate.v1 import state_pb2, types_pb2

from . import encoding as enc
from .context import WriteContext
from .store import Store
from .validation import (
    ITEM_FRAMING,
    SessionRef,
    check_value,
    key_bytes,
    page_budget,
    page_limit,
    ttl,
)
from .values import StoredRecord, unpack_record

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_DECIMAL = re.compile(rb"-?[0-9]{1,19}")


def get(store: Store, ref: SessionRef, req: state_pb2.GetRequest, now: int) -> state_pb2.GetResponse:
    keyb = key_bytes(req.key, store.limits)
    if store.live_meta(ref.mkey, now) is None:
        return state_pb2.GetResponse(found=False)
    raw = store.load_record(enc.data_key(ref.nsb, ref.sidb, keyb))
    if raw is None:
        return state_pb2.GetResponse(found=False)
    rec = unpack_record(raw)
    if not rec.live(now):
        return state_pb2.GetResponse(found=False)
    return state_pb2.GetResponse(found=True, record=rec.to_pb(req.key))


def op_get(ctx: WriteContext, req: state_pb2.GetRequest) -> state_pb2.GetResponse:
    rec = ctx.record(ctx.data_key(key_bytes(req.key, ctx.limits)))
    if rec is None:
        return state_pb2.GetResponse(found=False)
    return state_pb2.GetResponse(found=True, record=rec.to_pb(req.key))


def write_record(
    ctx: WriteContext, keyb: bytes, dkey: bytes, value: bytes, ttl_ms: int, keep_expiry: bool = False,
) -> int:
    """Store `value` at key as a write of this context's revision (returned); keeps counts,
    sizes and the key-expiry index right. keep_expiry: ttl_ms == 0 keeps the key's expiry."""
    old = ctx.raw_record(dkey)
    live = old if old is not None and old.live(ctx.now) else None
    meta = ctx.session()
    limits = ctx.limits
    if old is None:
        if meta.key_count + 1 > limits.max_keys_per_session:
            raise LimitExceededError.of(
                "max_keys_per_session", limits.max_keys_per_session, meta.key_count + 1, "keys in session"
            )
        grow = len(keyb) + len(value)
    else:
        grow = len(value) - len(old.value)
    if grow > 0 and meta.bytes + grow > limits.max_session_bytes:
        raise LimitExceededError.of(
            "max_session_bytes", limits.max_session_bytes, meta.bytes + grow, "session bytes"
        )
    rev, now = ctx.revision(), ctx.now
    if ttl_ms:
        expires = now + ttl_ms
    elif keep_expiry and live is not None:
        expires = live.expires_at
    else:
        expires = 0
    ref = ctx.ref
    if old is not None and old.expires_at and old.expires_at != expires:
        ctx.delete(enc.key_expiry_key(old.expires_at, ref.nsb, ref.sidb, keyb))
    if expires and (old is None or old.expires_at != expires):
        ctx.put(enc.key_expiry_key(expires, ref.nsb, ref.sidb, keyb), b"")
    ctx.put_record(keyb, dkey, live.create_version if live is not None else rev, expires, value)
    if old is None:
        meta.key_count += 1
    meta.bytes += grow
    return rev


def _mismatch(current: StoredRecord | None, expected: int) -> bool:
    return (current.version if current is not None else 0) != expected


def op_put(ctx: WriteContext, req: state_pb2.PutRequest) -> state_pb2.PutResponse:
    keyb = key_bytes(req.key, ctx.limits)
    check_value(req.value, ctx.limits)
    ttl_ms = ttl(req.ttl_ms, "ttl_ms")
    session_ttl_ms = ttl(req.session_ttl_ms, "session_ttl_ms")  # bad input whether or not the CAS matches
    dkey = ctx.data_key(keyb)
    if req.HasField("expected_version"):
        cur = ctx.record(dkey)
        if _mismatch(cur, req.expected_version):
            resp = state_pb2.PutResponse(applied=False)
            if cur is not None:
                resp.current.CopyFrom(cur.to_pb(req.key))
            return resp
    if session_ttl_ms:
        ctx.session_ttl_ms = session_ttl_ms
    return state_pb2.PutResponse(applied=True, version=write_record(ctx, keyb, dkey, req.value, ttl_ms))


def op_delete(ctx: WriteContext, req: state_pb2.DeleteRequest) -> state_pb2.DeleteResponse:
    keyb = key_bytes(req.key, ctx.limits)
    dkey = ctx.data_key(keyb)
    cur = ctx.record(dkey)
    if req.HasField("expected_version") and _mismatch(cur, req.expected_version):
        resp = state_pb2.DeleteResponse(applied=False, existed=cur is not None)
        if cur is not None:
            resp.current.CopyFrom(cur.to_pb(req.key))
        return resp
    if cur is None:
        return state_pb2.DeleteResponse(applied=True, existed=False)
    delete_record(ctx, keyb, dkey, cur)
    rev = ctx.revision()
    ctx.event(type=types_pb2.DELETE, record=types_pb2.Record(key=req.key, version=rev))
    return state_pb2.DeleteResponse(applied=True, existed=True, revision=rev)


def delete_record(ctx: WriteContext, keyb: bytes, dkey: bytes, cur: StoredRecord) -> None:
    meta = ctx.session()
    ctx.delete(dkey)
    if cur.expires_at:
        ctx.delete(enc.key_expiry_key(cur.expires_at, ctx.ref.nsb, ctx.ref.sidb, keyb))
    meta.key_count -= 1
    meta.bytes -= len(keyb) + len(cur.value)


def op_increment(ctx: WriteContext, req: state_pb2.IncrementRequest) -> state_pb2.IncrementResponse:
    keyb = key_bytes(req.key, ctx.limits)
    ttl_ms = ttl(req.ttl_ms, "ttl_ms")
    dkey = ctx.data_key(keyb)
    cur = ctx.record(dkey)
    value = 0
    if cur is not None:
        if _DECIMAL.fullmatch(cur.value) is None:
            raise InvalidArgumentError(
                f"cannot increment key {req.key!r}: its value is not an ASCII decimal integer"
            )
        value = int(cur.value)
    value += req.delta
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidArgumentError(f"incrementing key {req.key!r} by {req.delta} overflows int64")
    if req.session_ttl_ms:
        ctx.session_ttl_ms = ttl(req.session_ttl_ms, "session_ttl_ms")
    version = write_record(ctx, keyb, dkey, str(value).encode(), ttl_ms, keep_expiry=True)
    return state_pb2.IncrementResponse(value=value, version=version)


def scan(store: Store, ref: SessionRef, req: state_pb2.ScanRequest, now: int) -> state_pb2.ScanResponse:
    """Live keys of the session in key order under `prefix`, after max(start_after, page_token)."""
    limit = page_limit(req.limit, store.limits)
    resp = state_pb2.ScanResponse()
    if store.live_meta(ref.mkey, now) is None:
        return resp
    dprefix = enc.data_prefix(ref.nsb, ref.sidb)
    start = dprefix + enc.escape(req.prefix.encode())
    stop = enc.prefix_end(start)
    include_start = True
    after = max(req.start_after, req.page_token)
    if after:
        a = dprefix + enc.component(after.encode())
        if a > start:
            start, include_start = a, False
    plen = len(dprefix)
    budget = page_budget(store.limits)
    out = resp.records
    last = ""
    for k, raw in store.db.iterator(start=start, stop=stop, include_start=include_start):
        rec = unpack_record(raw)
        if not rec.live(now):
            continue
        if len(out) >= limit:
            resp.next_page_token = last
            break
        key = enc.last_component(k, plen).decode()
        pb = rec.to_pb(key, req.keys_only)
        size = pb.ByteSize() + ITEM_FRAMING
        if out and budget < size:
            resp.next_page_token = last
            break
        budget -= size
        last = key
        out.append(pb)
    return resp
