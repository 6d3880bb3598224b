"""The router's cluster map: bootstrap from seeds or a cluster file, adoption by epoch, refresh.

The router holds nothing else. The highest epoch seen on any node wins; nodes found holding an
older map are sent the current one, so every shard converges on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

import grpc

from shardstate.common import mapswap
from shardstate.common.clustermap import ClusterView, empty_view, load_cluster_file, node_addresses
from shardstate.common.errors import InvalidArgumentError
from shardstate.common.jsonlog import fields
from shardstate.router import seeds
from shardstate.router.nodes import NodePool, describe
from shardstate.v1 import admin_pb2

log = logging.getLogger("shardstate.router.maps")

FETCH_TIMEOUT_S = 2.0
# A redirect never triggers more than one map fetch per this interval unless it names a newer
# epoch than the router holds: keeps a misbehaving shard from causing a refresh storm.
MIN_REFRESH_GAP_S = 0.05


# ---- pure logic ----


def highest(maps: Iterable[admin_pb2.ClusterMap | None]) -> admin_pb2.ClusterMap | None:
    """The map with the highest epoch (the first of equals), None if there is none."""
    best: admin_pb2.ClusterMap | None = None
    for m in maps:
        if m is not None and (best is None or m.epoch > best.epoch):
            best = m
    return best


def bootstrap_map(statuses: Sequence[tuple[str, admin_pb2.StatusResponse]], cluster_id: str = "") -> admin_pb2.ClusterMap:
    """Epoch 1 of a new cluster from the seeds' own Status: one ACTIVE shard per shard id,
    weight 1; the node reporting itself PRIMARY (else the first seen) is the primary, the
    others replicas. Routers among the seeds contribute nothing."""
    primaries: dict[str, str] = {}
    replicas: dict[str, list[str]] = {}
    for address, st in statuses:
        node = _own_node(address, st)
        if node is None or node.role == admin_pb2.ROUTER:
            continue
        sid = node.shard_id or st.header.shard_id
        if not sid:
            continue
        address = node.address or address  # as the node knows itself (a seed may be its IP)
        if node.role == admin_pb2.REPLICA or sid in primaries:
            replicas.setdefault(sid, []).append(address)
        else:
            primaries[sid] = address
    pb = admin_pb2.ClusterMap(epoch=1, cluster_id=cluster_id or uuid.uuid4().hex)
    for sid in sorted(set(primaries) | set(replicas)):
        reps = replicas.get(sid, [])
        primary = primaries.get(sid) or reps.pop(0)
        pb.shards.add(id=sid, weight=1, primary=primary, replicas=reps, state=admin_pb2.ACTIVE)
    return pb


def _own_node(address: str, st: admin_pb2.StatusResponse) -> admin_pb2.NodeStatus | None:
    for n in st.nodes:
        if n.address == address:
            return n
    if st.nodes:
        return st.nodes[0]
    if st.header.shard_id:
        return admin_pb2.NodeStatus(address=address, shard_id=st.header.shard_id, role=admin_pb2.PRIMARY)
    return None


def validate_map(pb: admin_pb2.ClusterMap) -> None:
    """A map offered to the router must be usable: epoch > 0, unique ids, an address each."""
    if pb.epoch == 0:
        raise InvalidArgumentError("cluster map epoch must be > 0")
    seen: set[str] = set()
    for s in pb.shards:
        if not s.id:
            raise InvalidArgumentError("every shard in the cluster map needs an id")
        if s.id in seen:
            raise InvalidArgumentError(f"shard id {s.id!r} appears twice in the cluster map")
        seen.add(s.id)
        if not s.primary:
            raise InvalidArgumentError(f"shard {s.id!r} has no primary address")
    if not any(s.state != admin_pb2.JOINING for s in pb.shards):
        raise InvalidArgumentError("cluster map has no shard that owns sessions")


# ---- the holder ----


class MapHolder:
    """The current ClusterView, replaced whole when a higher epoch is seen."""

    def __init__(self, nodes: NodePool, seeds: Sequence[str], cluster_file: str = "",
                 refresh_interval_s: float = 5.0) -> None:
        self.nodes = nodes
        self.seeds = [s for s in seeds if s]
        self.cluster_file = cluster_file
        self.refresh_interval_s = refresh_interval_s
        self.view: ClusterView = empty_view()
        self._refreshing: asyncio.Future[None] | None = None
        self._last_refresh = 0.0
        self.refreshes = 0

    # -- adoption --

    def adopt(self, pb: admin_pb2.ClusterMap | None) -> bool:
        if pb is None or pb.epoch <= self.view.epoch or not pb.shards:
            return False
        try:
            view = ClusterView.of(pb)
        except Exception as e:  # a map the ring cannot be built from is ignored, loudly
            log.error("ignoring unusable cluster map", extra=fields(epoch=pb.epoch, error=str(e)))
            return False
        old = self.view.epoch
        self.view = view
        log.info(
            "adopted cluster map",
            extra=fields(epoch=pb.epoch, previous_epoch=old,
                         shards={s.id: s.primary for s in pb.shards}),
        )
        return True

    def addresses(self) -> list[str]:
        out = node_addresses(self.view.pb)
        return out + [s for s in self.seeds if s not in out]

    # -- talking to nodes --

    async def fetch(self, addresses: Sequence[str]) -> dict[str, admin_pb2.ClusterMap | str]:
        """GetClusterMap from each address: the map, or the error text."""

        async def one(addr: str) -> admin_pb2.ClusterMap | str:
            try:
                return await self.nodes.admin(addr).GetClusterMap(
                    admin_pb2.GetClusterMapRequest(), timeout=FETCH_TIMEOUT_S
                )
            except grpc.RpcError as e:
                return describe(e)

        results = await asyncio.gather(*(one(a) for a in addresses))
        return dict(zip(addresses, results, strict=True))

    async def publish(self, pb: admin_pb2.ClusterMap, addresses: Sequence[str]) -> dict[str, admin_pb2.PublishClusterMapResponse | str]:
        async def one(addr: str) -> admin_pb2.PublishClusterMapResponse | str:
            try:
                return await self.nodes.admin(addr).PublishClusterMap(pb, timeout=FETCH_TIMEOUT_S)
            except grpc.RpcError as e:
                log.warning("could not publish cluster map", extra=fields(address=addr, epoch=pb.epoch, error=describe(e)))
                return describe(e)

        results = await asyncio.gather(*(one(a) for a in addresses))
        return dict(zip(addresses, results, strict=True))

    async def push_to(self, address: str) -> None:
        """A node answered with an older map than ours: offer it ours."""
        await self.publish(self.view.pb, [address])

    async def change(self, mutate: Callable[[admin_pb2.ClusterMap], bool | None],
                     also: Sequence[str] = ()) -> admin_pb2.ClusterMap:
        """A conditional map change (docs/design.md §6.2): `mutate` turns the authoritative map,
        at epoch E, into the map at E + 1, swapped in at the keeper shard and then published to
        every node it names (and `also`). `mutate` raises (nothing changes) when it does not
        apply; returning False means there is nothing to do (the current map is returned)."""
        view = await self.refresh()
        new = await mapswap.swap(self.nodes.admin, view.pb, mutate, self.publish, also)
        if new is None:
            return self.view.pb
        self.adopt(new)
        return new

    # -- refresh --

    async def refresh(self, min_epoch: int = 0) -> ClusterView:
        """Fetch maps from every known node and adopt the highest. Concurrent callers share
        one fetch; a call asking for an epoch the router already holds returns at once."""
        if min_epoch and self.view.epoch >= min_epoch:
            return self.view
        fut = self._refreshing
        if fut is None or fut.done():
            if not min_epoch and time.monotonic() - self._last_refresh < MIN_REFRESH_GAP_S:
                return self.view
            fut = self._refreshing = asyncio.ensure_future(self._refresh_once())
        await asyncio.shield(fut)
        return self.view

    async def _refresh_once(self) -> None:
        try:
            got = await self.fetch(self.addresses())
            maps = {a: m for a, m in got.items() if isinstance(m, admin_pb2.ClusterMap)}
            self.adopt(highest(maps.values()))
            self.refreshes += 1
            if self.view.epoch:
                known = set(node_addresses(self.view.pb))
                behind = [a for a, m in maps.items() if a in known and m.epoch < self.view.epoch]
                if behind:
                    log.info("offering the current map to nodes behind it",
                             extra=fields(epoch=self.view.epoch, nodes=behind))
                    await self.publish(self.view.pb, behind)
        finally:
            self._last_refresh = time.monotonic()

    async def run_periodic(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("periodic map refresh failed")

    # -- bootstrap --

    async def bootstrap(self) -> None:
        """Until a map is held: adopt the seeds' highest, publish the cluster file's, or build
        epoch 1 of a new cluster from the seeds when every seed answers with no map."""
        file_pb = load_cluster_file(self.cluster_file) if self.cluster_file else None
        if file_pb is not None:
            validate_map(file_pb)
        delay, last_log = 0.1, 0.0
        while True:
            reason = await self._try_bootstrap(file_pb)
            if reason is None:
                return
            if time.monotonic() - last_log > 5.0:
                log.info("waiting for the cluster map", extra=fields(reason=reason))
                last_log = time.monotonic()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _try_bootstrap(self, file_pb: admin_pb2.ClusterMap | None) -> str | None:
        addrs = await asyncio.to_thread(seeds.expand, self.seeds)  # names → every address
        if file_pb is not None:
            addrs += [a for a in node_addresses(file_pb) if a not in addrs]
        got = await self.fetch(addrs)
        maps = {a: m for a, m in got.items() if isinstance(m, admin_pb2.ClusterMap)}
        best = highest(maps.values())
        if file_pb is not None:
            if best is None or file_pb.epoch > best.epoch:
                await self.publish(file_pb, node_addresses(file_pb))
            self.adopt(highest([best, file_pb]) if best is not None and best.shards else file_pb)
            return None
        if best is not None and best.epoch > 0:
            self.adopt(best)
            return None
        missing = [f"{a} ({got[a]})" for a in addrs if a not in maps]
        if missing:
            # Building a map without every seed would leave a shard out of the ring.
            return "seeds not answering: " + ", ".join(missing)
        statuses: list[tuple[str, admin_pb2.StatusResponse]] = []
        for addr in addrs:
            try:
                st = await self.nodes.admin(addr).Status(admin_pb2.StatusRequest(), timeout=FETCH_TIMEOUT_S)
            except grpc.RpcError as e:
                return f"Status of seed {addr} failed: {describe(e)}"
            statuses.append((addr, st))
        pb = bootstrap_map(statuses)
        if not pb.shards:
            return "no seed reported a shard id"
        log.info("bootstrapping a new cluster", extra=fields(shards={s.id: s.primary for s in pb.shards}))
        await self.publish(pb, node_addresses(pb))
        # Another router may have bootstrapped at the same moment: the shards' map wins.
        again = await self.fetch(node_addresses(pb))
        self.adopt(highest([m for m in again.values() if isinstance(m, admin_pb2.ClusterMap)] + [pb]))
        return None
