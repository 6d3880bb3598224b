"""Watch through the router: the owning shard's change stream relayed message by message.

When the shard's stream breaks because the session's placement changed (WrongShard, or the
shard's primary moved), the proxy refreshes the map and resumes on the new primary from the
revision after the last one it delivered, so the caller's stream carries on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from shardstate import errors
from shardstate.router.forward import Forwarder, Relay, unavailable
from shardstate.router.wire import session_of, watch_position
from shardstate.v1 import state_pb2


class WatchProxy:
    def __init__(self, fwd: Forwarder) -> None:
        self.fwd = fwd

    async def watch(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        ns, sid = session_of(request)
        delivered = 0  # highest revision the caller has been shown (events or progress)
        redirects = 0
        while True:
            route = self.fwd.route(ns, sid)
            remaining = context.time_remaining() if context is not None else None
            call = self.fwd.nodes.server_stream(route.shard.primary, "Watch")(request, timeout=remaining)
            try:
                async for resp in call:
                    delivered = max(delivered, watch_position(resp))
                    redirects = 0
                    yield bytes(resp)
                return
            except aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    exc = errors.from_rpc_error(e)
                    if not isinstance(exc, errors.WrongShardError | errors.NotPrimaryError):
                        raise Relay(e) from None
                    await self.fwd.after_redirect(route, exc.detail)
                elif e.code() == grpc.StatusCode.UNAVAILABLE:
                    if not await self.fwd.after_unavailable(route):
                        raise unavailable(route.shard, e) from None
                else:
                    raise Relay(e) from None
                redirects += 1
                if redirects > self.fwd.max_hops:
                    raise errors.UnavailableError(
                        f"watch could not be placed after {self.fwd.max_hops} redirects; the cluster map is changing"
                    ) from None
                if delivered:
                    req = state_pb2.WatchRequest.FromString(request)
                    req.from_revision = delivered + 1
                    request = req.SerializeToString()
            finally:
                call.cancel()
