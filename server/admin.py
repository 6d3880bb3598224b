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
from shardstate.v1 import admin_pb2

from .node import Node
from .service import StateService

ROUTER_ONLY = ("AddShard", "RemoveShard", "SetWeight", "Rebalance", "PromoteReplica", "Backup", "Restore", "RemoveNode")
STREAMING = ("Rebalance", "Backup", "Restore", "RemoveNode")


class AdminService:
    def __init__(self, node: Node, state: StateService) -> None:
        self.node = node
        self.state = state
        self.load = RateMeter(state.replies)  # replies per second since the previous Status

    async def get_cluster_map(self, req: admin_pb2.GetClusterMapRequest, context: Any) -> admin_pb2.ClusterMap:
        return self.node.view.pb

    async def publish_cluster_map(self, req: admin_pb2.ClusterMap, context: Any) -> admin_pb2.PublishClusterMapResponse:
        try:
            adopted = self.node.adopt(req)
        except Exception as e:
            await errors.abort(context, e)
        return admin_pb2.PublishClusterMapResponse(adopted=adopted, epoch=self.node.epoch)

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
        }
        for name in ROUTER_ONLY:
            out[name] = _router_only(name, streaming=name in STREAMING)
        return out


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
