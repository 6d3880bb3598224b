"""Whether this shard process is a primary or a replica, and every change between the two:
start-up, promotion (a new term, the revision raised above anything the old primary could
have issued), demotion (follow the new primary, set aside writes it never received), replica
registration in the cluster map; plus the hooks into the State and Admin services.

The cluster map decides: the shard's entry names its primary. Without a map entry,
`--replica-of ADDR` makes a replica. A map naming another primary turns a primary into a
replica of it (checked at start-up against the peers' maps and on every adopted map).

Replica registration: the primary records its replicas in the map. When a follower has caught
up, a primary whose map (epoch > 0) places its shard but does not list that follower publishes
the map at the next epoch with it added to `ShardInfo.replicas`, to every node the map names
(mapsync.py rebuilds on top of any map that took the same epoch meanwhile); routers pick it up
on their next map refresh. A router bootstrapping from seeds that include replicas lists them
from the start (their Status says REPLICA), which is what `shardstate dev` relies on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from shardstate.common import errors
from shardstate.server.config import ShardConfig
from shardstate.v1 import admin_pb2

from .. import cpu
from ..node import Node
from ..service import StateService
from ..storage.engine import Engine
from ..storage.revision import LOGICAL_BITS
from . import audit, timeline
from .acks import AckTracker
from .follower import RESYNC_META, Follower
from .leader import Leader
from .mapsync import MapSync
from .metrics import ReplicationMetrics

log = logging.getLogger("shardstate.replication")
ADDRESS_META = "address"  # the address this node served at last time (ports may change)

# docs/design.md §2: a promoted replica hands out revisions above anything the old primary could have
# issued: its last known leader revision plus this much HLC time (10 s).
PROMOTION_MARGIN = 10_000 << LOGICAL_BITS
# A primary asks its peers for a newer map this often: one replaced while it was paused or cut
# off missed the new map's publication, and the new map no longer names it.
MAP_CHECK_S = 5.0


class Replication:
    def __init__(self, cfg: ShardConfig, node: Node, engine: Engine, state: StateService) -> None:
        self.cfg = cfg
        self.node = node
        self.engine = engine
        self.state = state
        self.acks = AckTracker(cfg.min_replica_acks, cfg.replica_ack_timeout_s)
        self.leader = Leader(node, engine, self.acks, self._caught_up)
        self.follower: Follower | None = None
        self.maps = MapSync(node)
        self.metrics = ReplicationMetrics(node.metrics, node, self.leader, lambda: self.follower)
        self._lock = asyncio.Lock()  # one role transition at a time
        self._tasks: set[asyncio.Task[Any]] = set()
        self._registering: set[str] = set()
        self._register_lock = asyncio.Lock()  # one map change of ours at a time
        # Promoted while holding a map of this epoch: until a newer map arrives, the map's
        # stale primary entry must not turn this node back into a replica.
        self._promoted_epoch = -1
        self._me: set[str] = set()
        self._held = False  # role held as a replica's until start() settles it (_hold_role)

    # ---- wiring ----

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((self.leader.handler(),))
        self._hold_role()

    def _hold_role(self) -> None:
        """Before the server serves: a node that may be a replica (--replica-of, or a map naming
        another primary) answers as one (NotPrimary, nothing readable) until start() has
        settled its role, so a restart never takes writes or answers reads as a primary."""
        node = self.node
        raw = self.engine.node_meta(ADDRESS_META)
        me = {node.address, raw.decode()} if raw else {node.address}
        shard = node.view.shard(node.shard_id) if node.view.epoch else None
        named = shard.primary if shard is not None and shard.primary not in me else ""
        flag = self.cfg.replica_of if self.cfg.replica_of not in me else ""
        if flag or named:
            node.role, node.primary, node.readable = admin_pb2.REPLICA, named or flag, False
            self._held = True

    def wire_admin(self, behaviors: dict[str, Callable[..., Any]]) -> None:
        """Status gains replication figures; an adopted map may change this node's role;
        PromoteReplica promotes this node (the router calls it on the chosen replica)."""
        status, publish = behaviors["Status"], behaviors["PublishClusterMap"]

        async def status_(req: Any, context: Any) -> admin_pb2.StatusResponse:
            resp: admin_pb2.StatusResponse = await status(req, context)
            self.fill_status(resp)
            return resp

        async def publish_(req: Any, context: Any) -> admin_pb2.PublishClusterMapResponse:
            resp: admin_pb2.PublishClusterMapResponse = await publish(req, context)
            if resp.adopted:
                try:
                    await self.settle()
                except Exception as e:
                    log.exception("acting on the adopted cluster map failed")
                    await errors.abort(context, e)
            return resp

        behaviors["Status"] = status_
        behaviors["PublishClusterMap"] = publish_
        behaviors["PromoteReplica"] = self.promote_rpc

    async def start(self) -> None:
        engine = self.engine
        engine.retention_hold = self.leader.hold
        if self.cfg.min_replica_acks > 0:
            self.state.ack_barrier = self.barrier
        if self.node.epoch or self.cfg.replica_of:
            # A node coming back must not act on a stale map: a newer one may name another primary.
            await self.maps.refresh([self.cfg.replica_of])
        raw = engine.node_meta(ADDRESS_META)
        self._me = {self.node.address, raw.decode()} if raw else {self.node.address}
        engine.set_node_meta(ADDRESS_META, self.node.address.encode())
        target = await self._initial_primary()
        if self._held:
            self._held = False
            if not target:  # a primary after all: it never stopped being one
                self.node.role, self.node.primary, self.node.readable = admin_pb2.PRIMARY, "", True
        await self.settle(target)
        self._spawn(self._check_map())

    async def _check_map(self) -> None:
        """While primary: adopt a newer map a peer holds, and act on it (a replaced primary
        becomes the new one's replica and sets aside what only it holds)."""
        while True:
            await asyncio.sleep(MAP_CHECK_S)
            if self.node.is_replica:
                continue
            try:
                if await self.maps.refresh():
                    await self.settle()
            except Exception:
                log.exception("checking the peers for a newer cluster map failed")

    async def ready(self) -> None:
        """Returns once this node can serve: at once for a primary, after the first full
        catch-up for a replica."""
        while self.node.is_replica:
            f = self.follower
            if f is None or f.synced.is_set():
                return
            try:
                await asyncio.wait_for(f.synced.wait(), 0.5)  # re-check: a promotion ends the wait
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self.leader.closing = True
        self.leader.end_streams()
        self.acks.fail_all("shard is shutting down; the write is committed on the primary")
        if self.follower is not None:
            await self.follower.stop()
        for t in list(self._tasks):
            t.cancel()
        await self.maps.close()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- semi-sync ----

    async def barrier(self, revision: int) -> None:
        """A write at `revision` is acknowledged once --min-replica-acks replicas applied it."""
        if not self.node.is_replica:
            await self.metrics.timed(self.acks.wait(revision))

    # ---- roles ----

    def _map_primary(self) -> str | None:
        """What the map says: "" = this node is the primary, an address = follow it, None =
        the map does not place this shard."""
        node = self.node
        shard = node.view.shard(node.shard_id) if node.view.epoch else None
        if shard is None or not shard.primary:
            return None
        if shard.primary in self._me or node.epoch <= self._promoted_epoch:
            return ""  # the map names this node (perhaps by the address it had before a restart)
        return shard.primary

    async def _initial_primary(self) -> str:
        """At start-up: the map when it names this node primary; else --replica-of, unless that
        node is not a primary while the map names another; else the map; else primary."""
        by_map = self._map_primary()
        if by_map == "":
            return ""
        flag = self.cfg.replica_of if self.cfg.replica_of not in self._me else ""
        if flag and by_map and by_map != flag:
            st = await self.maps.status(flag)
            if st is None or st.role != admin_pb2.PRIMARY:
                return by_map  # e.g. restarted with the flag of a primary that was replaced
        return flag or by_map or ""

    async def settle(self, target: str | None = None) -> None:
        """Bring the role in line with `target` or else the map (unchanged when the map does
        not place this shard)."""
        async with self._lock:
            if target is None:
                target = self._map_primary()
            if target is None:
                pass
            elif target:
                if self.follower is None:
                    await self._become_replica(target)
                elif self.follower.target != target:
                    self.node.primary = target
                    await self.follower.retarget(target)
            elif self.node.is_replica:
                await self._promote()
            elif not timeline.load(self.engine).terms:
                timeline.save(self.engine, timeline.new_term(timeline.load(self.engine), self.node.epoch, 0))
        if not self.node.is_replica:
            self._spawn(self._register([f.id for f in self.leader.followers.values() if f.caught_up and f.connected]))

    async def _become_replica(self, target: str) -> None:
        node, engine = self.node, self.engine
        was_primary = not node.is_replica
        node.role = admin_pb2.REPLICA
        node.primary = target
        engine.sweeping = False
        node.readable = False  # until the first catch-up proves the data is the primary's
        if was_primary:
            self.leader.end_streams()
            self.acks.fail_all(f"this node stopped being the primary (the cluster map names {target})")
            if node.serving:
                log.warning("demoted: the cluster map names another primary", extra={"fields": {
                    "primary": target, "epoch": node.epoch, "revision": engine.revision()}})
        self._priority(background=True)
        self.follower = Follower(node, engine, target, self._set_aside, self._resynced)
        self.follower.start()

    def _priority(self, background: bool) -> None:
        """--background-replica: replicas run in the background, primaries at normal priority."""
        if not self.cfg.background_replica:
            return
        why = cpu.set_background(background)
        if why:
            log.warning("CPU priority unchanged", extra={"fields": {"background": background, "why": why}})
        else:
            log.info("CPU priority set", extra={"fields": {"background": background}})

    async def _promote(self) -> int:
        """This replica becomes the primary of its shard (idempotent under the lock)."""
        node, engine = self.node, self.engine
        if self.engine.node_meta(RESYNC_META) == b"1":
            raise errors.FailedPreconditionError(
                f"replica {node.address} is in the middle of a resync from its primary (its data is "
                "incomplete) and cannot be promoted; promote another replica"
            )
        known = engine.revision()
        if self.follower is not None:
            known = max(known, self.follower.leader_revision)
            await self.follower.stop()
            self.follower = None
        fork = engine.revision()
        rev = await engine.raise_revision(known + PROMOTION_MARGIN)
        timeline.save(engine, timeline.new_term(timeline.load(engine), node.epoch, fork))
        node.role = admin_pb2.PRIMARY
        node.primary = ""
        node.readable = True
        self._priority(background=False)
        self._promoted_epoch = node.epoch
        engine.sweeping = True
        log.warning("promoted to primary", extra={"fields": {
            "shard_id": node.shard_id, "fork_revision": fork, "revision": rev, "epoch": node.epoch}})
        return rev

    async def _set_aside(self, fork: int, new_primary: str) -> None:
        """Diverged: audit the writes above `fork`, then the next stream resyncs from a snapshot."""
        n = await asyncio.to_thread(audit.set_aside, self.engine, fork, new_primary, self.node.epoch)
        self.engine.set_node_meta(RESYNC_META, b"1")
        log.warning("resyncing from the new primary", extra={"fields": {"primary": new_primary, "set_aside": n}})

    def _resynced(self) -> None:
        """The new primary's snapshot is in: say in the audit file what it did with the seqs
        and keys of the writes set aside (in the background; the stream goes on)."""
        if self.engine.node_meta(audit.RECONCILE_META):
            self._spawn(self._reconcile())

    async def _reconcile(self) -> None:
        try:
            await asyncio.to_thread(audit.reconcile, self.engine)
        except Exception:
            log.exception("reconciling the diverged writes with the new primary failed")

    # ---- replica registration ----

    def _caught_up(self, follower_id: str) -> None:
        self._spawn(self._register([follower_id]))

    async def _register(self, ids: list[str]) -> None:
        """Record caught-up followers in the cluster map's replica list of this shard."""
        node = self.node
        ids = [i for i in ids if i not in self._registering]
        shard = node.view.shard(node.shard_id) if node.view.epoch else None
        if node.is_replica or shard is None or shard.primary != node.address:
            return
        ids = [i for i in ids if i not in shard.replicas and i != node.address]
        if not ids:
            return

        def mutate(pb: admin_pb2.ClusterMap) -> bool:
            for s in pb.shards:
                if s.id == node.shard_id:
                    if s.primary != node.address:
                        return False
                    add = [i for i in ids if i not in s.replicas and i != s.primary]
                    if not add:
                        return False
                    reps = sorted({*s.replicas, *add})
                    del s.replicas[:]
                    s.replicas.extend(reps)
                    return True
            return False

        self._registering.update(ids)
        try:
            async with self._register_lock:
                await self.maps.change(mutate, f"replica {', '.join(ids)} of shard {node.shard_id} joined")
        except Exception:
            log.exception("registering replicas in the cluster map failed")
        finally:
            self._registering.difference_update(ids)

    # ---- admin ----

    async def promote_rpc(self, req: admin_pb2.PromoteReplicaRequest, context: Any) -> admin_pb2.PromoteReplicaResponse:
        node = self.node
        try:
            if req.shard_id and req.shard_id != node.shard_id:
                raise errors.FailedPreconditionError(
                    f"node {node.address} serves shard {node.shard_id!r}, not {req.shard_id!r}; nothing changed"
                )
            if req.replica and req.replica != node.address:
                raise errors.InvalidArgumentError(
                    f"this node is {node.address}, not {req.replica}: PromoteReplica on a shard promotes "
                    "the node it is sent to (use a router to promote another node)"
                )
            async with self._lock:
                rev = await self._promote() if node.is_replica else self.engine.revision()
        except Exception as e:
            await errors.abort(context, e)
        return admin_pb2.PromoteReplicaResponse(cluster_map=node.view.pb, new_primary=node.address, revision=rev)

    def fill_status(self, resp: admin_pb2.StatusResponse) -> None:
        node = self.node
        if not resp.nodes:
            return
        me = resp.nodes[0]
        me.role = node.role  # type: ignore[assignment]
        me.primary = node.primary
        me.diverged_writes = audit.count(self.engine)
        f = self.follower
        if node.is_replica and f is not None:
            me.lag_revisions, me.lag_ms = f.lag()
            me.serving = me.serving and node.readable
            if not f.connected:
                me.error = f"replication: not connected to primary {f.target}" + (f" ({f.error})" if f.error else "")
        elif not node.is_replica:
            resp.nodes.extend(self.leader.statuses())
