"""The shard side of the `Admin` service: the cluster map it holds (GetClusterMap,
PublishClusterMap) and its own Status. Cluster-wide RPCs are a router's job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from shardstate.common import errors
from shardstate.common.metrics import RateMeter
from shardstate.common.rebalance import keeper_id
from shardstate.v1 import admin_pb2

from .backup import ShardBackup
from .node import Node
from .service import StateService

ROUTER_ONLY = ("AddShard", "RemoveShard", "SetWeight", "Rebalance", "PromoteReplica", "RemoveNode")
STREAMING = ("Rebalance", "RemoveNode")


class AdminService:
    def __init__(self, node: Node, state: StateService) -> None:
        self.node = node
        self.state = state
        self.load = RateMeter(state.replies)  # replies per second since the previous Status
        self.backups = ShardBackup(node, node.engine)

    async def get_cluster_map(self, req: admin_pb2.GetClusterMapRequest, context: Any) -> admin_pb2.ClusterMap:
        return self.node.view.pb

    async def publish_cluster_map(self, req: admin_pb2.ClusterMap, context: Any) -> admin_pb2.PublishClusterMapResponse:
        try:
            adopted = self.node.adopt(req)
        except Exception as e:
            await errors.abort(context, e)
        return admin_pb2.PublishClusterMapResponse(adopted=adopted, epoch=self.node.epoch)

    async def swap_cluster_map(self, req: admin_pb2.SwapClusterMapRequest, context: Any) -> admin_pb2.SwapClusterMapResponse:
        """The authoritative map's compare-and-swap (docs/design.md §6.2): nothing awaits
        between the compare and the adoption, so two swaps from one epoch cannot both win."""
        node = self.node
        try:
            check_swap(node, req)
        except Exception as e:
            await errors.abort(context, e)
        swapped = node.epoch == req.expected_epoch
        if swapped:
            node.adopt(req.map)
        return admin_pb2.SwapClusterMapResponse(swapped=swapped, current=node.view.pb)

    async def status(self, req: admin_pb2.StatusRequest, context: Any) -> admin_pb2.StatusResponse:
        node, engine = self.node, self.node.engine
        try:
            sessions, keys = await asyncio.to_thread(engine.count_sessions)
            disk = await asyncio.to_thread(engine.disk_bytes)
        except Exception as e:
            await errors.abort(context, e)
        me = admin_pb2.NodeStatus(
            address=node.address, role=node.role, shard_id=node.shard_id, up=True,
            revision=engine.revision(), epoch=node.epoch, sessions=sessions, keys=keys, bytes=disk,
            primary=node.primary, uptime_s=int(time.monotonic() - node.started), serving=node.serving,
            load_ops_per_s=self.load.rate(),
        )
        resp = admin_pb2.StatusResponse(cluster_map=node.view.pb, nodes=[me])
        return self.state.header(resp)  # type: ignore[no-any-return]

    def behaviors(self) -> dict[str, Callable[..., Any]]:
        out: dict[str, Callable[..., Any]] = {
            "GetClusterMap": self.get_cluster_map,
            "PublishClusterMap": self.publish_cluster_map,
            "Status": self.status,
            "SwapClusterMap": self.swap_cluster_map,
            "Backup": self.backups.backup,
            "Restore": self.backups.restore,
        }
        for name in ROUTER_ONLY:
            out[name] = _router_only(name, streaming=name in STREAMING)
        return out


def check_swap(node: Node, req: admin_pb2.SwapClusterMapRequest) -> None:
    new = req.map
    if new.epoch != req.expected_epoch + 1:
        raise errors.InvalidArgumentError(
            f"SwapClusterMap: the new map's epoch must be expected_epoch + 1 = {req.expected_epoch + 1}, got {new.epoch}")
    if not new.shards:
        raise errors.InvalidArgumentError("SwapClusterMap: the new map names no shard")
    ids = [s.id for s in new.shards]
    if len(set(ids)) != len(ids) or not all(ids) or not all(s.primary for s in new.shards):
        raise errors.InvalidArgumentError("SwapClusterMap: every shard needs a unique id and a primary address")
    if node.is_replica:
        raise errors.NotPrimaryError.of(node.primary, node.shard_id)
    held = node.view.pb
    if held.epoch and keeper_id(held) != node.shard_id:
        raise errors.FailedPreconditionError(
            f"this node (shard {node.shard_id}) does not keep the cluster map: shard {keeper_id(held)}'s primary does")


def _router_only(name: str, streaming: bool) -> Callable[..., Any]:
    err = errors.UnimplementedError(
        f"Admin.{name} is served by a router (shardstate router), not by a shard; call a router"
    )
    if streaming:
        async def stream(req: Any, context: Any) -> AsyncIterator[Any]:
            await errors.abort(context, err)
            yield None  # pragma: no cover - abort raises

        return stream

    async def unary(req: Any, context: Any) -> Any:
        await errors.abort(context, err)

    return unary
