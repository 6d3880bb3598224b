"""The Admin service on a router: its cluster map, map publication, cluster-wide Status,
promotion, the removal of dead nodes from the map, rebalancing (router/rebalance.py) and
backups (router/backup.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from shardstate.common import errors
from shardstate.common.clustermap import node_addresses
from shardstate.common.metrics import RateMeter, Registry
from shardstate.router import backup
from shardstate.router.failover import promote
from shardstate.router.maps import MapHolder, validate_map
from shardstate.router.metrics import rebalance_gauges
from shardstate.router.nodes import NodePool, describe
from shardstate.router.rebalance import Rebalancer
from shardstate.v1 import admin_pb2, admin_pb2_grpc, types_pb2

STATUS_TIMEOUT_S = 2.0


async def node_status(nodes: NodePool, address: str, role: int, shard_id: str) -> admin_pb2.NodeStatus:
    """One node's own status line, or a down line carrying the error."""
    try:
        st = await nodes.admin(address).Status(admin_pb2.StatusRequest(), timeout=STATUS_TIMEOUT_S)
    except grpc.RpcError as e:
        return admin_pb2.NodeStatus(address=address, role=role, shard_id=shard_id, up=False, error=describe(e))  # type: ignore[arg-type]
    own = next((n for n in st.nodes if n.address == address), st.nodes[0] if st.nodes else None)
    out = admin_pb2.NodeStatus()
    if own is not None:
        out.CopyFrom(own)
    out.address = address
    out.up = True
    if not out.role:
        out.role = role  # type: ignore[assignment]
    if not out.shard_id:
        out.shard_id = shard_id or st.header.shard_id
    return out


class RouterAdmin(admin_pb2_grpc.AdminServicer):
    def __init__(self, maps: MapHolder, nodes: NodePool, address: str, metrics: Registry,
                 serving: Any = None) -> None:
        self.maps = maps
        self.nodes = nodes
        self.address = address
        self.started = time.monotonic()
        self.load = RateMeter(metrics.get("shardstate_router_calls_total"))  # calls/s since the previous Status
        self.serving = serving or (lambda: True)
        self.rebalancer = Rebalancer(maps, nodes)
        rebalance_gauges(metrics, self.rebalancer)

    async def GetClusterMap(self, request: admin_pb2.GetClusterMapRequest, context: Any) -> admin_pb2.ClusterMap:
        return self.maps.view.pb

    async def PublishClusterMap(self, request: admin_pb2.ClusterMap, context: Any) -> admin_pb2.PublishClusterMapResponse:
        try:
            validate_map(request)
        except errors.ShardstateError as e:
            await errors.abort(context, e)
        old = self.maps.view.pb
        adopted = self.maps.adopt(request)
        if adopted:
            targets = node_addresses(request) + [a for a in node_addresses(old) if a not in node_addresses(request)]
            await self.maps.publish(request, targets)
        return admin_pb2.PublishClusterMapResponse(adopted=adopted, epoch=self.maps.view.epoch)

    async def Status(self, request: admin_pb2.StatusRequest, context: Any) -> admin_pb2.StatusResponse:
        view = self.maps.view
        me = admin_pb2.NodeStatus(
            address=self.address, role=admin_pb2.ROUTER, up=True, epoch=view.epoch,
            uptime_s=int(time.monotonic() - self.started), serving=bool(self.serving()),
            load_ops_per_s=self.load.rate(),
        )
        jobs = []
        for s in view.pb.shards:
            jobs.append(node_status(self.nodes, s.primary, admin_pb2.PRIMARY, s.id))
            jobs += [node_status(self.nodes, r, admin_pb2.REPLICA, s.id) for r in s.replicas]
        others = await asyncio.gather(*jobs)
        moves: list[admin_pb2.RebalanceProgress] = []
        if view.pb.migrations:
            reb = self.rebalancer
            if not reb.driving:
                await reb._poll(view.pb)  # figures for the status line, from the targets
            moves = reb.lines()
        return admin_pb2.StatusResponse(
            header=types_pb2.ResponseHeader(epoch=view.epoch, node=self.address),
            cluster_map=view.pb, nodes=[me, *others], moves=moves,
        )

    async def AddShard(self, request: admin_pb2.AddShardRequest, context: Any) -> Any:
        try:
            return await self.rebalancer.add_shard(request)
        except Exception as e:
            await errors.abort(context, e)

    async def RemoveShard(self, request: admin_pb2.RemoveShardRequest, context: Any) -> Any:
        try:
            return await self.rebalancer.remove_shard(request)
        except Exception as e:
            await errors.abort(context, e)

    async def SetWeight(self, request: admin_pb2.SetWeightRequest, context: Any) -> Any:
        try:
            return await self.rebalancer.set_weight(request)
        except Exception as e:
            await errors.abort(context, e)

    async def Rebalance(self, request: Any, context: Any) -> AsyncIterator[admin_pb2.RebalanceProgress]:  # type: ignore[override]
        try:
            async for p in self.rebalancer.follow():
                yield p
        except Exception as e:
            await errors.abort(context, e)

    async def PromoteReplica(self, request: admin_pb2.PromoteReplicaRequest, context: Any) -> Any:
        try:
            return await promote(self.maps, self.nodes, request)
        except Exception as e:
            await errors.abort(context, e)

    async def RemoveNode(self, request: admin_pb2.RemoveNodeRequest, context: Any) -> Any:
        try:
            return await remove_node(self.maps, self.nodes, request.address)
        except Exception as e:
            await errors.abort(context, e)

    async def SwapClusterMap(self, request: Any, context: Any) -> Any:
        await errors.abort(context, errors.UnimplementedError(
            "Admin.SwapClusterMap is served by the primary of the keeper shard (the lowest shard id), not by a router"))

    def Backup(self, request: admin_pb2.BackupRequest, context: Any) -> Any:
        return backup.backup(self.maps, self.nodes, request, context)

    async def Restore(self, request_iterator: Any, context: Any) -> Any:
        return await backup.restore(self.maps, self.nodes, request_iterator, context)


