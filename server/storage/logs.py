"""Session logs: named append-only streams with seqs that never repeat within a stream.

Stream bookkeeping (first/last/next seq, count) lives in the session meta; entries live at
`l|ns|session|stream|seq`. Seqs start at 1; PopLast does not give a seq back.
"""

from __future__ import annotations

import itertools

from shardstate.common.config import Limits
from shardstate.common.errors import InvalidArgumentError, LimitExceededError, NotFoundError
from shardstate.v1 import state_pb2, types_pb2

from . import encoding as enc
from .context import WriteContext
from .ranges import iterate
from .store import Store
from .validation import (
    ITEM_FRAMING,
    SessionRef,
    check_ops,
    check_value,
    page_budget,
    stream_bytes,
    ttl,
)
from .values import entry_data_len, pack_entry, unpack_entry

DEFAULT_READ = 1000


def find_stream(meta: types_pb2.SessionInfo | None, name: str) -> types_pb2.StreamInfo | None:
    if meta is not None:
        for s in meta.streams:
            if s.name == name:
                return s
    return None


def _missing(name: str, ref: SessionRef) -> NotFoundError:
    return NotFoundError(f"stream {name!r} does not exist in session {ref.sid!r}")


def _seq(key: bytes) -> int:
    return int.from_bytes(key[-8:], "big")


def check_append(req: state_pb2.AppendRequest, limits: Limits) -> tuple[bytes, int]:
    """Append's input checks; returns the stream name's bytes and the entries' total size."""
    streamb = stream_bytes(req.stream, limits)
    n = len(req.entries)
    if n == 0:
        raise InvalidArgumentError("entries is empty: Append needs at least one entry")
    check_ops(n, limits, "entries in one Append")
    total = 0
    for data in req.entries:
        check_value(data, limits, "log entry")
        total += len(data)
    return streamb, total


def op_append(ctx: WriteContext, req: state_pb2.AppendRequest) -> state_pb2.AppendResponse:
    streamb, total = check_append(req, ctx.limits)
    n = len(req.entries)
    if req.session_ttl_ms:
        ctx.session_ttl_ms = ttl(req.session_ttl_ms, "session_ttl_ms")
    meta = ctx.session()
    if meta.bytes + total > ctx.limits.max_session_bytes:
        raise LimitExceededError.of(
            "max_session_bytes", ctx.limits.max_session_bytes, meta.bytes + total, "session bytes"
        )
    s = find_stream(meta, req.stream) or meta.streams.add(name=req.stream, next_seq=1)
    rev, now = ctx.revision(), ctx.now
    prefix = enc.log_prefix(ctx.ref.nsb, ctx.ref.sidb, streamb)
    first = s.next_seq
    event = ctx.event(type=types_pb2.APPEND, stream=req.stream)
    for seq, data in enumerate(req.entries, first):
        ctx.put(prefix + enc.u64(seq), pack_entry(now, rev, data))
        event.entries.add(seq=seq, data=data, appended_at_ms=now, revision=rev)
    s.next_seq = first + n
    s.last_seq = first + n - 1
    if not s.count:
        s.first_seq = first
    s.count += n
    meta.bytes += total
    return state_pb2.AppendResponse(seqs=range(first, first + n), revision=rev)


def read_log(store: Store, ref: SessionRef, req: state_pb2.ReadLogRequest, now: int) -> state_pb2.ReadLogResponse:
    limits = store.limits
    streamb = stream_bytes(req.stream, limits)
    s = find_stream(store.live_meta(ref.mkey, now), req.stream)
    if s is None:
        raise _missing(req.stream, ref)
    resp = state_pb2.ReadLogResponse(stream=s)
    limit = min(req.limit or DEFAULT_READ, limits.max_page)
    lo = req.after_seq + 1 if req.after_seq else max(req.from_seq, s.first_seq)
    hi = min(req.to_seq, s.last_seq) if req.to_seq else s.last_seq
    if not s.count or lo > hi:
        return resp
    prefix = enc.log_prefix(ref.nsb, ref.sidb, streamb)
    start, stop = prefix + enc.u64(lo), prefix + enc.u64(hi + 1)
    budget = page_budget(limits)
    out = resp.entries
    if req.last:
        newest = []
        for k, raw in iterate(store.db, start=start, stop=stop, reverse=True):
            newest.append((k, raw))
            if len(newest) >= req.last:
                break
        newest.reverse()
        candidates = iter(newest)
    else:
        candidates = store.db.iterator(start=start, stop=stop)
    for k, raw in candidates:
        if len(out) >= limit:
            resp.more = True
            break
        entry = unpack_entry(_seq(k), raw)
        size = entry.ByteSize() + ITEM_FRAMING
        if out and budget < size:
            resp.more = True
            break
        budget -= size
        out.append(entry)
    return resp


def op_trim(ctx: WriteContext, req: state_pb2.TrimLogRequest) -> state_pb2.TrimLogResponse:
    streamb = stream_bytes(req.stream, ctx.limits)
    cur = ctx.stream(req.stream)
    if cur is None:
        raise _missing(req.stream, ctx.ref)
    if not req.before_seq and not req.keep_last:
        raise InvalidArgumentError("TrimLog needs before_seq or keep_last")
    drop_n = cur.count - req.keep_last if req.keep_last and cur.count > req.keep_last else 0
    removed = freed = next_first = 0
    victims = []
    for k, raw in ctx.db.iterator(prefix=enc.log_prefix(ctx.ref.nsb, ctx.ref.sidb, streamb)):
        seq = _seq(k)
        if seq < req.before_seq or removed < drop_n:
            victims.append(k)
            removed += 1
            freed += entry_data_len(raw)
        else:
            next_first = seq
            break
    if not removed:
        return state_pb2.TrimLogResponse(removed=0, stream=cur)
    meta = ctx.session()
    s = find_stream(meta, req.stream)
    assert s is not None
    for k in victims:
        ctx.delete(k)
    s.count -= removed
    s.first_seq = next_first
    if not s.count:
        s.last_seq = 0
    meta.bytes -= freed
    ctx.event(type=types_pb2.TRIM, stream=req.stream, seq=next_first)
    return state_pb2.TrimLogResponse(removed=removed, stream=s)


def op_pop(ctx: WriteContext, req: state_pb2.PopLastRequest) -> state_pb2.PopLastResponse:
    streamb = stream_bytes(req.stream, ctx.limits)
    cur = ctx.stream(req.stream)
    if cur is None:
        raise _missing(req.stream, ctx.ref)
    if not cur.count:
        return state_pb2.PopLastResponse(found=False)
    prefix = enc.log_prefix(ctx.ref.nsb, ctx.ref.sidb, streamb)
    newest = list(itertools.islice(iterate(ctx.db, prefix=prefix, reverse=True), 2))
    last_key, last_raw = newest[0]
    prev = newest[1] if len(newest) > 1 else None
    entry = unpack_entry(_seq(last_key), last_raw)
    meta = ctx.session()
    s = find_stream(meta, req.stream)
    assert s is not None
    ctx.delete(last_key)
    s.count -= 1
    s.last_seq = _seq(prev[0]) if prev is not None else 0
    if not s.count:
        s.first_seq = 0
    meta.bytes -= len(entry.data)
    ctx.event(type=types_pb2.POP, stream=req.stream, entries=[entry])
    return state_pb2.PopLastResponse(found=True, entry=entry)
