"""The shard's side of cluster-map traffic for replication: learning a newer map from its
peers (at start-up, so a returning old primary sees it was replaced), and changing the map
(registering a replica, announcing a new address) with an epoch bump published to every node.

Every change is a swap at the keeper shard (shardstate.common.mapswap): a change that lost
its epoch to another (another primary registering its replica, a router promoting) is
computed again from the keeper's map, so neither is lost and every node converges.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence

import grpc
from grpc import aio

from shardstate.common import authwire, mapswap, tls
from shardstate.common.clustermap import node_addresses
from shardstate.common.errors import ShardstateError
from shardstate.v1 import admin_pb2, admin_pb2_grpc

from ..node import Node

log = logging.getLogger("shardstate.replication.maps")

TIMEOUT_S = 2.0


def replace_address(pb: admin_pb2.ClusterMap, shard_id: str, old: str, new: str) -> bool:
    """In shard `shard_id` of `pb`, `old` (its primary, or one of its replicas) becomes `new`;
    False when the shard does not name `old`."""
    for s in pb.shards:
        if s.id != shard_id:
            continue
        if s.primary == old:
            s.primary = new
            reps = [r for r in s.replicas if r != new]
        elif old in s.replicas:
            reps = list(dict.fromkeys(new if r == old else r for r in s.replicas))
        else:
            return False
        del s.replicas[:]
        s.replicas.extend(reps)
        return True
    return False


class MapSync:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._channels: dict[str, aio.Channel] = {}

    def stub(self, address: str) -> admin_pb2_grpc.AdminStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = tls.aio_channel(address)
        return admin_pb2_grpc.AdminStub(authwire.node_channel(ch))

    def peers(self, extra: Iterable[str] = ()) -> list[str]:
        me = self.node.address
        out = [a for a in node_addresses(self.node.view.pb) if a != me]
        return out + [a for a in extra if a and a != me and a not in out]

    async def fetch(self, addresses: list[str]) -> list[admin_pb2.ClusterMap]:
        async def one(a: str) -> admin_pb2.ClusterMap | None:
            try:
                return await self.stub(a).GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=TIMEOUT_S)
            except grpc.RpcError:
                return None

        got = await asyncio.gather(*(one(a) for a in addresses))
        return [m for m in got if m is not None and m.epoch]

    async def refresh(self, extra: Iterable[str] = ()) -> bool:
        """Adopt the highest map any peer holds; True when it was newer than ours."""
        maps = await self.fetch(self.peers(extra))
        best = max(maps, key=lambda m: m.epoch, default=None)
        return best is not None and self.node.adopt(best)

    async def status(self, address: str) -> admin_pb2.NodeStatus | None:
        """The node's own Status line, None when it does not answer."""
        try:
            st = await self.stub(address).Status(admin_pb2.StatusRequest(), timeout=TIMEOUT_S)
        except grpc.RpcError:
            return None
        return st.nodes[0] if st.nodes else None

    async def publish(self, pb: admin_pb2.ClusterMap, addresses: list[str]) -> list[admin_pb2.PublishClusterMapResponse]:
        async def one(a: str) -> admin_pb2.PublishClusterMapResponse | None:
            try:
                return await self.stub(a).PublishClusterMap(pb, timeout=TIMEOUT_S)
            except grpc.RpcError:
                return None

        got = await asyncio.gather(*(one(a) for a in addresses))
        return [r for r in got if r is not None]

    async def change(self, mutate: Callable[[admin_pb2.ClusterMap], bool], why: str) -> admin_pb2.ClusterMap | None:
        """Apply `mutate` to the authoritative map at the next epoch (a swap at the keeper
        shard, docs/design.md §6.2) and publish it everywhere. `mutate` returns False when
        there is nothing (left) to do."""
        await self.refresh()

        async def publish(pb: admin_pb2.ClusterMap, addresses: Sequence[str]) -> None:
            self.node.adopt(pb)
            await self.publish(pb, [a for a in addresses if a != self.node.address])

        try:
            new = await mapswap.swap(self.stub, self.node.view.pb, mutate, publish)
        except ShardstateError as e:
            log.warning("cluster map change failed", extra={"fields": {"why": why, "error": e.message}})
            return None
        if new is not None:
            log.info("cluster map changed", extra={"fields": {"epoch": new.epoch, "why": why}})
        return new

    async def announce(self, previous: str) -> admin_pb2.ClusterMap | None:
        """This node came back under a new address: where the map names it by `previous` (the
        primary or a replica of its shard), put the new address in its place. Conditional like
        every change: built on the newest map, taking effect at the next epoch."""
        node = self.node
        new = node.address
        if not previous or previous == new:
            return None

        def mutate(pb: admin_pb2.ClusterMap) -> bool:
            return replace_address(pb, node.shard_id, previous, new)

        return await self.change(mutate, f"node {previous} of shard {node.shard_id} is back at {new}")

    async def close(self) -> None:
        chans, self._channels = list(self._channels.values()), {}
        for ch in chans:
            await ch.close()
