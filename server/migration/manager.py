"""`Migrations`: what a shard does for a rebalance, driven by the cluster map it adopts.

- a map whose `migrations` name this shard as a target starts one `Puller` per source;
- a source serves the filtered Follow streams and the `Fence` RPC;
- once a map with no rebalance is adopted, the shard drops the sessions it no longer owns
  after `--moved-data-grace-s`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from shardstate.common import errors, grpcserve
from shardstate.common.rebalance import keeper_address
from shardstate.v1 import admin_pb2, replication_pb2

from ..config import ShardConfig
from ..node import Node
from ..replication import Replication, wire
from ..storage import encoding as enc
from ..storage.engine import Engine
from . import metrics
from .cleanup import drop_unowned
from .fence import Fences
from .keys import session_of
from .source import Source
from .target import META_PREFIX, Puller

log = logging.getLogger("shardstate.migration")


class Migrations:
    def __init__(self, cfg: ShardConfig, node: Node, engine: Engine, repl: Replication) -> None:
        self.cfg = cfg
        self.node = node
        self.engine = engine
        self.repl = repl
        self.source = Source(node, engine, cfg.migration_rate_bytes_s)
        self.fences = Fences(node, engine.revision, lambda: engine.store.clock.last,
                             engine.wait_for_revision, self._busy_sessions, self._keeper_map)
        self.pullers: dict[str, Puller] = {}
        self._reconcile: asyncio.Task[None] | None = None
        self._again = False
        self._cleanup: asyncio.Task[None] | None = None
        self._closing = False
        metrics.register(node.metrics, lambda: [p.status() for p in self.pullers.values()])

    # ---- wiring ----

    def register(self, server: grpc.aio.Server) -> None:
        methods = {
            "Fence": grpcserve.unary(self.fence_rpc, replication_pb2.FenceRequest, replication_pb2.FenceResponse),
            "MigrationStatus": grpcserve.unary(self.status_rpc, replication_pb2.MigrationStatusRequest,
                                               replication_pb2.MigrationStatusResponse),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(wire.SERVICE, methods),))
        self.repl.leader.mover = self.source.stream
        hold = self.engine.retention_hold

        def both() -> int:
            a = hold() if hold is not None else 0
            b = self.source.hold()
            return min(a, b) if a and b else a or b

        self.engine.retention_hold = both
        node = self.node
        self.engine.owns = lambda ns, sid: node.owns(ns.decode(), sid.decode())
        node.on_adopt.append(self._adopted)
        self.fences.restore()  # before the server serves: a fence set before a restart holds again

    async def start(self) -> None:
        self._adopted(self.node.view.pb)

    async def stop(self) -> None:
        self._closing = True
        self.source.end_streams()
        for t in (self._reconcile, self._cleanup):
            if t is not None:
                t.cancel()
        for p in list(self.pullers.values()):
            await p.stop()
        self.pullers.clear()

    # ---- the map drives it ----

    def _adopted(self, pb: admin_pb2.ClusterMap) -> None:
        self.fences.adopted(pb.epoch)
        if self._closing:
            return
        if self._reconcile is not None and not self._reconcile.done():
            self._again = True
            return
        self._reconcile = asyncio.ensure_future(self._run_reconcile())

    async def _run_reconcile(self) -> None:
        while True:
            self._again = False
            try:
                await self.reconcile()
            except Exception:
                log.exception("acting on the cluster map's rebalance failed")
            if not self._again:
                return

    async def reconcile(self) -> None:
        node = self.node
        pb = node.view.pb
        wanted: set[str] = set()
        started = pb.migrations[0].started_epoch if pb.migrations else 0
        if not node.is_replica:
            wanted = {m.source for m in pb.migrations if m.target == node.shard_id}
        for src, p in list(self.pullers.items()):
            if src not in wanted or p.started_epoch != started:
                await p.stop()
                del self.pullers[src]
        for src in sorted(wanted - set(self.pullers)):
            p = self.pullers[src] = Puller(node, self.engine, src, pb, self.repl.acks.satisfied)
            log.info("copying sessions from a source", extra={"fields": {"source": src, "epoch": started}})
            p.start()
        if not pb.migrations:
            await self._forget_progress()
            if node.view.epoch and not node.is_replica and (self._cleanup is None or self._cleanup.done()):
                self._cleanup = asyncio.ensure_future(self._clean_later(pb.epoch))

    async def _forget_progress(self) -> None:
        stale = self.engine.store.node_meta_names(META_PREFIX)
        if stale and not self.node.is_replica:
            await self.engine.write_raw([(enc.node_key(n), None) for n in stale])

    async def _clean_later(self, epoch: int) -> None:
        await asyncio.sleep(self.cfg.moved_data_grace_s)
        node = self.node
        try:
            await drop_unowned(node, self.engine,
                               lambda: not self._closing and not node.is_replica and not node.view.pb.migrations)
        except Exception:
            log.exception("dropping sessions that moved away failed")

    # ---- helpers ----

    def _busy_sessions(self) -> list[tuple[str, str]]:
        out = []
        for mkey in self.engine.locked_metas():
            s = session_of(mkey)
            if s is not None:
                out.append((s[0].decode(), s[1].decode()))
        return out

    async def _keeper_map(self) -> admin_pb2.ClusterMap | None:
        pb = self.node.view.pb
        address = keeper_address(pb)
        if not address or address == self.node.address:
            return pb
        try:
            return await self.repl.maps.stub(address).GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=2.0)
        except grpc.RpcError:
            return None

    # ---- RPCs ----

    async def fence_rpc(self, req: replication_pb2.FenceRequest, context: Any) -> replication_pb2.FenceResponse:
        try:
            rev, epoch = await self.fences.fence(req)
        except Exception as e:
            await errors.abort(context, e)
        return replication_pb2.FenceResponse(revision=rev, epoch=epoch)

    async def status_rpc(self, req: Any, context: Any) -> replication_pb2.MigrationStatusResponse:
        return replication_pb2.MigrationStatusResponse(
            epoch=self.node.epoch, pairs=[p.status() for p in self.pullers.values()])
