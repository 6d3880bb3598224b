"""ListSessions across every shard: scatter, merge into one sorted page, and the page token.

Page token (opaque to callers; one format at routers and shards, server/storage/validation.py):

    {"v": 1, "after": LAST_ID, "done": [SHARD_ID, ...]}

Every shard not in `done` resumes after LAST_ID (a shard's own cursor is the last session
id it returned, so the router's global cursor is every shard's cursor); shards in `done` have
nothing left past it and are not asked again. A shard that joins the map between pages is not
in `done`, so it is asked too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
from grpc import aio

from shardstate.common import errors
from shardstate.common.auth import READ, Gate
from shardstate.common.pagetoken import Cursor, decode_token, encode_token
from shardstate.router.forward import Forwarder, Relay, unavailable
from shardstate.v1 import admin_pb2, state_pb2, types_pb2

DEFAULT_PAGE = 100
MAX_PAGE = 1000


@dataclass
class ShardPage:
    sessions: Sequence[types_pb2.SessionInfo]
    more: bool  # the shard said there are more after its last one


def merge(
    pages: Mapping[str, ShardPage], cursor: Cursor, limit: int, all_shards: Sequence[str],
    owner: Callable[[str], str] | None = None,
) -> tuple[list[types_pb2.SessionInfo], Cursor | None]:
    """One sorted page of at most `limit` sessions from the shards' pages, and the cursor for
    the next page (None when every shard is exhausted). A session reported by two shards
    (mid-move) is listed once, preferring the shard `owner` names. A shard may answer a page
    shorter than `limit` (its own max_page is smaller) with more after it: the page ends at
    the lowest such shard's last session, past which that shard has not been heard."""
    best: dict[str, tuple[str, types_pb2.SessionInfo]] = {}
    for sid, page in pages.items():
        for s in page.sessions:
            prev = best.get(s.session_id)
            if prev is None or (owner is not None and owner(s.session_id) == sid):
                best[s.session_id] = (sid, s)
    bound = min((max(s.session_id for s in page.sessions) for page in pages.values()
                 if page.more and page.sessions), default=None)
    ordered = sorted(k for k in best if bound is None or k <= bound)[:limit]
    out = [best[k][1] for k in ordered]
    if not out:
        return out, None
    last = ordered[-1]
    done = set(cursor.done)
    for sid, page in pages.items():
        if not page.more and all(s.session_id <= last for s in page.sessions):
            done.add(sid)
    if all(s in done for s in all_shards):
        return out, None
    return out, Cursor(last, done)


class Lister:
    def __init__(self, fwd: Forwarder, node: str = "") -> None:
        self.fwd = fwd
        self.node = node

    async def list(self, request: bytes, context: object, gate: Gate | None = None) -> bytes:
        req = state_pb2.ListSessionsRequest.FromString(request)
        if gate is not None:
            gate.call(req.namespace, READ, "ListSessions")
        cursor = decode_token(req.page_token)
        limit = min(req.limit or DEFAULT_PAGE, MAX_PAGE)
        deadline = self.fwd.deadline(context)
        view = self.fwd.maps.view
        if not view.pb.shards:
            raise errors.UnavailableError("the router has no cluster map yet; try again shortly")
        shards = [s for s in view.pb.shards if s.state != admin_pb2.JOINING]
        ask = [s for s in shards if s.id not in cursor.done]

        async def one(shard: admin_pb2.ShardInfo) -> ShardPage:
            sub = state_pb2.ListSessionsRequest(
                namespace=req.namespace, prefix=req.prefix, limit=req.limit,
                page_token=encode_token(Cursor(cursor.after)) if cursor.after else "",
            )
            try:
                raw = await self.fwd.nodes.unary(shard.primary, "ListSessions")(
                    sub.SerializeToString(), timeout=self.fwd.remaining(deadline)
                )
            except aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    raise unavailable(shard, e) from None
                raise Relay(e) from None
            resp = state_pb2.ListSessionsResponse.FromString(raw)
            return ShardPage(list(resp.sessions), bool(resp.next_page_token))

        results = await asyncio.gather(*(one(s) for s in ask))
        pages = {s.id: p for s, p in zip(ask, results, strict=True)}
        ns = req.namespace or "default"
        out, nxt = merge(pages, cursor, limit, [s.id for s in shards],
                         owner=lambda sid: view.ring.owner(ns, sid))
        resp = state_pb2.ListSessionsResponse(
            header=types_pb2.ResponseHeader(epoch=view.epoch, node=self.node),
            sessions=out,
            next_page_token=encode_token(nxt) if nxt is not None else "",
        )
        return bytes(resp.SerializeToString())
