"""What this shard process is in the cluster: its id, address, role, and the cluster map it
holds (persisted in `_|clustermap`, replaced only by a higher epoch); ownership checks.

`role` / `primary` are the hook for replication: a replica refuses writes and STRONG reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from shardstate.common.clustermap import ClusterView, empty_view
from shardstate.common.errors import NotPrimaryError, WrongShardError
from shardstate.common.metrics import Registry
from shardstate.common.ring import Ring
from shardstate.v1 import admin_pb2

from .storage.engine import Engine

log = logging.getLogger("shardstate.node")
MAP_KEY = "clustermap"


class Node:
    _view: ClusterView
    _ring: Ring | None
    epoch: int  # of the view

    def __init__(self, shard_id: str, engine: Engine, address: str = "") -> None:
        self.shard_id = shard_id
        self.engine = engine
        self.address = address
        self.role: admin_pb2.NodeRole.ValueType = admin_pb2.PRIMARY
        self.primary = ""  # the primary's address, when this node is a replica
        self.view = empty_view()
        self.started = time.monotonic()
        self.serving = False
        self.readable = True  # replication: False while a replica's data is not yet the primary's
        self.metrics = Registry()  # the process's one registry (docs/design.md §9)
        self.on_adopt: list[Callable[[admin_pb2.ClusterMap], None]] = []  # called after each adoption
        raw = engine.node_meta(MAP_KEY)
        if raw:
            self.view = ClusterView.of(admin_pb2.ClusterMap.FromString(raw))

    @property
    def view(self) -> ClusterView:
        return self._view

    @view.setter
    def view(self, view: ClusterView) -> None:
        # Every request checks ownership and names the epoch in its header: keep the parts
        # it needs as plain attributes (ClusterView.epoch reads the protobuf each time).
        self._view = view
        self.epoch = view.epoch
        self._ring = view.ring if view.epoch and view.ring else None  # None: owns everything

    @property
    def is_replica(self) -> bool:
        return self.role == admin_pb2.REPLICA

    def adopt(self, pb: admin_pb2.ClusterMap) -> bool:
        """Take `pb` if its epoch is higher than the map held; persisted before it is used."""
        if pb.epoch <= self.view.epoch:
            return False
        view = ClusterView.of(pb)
        self.engine.set_node_meta(MAP_KEY, pb.SerializeToString())
        self.view = view
        log.info("cluster map adopted", extra={"fields": {"epoch": pb.epoch, "shards": [s.id for s in pb.shards]}})
        for hook in self.on_adopt:
            hook(pb)
        return True

    def check_owner(self, namespace: str, session_id: str) -> None:
        """WrongShardError unless this shard owns the session (with no map it owns all)."""
        ring = self._ring
        if ring is None or ring.owner(namespace, session_id) == self.shard_id:
            return
        view = self._view
        owner = view.owner(namespace, session_id)
        if owner.id != self.shard_id:
            raise WrongShardError.of(view.epoch, owner.id, owner.primary)

    def owns(self, namespace: str, session_id: str) -> bool:
        view = self.view
        return not view.epoch or not view.ring or view.ring.owner(namespace, session_id) == self.shard_id

    def check_writable(self) -> None:
        if self.role == admin_pb2.REPLICA:
            raise NotPrimaryError.of(self.primary, self.shard_id)
