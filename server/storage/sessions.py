"""Session-wide operations: Touch, DeleteSession (cascade), GetSession, ListSessions.

A deleted or reclaimed session leaves a tombstone (`t|`) holding its max_version, so a
session recreated later (here or, after a move, elsewhere) hands out versions above it.
"""

from __future__ import annotations

from collections.abc import Callable

from shardstate.common.errors import NotFoundError
from shardstate.v1 import state_pb2, types_pb2

from . import encoding as enc
from .context import WriteContext
from .store import Store
from .validation import SessionRef, namespace_bytes, page_limit, ttl


def session_info(meta: types_pb2.SessionInfo, ns: str, sid: str, shard_id: str) -> types_pb2.SessionInfo:
    info = types_pb2.SessionInfo()
    info.CopyFrom(meta)
    info.namespace = ns
    info.session_id = sid
    info.shard_id = shard_id
    return info


def _unknown(ref: SessionRef) -> NotFoundError:
    return NotFoundError(f"session {ref.sid!r} does not exist in namespace {ref.ns!r} (or has expired)")


def op_touch(ctx: WriteContext, req: state_pb2.TouchRequest) -> state_pb2.TouchResponse:
    ttl_ms = ttl(req.ttl_ms, "ttl_ms")
    if ctx.live_meta() is None:
        raise _unknown(ctx.ref)
    meta = ctx.session()
    meta.expires_at_ms = ctx.now + ttl_ms if ttl_ms else 0
    ctx.event(type=types_pb2.TOUCH, expires_at_ms=meta.expires_at_ms)
    return state_pb2.TouchResponse(expires_at_ms=meta.expires_at_ms)


def op_delete_session(ctx: WriteContext, req: state_pb2.DeleteSessionRequest) -> state_pb2.DeleteSessionResponse:
    if ctx.live_meta() is None:
        if ctx.expired is not None:
            ctx.cascade(types_pb2.SESSION_EXPIRE)  # reclaim now; it was already gone
        return state_pb2.DeleteSessionResponse(existed=False)
    keys, entries = ctx.cascade(types_pb2.SESSION_DELETE)
    return state_pb2.DeleteSessionResponse(existed=True, keys_deleted=keys, log_entries_deleted=entries)


def get_session(store: Store, ref: SessionRef, now: int, shard_id: str) -> state_pb2.GetSessionResponse:
    meta = store.live_meta(ref.mkey, now)
    if meta is None:
        raise _unknown(ref)
    return state_pb2.GetSessionResponse(session=session_info(meta, ref.ns, ref.sid, shard_id))


def list_sessions(
    store: Store, req: state_pb2.ListSessionsRequest, now: int, shard_id: str,
    owned: Callable[[str, str], bool] | None = None,
) -> state_pb2.ListSessionsResponse:
    """This shard's live sessions of a namespace, sorted by id, paged by the last id returned;
    `owned(ns, sid)` filters out sessions the cluster map gives to another shard."""
    ns, nsb = namespace_bytes(req.namespace)
    limit = page_limit(req.limit, store.limits)
    base = enc.encode(enc.META, nsb)
    p = enc.prefix(enc.META, nsb, partial=req.prefix.encode())
    stop = enc.prefix_end(p)
    start = p
    include_start = True
    if req.page_token:
        after = base + enc.component(req.page_token.encode())
        if after > start:
            start, include_start = after, False
    resp = state_pb2.ListSessionsResponse()
    plen = len(base)
    last = ""
    for k, raw in store.db.iterator(start=start, stop=stop, include_start=include_start):
        meta = types_pb2.SessionInfo.FromString(raw)
        if meta.expires_at_ms and meta.expires_at_ms <= now:
            continue
        sid = enc.last_component(k, plen).decode()
        if owned is not None and not owned(ns, sid):
            continue
        if len(resp.sessions) >= limit:
            resp.next_page_token = last
            break
        resp.sessions.append(session_info(meta, ns, sid, shard_id))
        last = sid
    return resp
