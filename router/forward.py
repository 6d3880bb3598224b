"""Forwarding one session-scoped call to the owning shard's primary, following redirects.

The request stays encoded bytes; only (namespace, session_id) is read to route it. Calls that
are also BatchOps (Get, Put, Txn ...) are framed as one-op batches on the shard's coalescing
Pipeline link: one stream message carries many callers' ops, far cheaper than a unary call per
op. The cost: the caller's deadline bounds the wait, but is not sent to the shard. On
WrongShard or NotPrimary the map is refreshed and the call re-routed by the new map (never by
the hint in the error), at most `max_hops` times; callers never see a redirect.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from shardstate.common import errors
from shardstate.common.clustermap import ClusterView
from shardstate.common.jsonlog import fields
from shardstate.router.maps import MapHolder
from shardstate.router.nodes import NodePool
from shardstate.router.replicas import ReplicaPicker, relaxed_read
from shardstate.router.shardlink import ShardLinks, SubBatchError
from shardstate.router.wire import BATCH_FIELD, as_batch_op, unpack_result
from shardstate.v1 import admin_pb2, types_pb2

log = logging.getLogger("shardstate.router.forward")


class Relay(Exception):
    """A shard's error status to hand back to the caller unchanged (code, message, details)."""

    def __init__(self, err: aio.AioRpcError) -> None:
        super().__init__(err.details())
        self.err = err


@dataclass
class Route:
    view: ClusterView
    shard: admin_pb2.ShardInfo


