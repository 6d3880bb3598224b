"""Rebalancing, coordinated by a router (docs/design.md §6.4): AddShard / RemoveShard /
SetWeight swap in the map that starts a rebalance; the targets copy by themselves (the map
tells them); this module watches them catch up, fences the sources, waits for the targets to
reach the fence revisions, and swaps in the map that ends it. It keeps no state but the map:
any router (this one restarted, or another) that sees a rebalance in the map drives it.

Every step is safe to repeat or to run from two routers at once: fencing is idempotent, and the
final swap is conditional on the epoch the fences were set at, so only one can end it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from shardstate.common import errors
from shardstate.common.hlc import ms_of
from shardstate.common.jsonlog import fields
from shardstate.common.rebalance import (
    check_weight,
    finish,
    keeper_address,
    plan_add,
    plan_remove,
    plan_weight,
    same_rebalance,
)
from shardstate.router.maps import MapHolder
from shardstate.router.nodes import NodePool, describe
from shardstate.v1 import admin_pb2, replication_pb2

log = logging.getLogger("shardstate.router.rebalance")

POLL_S = 0.25
CAUGHT_UP_MS = 300  # a pair this close to its source (in source time) is ready to hand over
FENCE_HOLD_MS = 10_000  # how long a source holds writes without hearing the outcome
HANDOVER_WAIT_S = 4.0  # fenced, the targets must reach the fence revisions within this
SWAP_MARGIN_S = 4.0  # the final swap starts only this long before the fences could expire
RPC_TIMEOUT_S = 2.0


def lag_ms(p: replication_pb2.PairStatus) -> int:
    if p.source_revision <= p.position:
        return 0
    return ms_of(p.source_revision) - ms_of(p.position)


def ready(p: replication_pb2.PairStatus | None) -> bool:
    return p is not None and p.phase in ("tailing", "caught_up") and lag_ms(p) <= CAUGHT_UP_MS


class Rebalancer:
    def __init__(self, maps: MapHolder, nodes: NodePool) -> None:
        self.maps = maps
        self.nodes = nodes
        self._task: asyncio.Task[None] | None = None
        self.pairs: dict[tuple[str, str], admin_pb2.RebalanceProgress] = {}
        self.change = ""
        self.started_epoch = 0
        self.started_ms = 0
        self.phase = "idle"
        self.error = ""

    # ---- the admin calls ----

    async def add_shard(self, req: admin_pb2.AddShardRequest) -> admin_pb2.ClusterMap:
        if not req.id:
            raise errors.InvalidArgumentError("add-shard: a shard id is required; nothing changed")
        if not req.primary:
            raise errors.InvalidArgumentError("add-shard: the new shard's primary address is required; nothing changed")
        weight = check_weight(req.weight or 1)
        view = await self.maps.refresh()
        trial = admin_pb2.ClusterMap()
        trial.CopyFrom(view.pb)
        plan_add(trial, req.id, req.primary, list(req.replicas), weight)  # refuses early what the map refuses
        await self._check_fresh(req.id, req.primary, list(req.replicas))
        new = await self.maps.change(lambda pb: plan_add(pb, req.id, req.primary, list(req.replicas), weight))
        self.ensure()
        return new

    async def remove_shard(self, req: admin_pb2.RemoveShardRequest) -> admin_pb2.ClusterMap:
        if not req.id:
            raise errors.InvalidArgumentError("remove-shard: a shard id is required; nothing changed")
        new = await self.maps.change(lambda pb: plan_remove(pb, req.id))
        self.ensure()
        return new

    async def set_weight(self, req: admin_pb2.SetWeightRequest) -> admin_pb2.ClusterMap:
        if not req.id:
            raise errors.InvalidArgumentError("set-weight: a shard id is required; nothing changed")
        check_weight(req.weight)
        new = await self.maps.change(lambda pb: plan_weight(pb, req.id, req.weight))
        self.ensure()
        return new

    async def _status(self, address: str) -> admin_pb2.NodeStatus | str:
        try:
            st = await self.nodes.admin(address).Status(admin_pb2.StatusRequest(), timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            return describe(e)
        return st.nodes[0] if st.nodes else "answered Status without its own line"

    async def _check_fresh(self, shard_id: str, primary: str, replicas: Sequence[str]) -> None:
        """The new shard's primary must answer as a fresh primary of that id; replicas as its replicas."""
        st = await self._status(primary)
        if isinstance(st, str):
            raise errors.UnavailableError(
                f"{primary} does not answer ({st}); start the shard first (shardstate shard --id {shard_id} "
                "--listen ...); nothing changed")
        if st.shard_id != shard_id:
            raise errors.FailedPreconditionError(f"{primary} serves shard {st.shard_id!r}, not {shard_id!r}; nothing changed")
        if st.role != admin_pb2.PRIMARY:
            raise errors.FailedPreconditionError(f"{primary} is a replica (of {st.primary}), not a primary; nothing changed")
        if st.epoch:
            raise errors.FailedPreconditionError(
                f"{primary} is not a fresh shard: it holds a cluster map (epoch {st.epoch}); nothing changed")
        if st.sessions or st.keys:
            raise errors.FailedPreconditionError(
                f"{primary} is not a fresh shard: it holds {st.sessions} sessions; nothing changed")
        for r in replicas:
            rs = await self._status(r)
            if isinstance(rs, str):
                raise errors.UnavailableError(f"replica {r} does not answer ({rs}); nothing changed")
            if rs.shard_id != shard_id or rs.role != admin_pb2.REPLICA:
                raise errors.FailedPreconditionError(
                    f"{r} is not a replica of shard {shard_id} (it reports shard {rs.shard_id!r}, "
                    f"{admin_pb2.NodeRole.Name(rs.role).lower()}); nothing changed")

    # ---- driving ----

    def ensure(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drive())

    @property
    def driving(self) -> bool:
        return self._task is not None and not self._task.done()

    async def watch(self) -> None:
        """Resume any rebalance the map shows (this router restarted, or another one died)."""
        while True:
            await asyncio.sleep(1.0)
            if self.maps.view.pb.migrations:
                self.ensure()

    async def _authoritative(self) -> admin_pb2.ClusterMap:
        view = await self.maps.refresh()
        address = keeper_address(view.pb)
        if address:
            got = (await self.maps.fetch([address]))[address]
            if isinstance(got, admin_pb2.ClusterMap):
                self.maps.adopt(got)
        return self.maps.view.pb

    async def _drive(self) -> None:
        try:
            while True:
                pb = await self._authoritative()
                if not pb.migrations:
                    if self.started_epoch:
                        self.phase = "done"
                    return
                m = pb.migrations[0]
                if m.started_epoch != self.started_epoch:
                    self.started_epoch, self.change, self.started_ms = m.started_epoch, m.change, m.started_ms
                    self.pairs.clear()
                    self.error = ""
                    log.info("driving a rebalance", extra=fields(change=m.change, epoch=m.started_epoch))
                if await self._poll(pb) and await self._handover(pb):
                    continue
                await asyncio.sleep(POLL_S)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.error = str(e)
            log.exception("driving the rebalance failed")

    async def _pair_statuses(self, pb: admin_pb2.ClusterMap) -> dict[tuple[str, str], replication_pb2.PairStatus]:
        targets = sorted({m.target for m in pb.migrations})
        shards = {s.id: s for s in pb.shards}

        async def one(t: str) -> tuple[str, replication_pb2.MigrationStatusResponse | str]:
            try:
                return t, await self.nodes.replication(shards[t].primary).MigrationStatus(
                    replication_pb2.MigrationStatusRequest(), timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as e:
                return t, describe(e)

        out: dict[tuple[str, str], replication_pb2.PairStatus] = {}
        behind: list[str] = []
        started = pb.migrations[0].started_epoch
        for t, got in await asyncio.gather(*(one(t) for t in targets)):
            if isinstance(got, str):
                self.error = f"target {t}: {got}"
                continue
            if got.epoch < pb.epoch:
                behind.append(shards[t].primary)
            for p in got.pairs:
                if p.epoch == started:
                    out[(p.source, t)] = p
        if behind:
            await self.maps.publish(pb, behind)  # a target that missed the map starts copying on it
        return out

    async def _poll(self, pb: admin_pb2.ClusterMap) -> bool:
        got = await self._pair_statuses(pb)
        all_ready = True
        for m in pb.migrations:
            p = got.get((m.source, m.target))
            if p is not None:
                self.pairs[(m.source, m.target)] = admin_pb2.RebalanceProgress(
                    phase=p.phase, sessions_total=p.sessions_total, sessions_moved=p.sessions_copied,
                    bytes_moved=p.bytes, source=m.source, target=m.target, epoch=pb.epoch,
                    change=m.change, lag_revisions=lag_ms(p), error=p.error)
            all_ready = all_ready and ready(p)
        self.phase = "caught_up" if all_ready else "copying"
        return all_ready

    async def _fence(self, pb: admin_pb2.ClusterMap, source: str, release: bool = False) -> int:
        shard = next(s for s in pb.shards if s.id == source)
        resp = await self.nodes.replication(shard.primary).Fence(
            replication_pb2.FenceRequest(epoch=pb.epoch, hold_ms=FENCE_HOLD_MS, release=release), timeout=RPC_TIMEOUT_S)
        return int(resp.revision)

    async def _handover(self, pb: admin_pb2.ClusterMap) -> bool:
        """Fence every source, wait for the targets to reach the fence revisions, swap in the
        map that ends the rebalance. False (fences released when that is known safe) if any
        step fails: the caller tries again."""
        self.phase = "handing_over"
        sources = sorted({m.source for m in pb.migrations})
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            revs = dict(zip(sources, await asyncio.gather(*(self._fence(pb, s) for s in sources)), strict=True))
        except grpc.RpcError as e:
            self.error = f"fencing the sources failed: {describe(e)}"
            await self._release(pb, sources)
            return False
        while True:
            got = await self._pair_statuses(pb)
            if all((p := got.get((m.source, m.target))) is not None and p.position >= revs[m.source]
                   for m in pb.migrations):
                break
            if loop.time() - t0 > HANDOVER_WAIT_S:
                self.error = "the targets did not reach the fence revisions in time; trying again"
                await self._release(pb, sources)
                return False
            await asyncio.sleep(0.01)
        if loop.time() - t0 > FENCE_HOLD_MS / 1000 - SWAP_MARGIN_S:
            await self._release(pb, sources)
            return False
        started = pb.migrations[0].started_epoch
        leaving = [a for s in pb.shards if s.state == admin_pb2.LEAVING for a in (s.primary, *s.replicas)]

        def end(m: admin_pb2.ClusterMap) -> None:
            if m.epoch != pb.epoch or not same_rebalance(m, started):
                raise errors.FailedPreconditionError(
                    f"the map changed during the hand-over (epoch {m.epoch}, fenced at {pb.epoch})")
            finish(m)

        try:
            new = await self.maps.change(end, also=leaving)
        except errors.ShardstateError as e:
            self.error = e.message
            await self._release(pb, sources)
            return False
        took = loop.time() - t0
        log.info("rebalance handed over", extra=fields(change=pb.migrations[0].change, epoch=new.epoch,
                                                         held_ms=round(took * 1000, 1)))
        self.phase = "done"
        for line in self.pairs.values():
            line.phase = "done"
            line.epoch = new.epoch
        return True

    async def _release(self, pb: admin_pb2.ClusterMap, sources: Sequence[str]) -> None:
        """End the hold only when the keeper shows the hand-over did not happen; a newer map is
        offered to the sources instead (adopting it ends their hold)."""
        self.phase = "copying"
        address = keeper_address(pb)
        got = (await self.maps.fetch([address]))[address] if address else None
        if not isinstance(got, admin_pb2.ClusterMap):
            return  # unknown: the sources ask the keeper themselves when their hold runs out
        if got.epoch > pb.epoch:
            self.maps.adopt(got)
            await self.maps.publish(got, [s.primary for s in got.shards] + [s.primary for s in pb.shards])
            return
        for s in sources:
            try:
                await self._fence(pb, s, release=True)
            except grpc.RpcError:
                pass

    # ---- progress ----

    def summary(self, done: bool = False) -> admin_pb2.RebalanceProgress:
        ps = list(self.pairs.values())
        total = sum(p.sessions_total for p in ps)
        moved = sum(p.sessions_moved for p in ps)
        elapsed = max(0.0, time.time() - self.started_ms / 1000) if self.started_ms else 0.0
        rate = moved / elapsed if elapsed > 0 else 0.0
        eta = (total - moved) / rate if rate > 0 and total > moved else 0.0
        return admin_pb2.RebalanceProgress(
            phase=self.phase, sessions_total=total, sessions_moved=moved,
            bytes_moved=sum(p.bytes_moved for p in ps), eta_s=eta, epoch=self.maps.view.epoch, done=done,
            change=self.change, elapsed_s=elapsed, error=self.error,
            lag_revisions=max((p.lag_revisions for p in ps), default=0))

    def lines(self) -> list[admin_pb2.RebalanceProgress]:
        return [*self.pairs.values(), self.summary()]

    async def follow(self) -> AsyncIterator[admin_pb2.RebalanceProgress]:
        """Admin.Rebalance: the running rebalance's progress until it ends (resumed here if no
        router drives it); one `done` summary at once when none runs."""
        pb = await self._authoritative()
        if not pb.migrations:
            s = self.summary(done=True)
            if not self.started_epoch:
                s.phase = "idle"
            yield s
            return
        self.ensure()
        while True:
            task = self._task
            for line in self.lines():
                yield line
            if task is None or task.done():
                yield self.summary(done=True)
                return
            await asyncio.sleep(0.5)
