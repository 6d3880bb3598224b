"""Session and key TTL reclaim: what the expiry indexes say is due, and the reclaim writes.

Reads hide expired data by themselves (meta/record expires_at); the sweeper only gives the
space back. `x|expires_at|ns|session` indexes session expiry, `y|expires_at|ns|session|key`
key expiry. Each reclaim is a write of its own (revision, change-log entry, events).
"""

from __future__ import annotations

from shardstate.v1 import types_pb2

from . import encoding as enc
from .context import WriteContext
from .keys import delete_record
from .store import Store

SessionDue = tuple[int, bytes, bytes]  # expires_at, ns, session


def due_sessions(store: Store, now: int, limit: int) -> list[SessionDue]:
    out: list[SessionDue] = []
    stop = enc.expiry_bound(enc.SESSION_EXPIRY, now)
    for k in store.db.iterator(start=enc.SESSION_EXPIRY, stop=stop, include_value=False):
        exp, ns, sid = enc.decode(k, "qbb")
        out.append((exp, ns, sid))  # type: ignore[arg-type]
        if len(out) >= limit:
            break
    return out


def due_keys(store: Store, now: int, limit: int) -> dict[tuple[bytes, bytes], list[tuple[int, bytes]]]:
    """Due keys grouped by session: (ns, session) -> [(expires_at, key)]."""
    out: dict[tuple[bytes, bytes], list[tuple[int, bytes]]] = {}
    stop = enc.expiry_bound(enc.KEY_EXPIRY, now)
    for n, k in enumerate(store.db.iterator(start=enc.KEY_EXPIRY, stop=stop, include_value=False), 1):
        exp, ns, sid, key = enc.decode(k, "qbbb")
        out.setdefault((ns, sid), []).append((exp, key))  # type: ignore[index, arg-type]
        if n >= limit:
            break
    return out


def reclaim_session(ctx: WriteContext, expires_at: int) -> bool:
    """Cascade-delete the session if it is still expired at `expires_at`; False when the index
    entry was stale (the caller drops it)."""
    if ctx.expired is None or ctx.expired.expires_at_ms != expires_at:
        return False
    ctx.cascade(types_pb2.SESSION_EXPIRE)
    return True


def reclaim_keys(ctx: WriteContext, due: list[tuple[int, bytes]]) -> tuple[int, list[bytes]]:
    """Delete the due keys that are still expired; returns (keys deleted, stale index keys
    for the caller to drop)."""
    stale: list[bytes] = []
    ref = ctx.ref
    if ctx.live_meta() is None:
        if ctx.expired is None:  # no session at all: every entry is stale
            stale = [enc.key_expiry_key(exp, ref.nsb, ref.sidb, k) for exp, k in due]
        return 0, stale  # an expired session is reclaimed whole, keys included
    n = 0
    for exp, keyb in due:
        dkey = ctx.data_key(keyb)
        rec = ctx.raw_record(dkey)
        if rec is None or rec.expires_at != exp or rec.live(ctx.now):
            stale.append(enc.key_expiry_key(exp, ref.nsb, ref.sidb, keyb))
            continue
        delete_record(ctx, keyb, dkey, rec)
        ctx.event(type=types_pb2.KEY_EXPIRE, record=types_pb2.Record(key=keyb.decode(), version=ctx.revision()))
        n += 1
    return n, stale
