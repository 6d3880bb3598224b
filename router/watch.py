"""Watch through the router: the owning shard's change stream relayed message by message.

When the shard's stream breaks because the session's placement changed (WrongShard, or the
shard's primary moved) or the shard restarted, the proxy refreshes the map (or waits for the
shard) and resumes from the revision after the last one it delivered, so the caller's stream
carries on without a gap or a repeat.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from shardstate.common import errors
from shardstate.router.forward import Forwarder, Relay, unavailable
from shardstate.router.wire import session_of, watch_position
from shardstate.v1 import state_pb2

# Waits for a watched shard that went away with its address unchanged (a restart), ~15 s in all.
RESTART_BACKOFF_S = (0.1, 0.2, 0.4, 0.8, 1.5, 2.0, 2.0, 2.0, 3.0, 3.0)


class WatchProxy:
    def __init__(self, fwd: Forwarder) -> None:
        self.fwd = fwd
        self.draining = False
        self._calls: set[Any] = set()

    def drain(self) -> None:
        """Shutdown: end every watch with UNAVAILABLE; callers resume through another router."""
        self.draining = True
        for call in list(self._calls):
            call.cancel()

    def _shutting_down(self) -> errors.UnavailableError:
        return errors.UnavailableError("the router is shutting down; resume the watch through another router")

    async def watch(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        ns, sid = session_of(request)
        delivered = 0  # highest revision the caller has been shown (events or progress)
        redirects = outage = 0
        while True:
            if self.draining:
                raise self._shutting_down()
            route = self.fwd.route(ns, sid)
            remaining = context.time_remaining() if context is not None else None
            call = self.fwd.nodes.server_stream(route.shard.primary, "Watch")(request, timeout=remaining)
            self._calls.add(call)
            try:
                async for resp in call:
                    delivered = max(delivered, watch_position(resp))
                    redirects = outage = 0
                    yield bytes(resp)
                return
            except asyncio.CancelledError:
                if self.draining:
                    raise self._shutting_down() from None
                raise
            except aio.AioRpcError as e:
                if self.draining:
                    raise self._shutting_down() from None
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    exc = errors.from_rpc_error(e)
                    if not isinstance(exc, errors.WrongShardError | errors.NotPrimaryError):
                        raise Relay(e) from None
                    await self.fwd.after_redirect(route, exc.detail)
                elif e.code() == grpc.StatusCode.UNAVAILABLE:
                    if not await self.fwd.after_unavailable(route):
                        # Same primary: it may be restarting. Once the stream has a position
                        # it can resume exactly, so wait for the shard a while.
                        if not delivered or outage >= len(RESTART_BACKOFF_S):
                            raise unavailable(route.shard, e) from None
                        await asyncio.sleep(RESTART_BACKOFF_S[outage])
                        outage += 1
                        request = self._resume(request, delivered)
                        continue
                else:
                    raise Relay(e) from None
                redirects += 1
                if redirects > self.fwd.max_hops:
                    raise errors.UnavailableError(
                        f"watch could not be placed after {self.fwd.max_hops} redirects; the cluster map is changing"
                    ) from None
                request = self._resume(request, delivered)
            finally:
                self._calls.discard(call)
                call.cancel()

    @staticmethod
    def _resume(request: bytes, delivered: int) -> bytes:
        if delivered:
            req = state_pb2.WatchRequest.FromString(request)
            req.from_revision = delivered + 1
            return bytes(req.SerializeToString())
        return request