def drop_node(pb: admin_pb2.ClusterMap, address: str) -> None:
    """`pb` without the replica at `address`; NOT_FOUND / FAILED_PRECONDITION when the map does
    not list it as a replica (a primary is replaced by promotion, not removed)."""
    for s in pb.shards:
        if s.primary == address:
            raise errors.FailedPreconditionError(
                f"{address} is the primary of shard {s.id}; promote a replica first "
                f"(shardstate admin promote {s.id}) or restart it; nothing changed")
        if address in s.replicas:
            reps = [r for r in s.replicas if r != address]
            del s.replicas[:]
            s.replicas.extend(reps)
            return
    named = ", ".join(node_addresses(pb)) or "none"
    raise errors.NotFoundError(f"{address} is not in the cluster map (epoch {pb.epoch}; nodes: {named}); nothing changed")


async def remove_node(maps: MapHolder, nodes: NodePool, address: str) -> admin_pb2.ClusterMap:
    """Admin.RemoveNode: a dead replica leaves the map at the next epoch. A node that answers
    stays (its primary would list it again once it catches up): stop it first."""
    if not address:
        raise errors.InvalidArgumentError("address is required: the host:port the cluster map names")
    view = await maps.refresh()
    drop_node(admin_pb2.ClusterMap(shards=view.pb.shards, epoch=view.pb.epoch), address)  # checks only
    try:
        st = await nodes.admin(address).Status(admin_pb2.StatusRequest(), timeout=STATUS_TIMEOUT_S)
    except grpc.RpcError:
        st = None
    if st is not None:
        shard = st.nodes[0].shard_id if st.nodes else "?"
        raise errors.FailedPreconditionError(
            f"{address} is up (it answers as a node of shard {shard}); stop it before removing it; nothing changed")
    return await maps.change(lambda pb: drop_node(pb, address))