class Forwarder:
    """Routes by the current map and turns redirects into map refreshes and retries."""

    def __init__(self, maps: MapHolder, nodes: NodePool, max_hops: int, default_timeout_s: float,
                 links: ShardLinks | None = None) -> None:
        self.maps = maps
        self.nodes = nodes
        # When set, unary calls that are also BatchOps ride the shard's coalesced Pipeline.
        self.links = links
        self.max_hops = max_hops
        self.default_timeout_s = default_timeout_s
        self.replicas = ReplicaPicker()  # EVENTUAL / min_revision reads (router/replicas.py)

    def route(self, namespace: str, session_id: str) -> Route:
        view = self.maps.view
        if not view.pb.shards:
            raise errors.UnavailableError("the router has no cluster map yet; try again shortly")
        return Route(view, view.owner(namespace, session_id))

    def deadline(self, context: Any) -> float:
        """Absolute loop time by which the caller's deadline (or our default) runs out."""
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            remaining = self.default_timeout_s
        return asyncio.get_running_loop().time() + max(0.0, remaining)

    @staticmethod
    def remaining(deadline: float) -> float:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise errors.DeadlineExceededError("deadline exceeded before the shard answered")
        return left

    async def after_redirect(self, route: Route, redirect: Any) -> None:
        """React to a WrongShard/NotPrimary from the shard `route` named."""
        if isinstance(redirect, types_pb2.WrongShard):
            if redirect.epoch and redirect.epoch < route.view.epoch:
                # The shard is behind us: bring it up to date, then the retry lands.
                await self.maps.push_to(route.shard.primary)
                return
            await self.maps.refresh(min_epoch=redirect.epoch + 1 if redirect.epoch > route.view.epoch else 0)
            return
        await self.maps.refresh()

    async def after_unavailable(self, route: Route) -> bool:
        """The shard's primary did not answer: True when a fresher map moved the shard."""
        view = await self.maps.refresh()
        now = view.shard(route.shard.id)
        return view.epoch > route.view.epoch and (now is None or now.primary != route.shard.primary)

    async def unary(self, method: str, request: bytes, namespace: str, session_id: str, context: Any,
                    metadata: tuple[tuple[str, str], ...] | None = None) -> bytes:
        """`metadata` (a traced call's traceparent) is sent with a unary call of its own: a
        coalesced Pipeline message cannot carry one caller's metadata."""
        deadline = self.deadline(context)
        batched = metadata is None and self.links is not None and method in BATCH_FIELD
        relaxed: bool | None = None
        last = ""
        for _ in range(self.max_hops + 1):
            route = self.route(namespace, session_id)
            if route.shard.replicas:
                if relaxed is None:
                    relaxed = relaxed_read(method, request)
                if relaxed:
                    got = await self._from_replica(route, method, request, batched, deadline, metadata)
                    if got is not None:
                        return got
            address = route.shard.primary
            try:
                if batched:
                    return await self._as_batch_op(method, request, address, deadline)
                resp = await self.nodes.unary(address, method)(request, timeout=self.remaining(deadline),
                                                               metadata=metadata)
                return bytes(resp)
            except aio.AioRpcError as e:
                exc: errors.ShardstateError = errors.from_rpc_error(e)
                if not isinstance(exc, errors.WrongShardError | errors.NotPrimaryError | errors.UnavailableError):
                    raise Relay(e) from None
            except errors.ShardstateError as e:
                exc = e
            if isinstance(exc, errors.WrongShardError | errors.NotPrimaryError):
                last = f"shard {route.shard.id} at {address}: {exc.message}"
                log.info("redirect", extra=fields(method=method, shard=route.shard.id,
                                                  epoch=route.view.epoch, detail=str(exc.detail).strip()))
                await self.after_redirect(route, exc.detail)
                continue
            if isinstance(exc, errors.UnavailableError):
                if await self.after_unavailable(route):
                    continue
                raise unavailable(route.shard, exc.message) from None
            raise exc
        raise errors.UnavailableError(
            f"routing did not settle after {self.max_hops} redirects (last: {last}); the cluster map is changing"
        )

    async def _from_replica(self, route: Route, method: str, request: bytes, batched: bool,
                            deadline: float, metadata: tuple[tuple[str, str], ...] | None = None) -> bytes | None:
        """A relaxed read from one of the shard's replicas; None = ask the primary instead
        (no replica up, or it is behind / resyncing / not the owner any more)."""
        address = self.replicas.pick(route.shard)
        if address is None:
            return None
        try:
            if batched:
                return await self._as_batch_op(method, request, address, deadline)
            return bytes(await self.nodes.unary(address, method)(request, timeout=self.remaining(deadline),
                                                                 metadata=metadata))
        except aio.AioRpcError as e:
            exc: errors.ShardstateError = errors.from_rpc_error(e)
        except errors.ShardstateError as e:
            exc = e
        if isinstance(exc, errors.UnavailableError):
            self.replicas.failed(address)
        elif not isinstance(exc, errors.WrongShardError | errors.NotPrimaryError | errors.DeadlineExceededError):
            raise exc
        return None

    async def _as_batch_op(self, method: str, request: bytes, address: str, deadline: float) -> bytes:
        """The call as a one-op batch on the shard's coalescing link; errors come back as the
        exceptions the unary call would have raised."""
        assert self.links is not None
        self.remaining(deadline)
        try:
            _, results = await self.links.batch(address, [as_batch_op(method, request)], deadline)
        except SubBatchError as e:
            if e.error is not None:
                raise e.error from None
            if e.rpc_error is not None:
                raise errors.from_rpc_error(e.rpc_error) from None
            raise errors.from_status(e.code, e.message) from None
        body, code, message, details = unpack_result(results[0], method)
        if code:
            raise errors.from_status(code, message, details)
        return body


def unavailable(shard: admin_pb2.ShardInfo, err: grpc.RpcError | str) -> errors.UnavailableError:
    if isinstance(err, str):
        details = err
    else:
        details = err.details() if hasattr(err, "details") else str(err)
    return errors.UnavailableError(f"shard {shard.id} at {shard.primary} is unavailable: {details}")


async def fail(context: Any, exc: BaseException) -> None:
    """Abort the incoming call with the status `exc` stands for (raises)."""
    if isinstance(exc, Relay):
        md = exc.err.trailing_metadata() or ()
        keep = tuple((k, v) for k, v in md if k == errors.DETAILS_KEY)
        await context.abort(exc.err.code(), exc.err.details() or "", trailing_metadata=keep)
    if isinstance(exc, aio.AioRpcError):
        await fail(context, Relay(exc))
    if not isinstance(exc, errors.ShardstateError):
        log.exception("internal error in the router", exc_info=exc)
    await errors.abort(context, exc)
