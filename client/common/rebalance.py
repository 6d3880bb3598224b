"""Rebalancing as pure map logic, shared by routers (which plan and finish a rebalance) and
shards (which copy, fence and clean up by it): the keeper shard, the current and target rings,
which sessions move from where to where, and the maps that start and end a rebalance.

A rebalance is one map change at a time: the map that starts it names the change (a JOINING
shard, a LEAVING one, or a `next_weight`) and its (source, target) pairs in `migrations`; the
map that ends it has every pair's sessions on their new owners, at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from shardstate.common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from shardstate.common.ring import Ring
from shardstate.v1 import admin_pb2

MAX_WEIGHT = 64  # 640 vnodes per unit: 40 960 points for one shard at most
COPYING = "copying"


def keeper_id(pb: admin_pb2.ClusterMap) -> str:
    """The shard whose primary keeps the authoritative map: the lowest id in it."""
    return min((s.id for s in pb.shards), default="")


def keeper_address(pb: admin_pb2.ClusterMap) -> str:
    kid = keeper_id(pb)
    return next((s.primary for s in pb.shards if s.id == kid), "")


def current_weights(pb: admin_pb2.ClusterMap) -> dict[str, int]:
    return {s.id: (s.weight or 1) for s in pb.shards if s.state != admin_pb2.JOINING}


def target_weights(pb: admin_pb2.ClusterMap) -> dict[str, int]:
    return {s.id: (s.next_weight or s.weight or 1) for s in pb.shards if s.state != admin_pb2.LEAVING}


@dataclass(frozen=True)
class Move:
    """Where each session is now and where it goes, under a map that starts a rebalance."""

    current: Ring
    target: Ring
    epoch: int

    @classmethod
    def of(cls, pb: admin_pb2.ClusterMap) -> Move:
        return cls(Ring(current_weights(pb)), Ring(target_weights(pb)), int(pb.migrations[0].started_epoch if pb.migrations else pb.epoch))

    def route(self, namespace: str, session_id: str) -> tuple[str, str]:
        """(owner now, owner after)."""
        return self.current.owner(namespace, session_id), self.target.owner(namespace, session_id)

    def leaving(self, shard_id: str, namespace: str, session_id: str) -> bool:
        now, after = self.route(namespace, session_id)
        return now == shard_id and after != shard_id

    def moves(self, source: str, target: str, namespace: str, session_id: str) -> bool:
        return self.route(namespace, session_id) == (source, target)


def running(pb: admin_pb2.ClusterMap) -> str:
    """'' when no rebalance runs, else what runs, for error messages."""
    if not pb.migrations:
        return ""
    m = pb.migrations[0]
    return f"{m.change} (since epoch {m.started_epoch})"


def _refuse_if_running(pb: admin_pb2.ClusterMap) -> None:
    what = running(pb)
    if what:
        raise FailedPreconditionError(
            f"a rebalance is already running: {what}; wait for it (shardstate admin rebalance-status) "
            "and try again; nothing changed")


def check_weight(weight: int) -> int:
    if weight < 1 or weight > MAX_WEIGHT:
        raise InvalidArgumentError(f"weight must be between 1 and {MAX_WEIGHT}, got {weight}; nothing changed")
    return weight


def _shard(pb: admin_pb2.ClusterMap, shard_id: str) -> admin_pb2.ShardInfo:
    for s in pb.shards:
        if s.id == shard_id:
            return s
    known = ", ".join(s.id for s in pb.shards) or "none"
    raise NotFoundError(f"no shard {shard_id!r} in the cluster map (epoch {pb.epoch}; shards: {known}); nothing changed")


def _start(pb: admin_pb2.ClusterMap, change: str, pairs: list[tuple[str, str]]) -> None:
    now = int(time.time() * 1000)
    del pb.migrations[:]
    for src, dst in pairs:
        pb.migrations.add(source=src, target=dst, started_epoch=pb.epoch + 1, phase=COPYING,
                          change=change, started_ms=now)


def plan_add(pb: admin_pb2.ClusterMap, shard_id: str, primary: str, replicas: list[str], weight: int) -> None:
    """`pb` becomes the map that starts adding the shard (JOINING, every other shard a source)."""
    _refuse_if_running(pb)
    if not shard_id:
        raise InvalidArgumentError("a shard id is required; nothing changed")
    if any(s.id == shard_id for s in pb.shards):
        raise AlreadyExistsError(f"shard {shard_id!r} is already in the cluster map; nothing changed")
    used = {a: s.id for s in pb.shards for a in (s.primary, *s.replicas)}
    for a in (primary, *replicas):
        if a in used:
            raise FailedPreconditionError(f"{a} already serves shard {used[a]!r} in the cluster map; nothing changed")
    sources = [s.id for s in pb.shards if s.state != admin_pb2.JOINING]
    pb.shards.add(id=shard_id, weight=check_weight(weight), primary=primary, replicas=replicas, state=admin_pb2.JOINING)
    _start(pb, f"add-shard {shard_id}", [(s, shard_id) for s in sources])


def plan_remove(pb: admin_pb2.ClusterMap, shard_id: str) -> None:
    _refuse_if_running(pb)
    s = _shard(pb, shard_id)
    others = [o.id for o in pb.shards if o.id != shard_id]
    if not others:
        raise FailedPreconditionError(f"shard {shard_id!r} is the last shard; a cluster needs one; nothing changed")
    s.state = admin_pb2.LEAVING
    _start(pb, f"remove-shard {shard_id}", [(shard_id, o) for o in others])


def plan_weight(pb: admin_pb2.ClusterMap, shard_id: str, weight: int) -> None:
    _refuse_if_running(pb)
    check_weight(weight)
    s = _shard(pb, shard_id)
    old = s.weight or 1
    if weight == old:
        raise FailedPreconditionError(f"shard {shard_id!r} already has weight {weight}; nothing changed")
    s.next_weight = weight
    others = [o.id for o in pb.shards if o.id != shard_id]
    pairs = [(o, shard_id) for o in others] if weight > old else [(shard_id, o) for o in others]
    _start(pb, f"set-weight {shard_id} {weight}", pairs)


def finish(pb: admin_pb2.ClusterMap) -> None:
    """`pb` (a map that started a rebalance) becomes the map that ends it: JOINING shards are
    ACTIVE, LEAVING ones gone, next weights applied, no migrations."""
    keep = []
    for s in pb.shards:
        if s.state == admin_pb2.LEAVING:
            continue
        c = admin_pb2.ShardInfo()
        c.CopyFrom(s)
        c.state = admin_pb2.ACTIVE
        if c.next_weight:
            c.weight, c.next_weight = c.next_weight, 0
        keep.append(c)
    del pb.shards[:]
    pb.shards.extend(keep)
    del pb.migrations[:]


def same_rebalance(pb: admin_pb2.ClusterMap, started_epoch: int) -> bool:
    return bool(pb.migrations) and pb.migrations[0].started_epoch == started_epoch
