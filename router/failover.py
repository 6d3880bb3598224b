"""`Admin.PromoteReplica` on a router: check the request against the map and the replicas'
own Status, promote the chosen replica (it raises its revision and starts a new term), then
publish the map at the next epoch naming it primary, so routers and the other nodes switch.

Nothing changes when the request is bad: unknown shard -> NOT_FOUND, an address that is not a
replica of the shard -> INVALID_ARGUMENT (per the map) or FAILED_PRECONDITION (per the node).
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from shardstate.common import errors
from shardstate.common.jsonlog import fields
from shardstate.router.maps import MapHolder
from shardstate.router.nodes import NodePool, describe
from shardstate.v1 import admin_pb2

log = logging.getLogger("shardstate.router.failover")

STATUS_TIMEOUT_S = 3.0
PROMOTE_TIMEOUT_S = 15.0


def promote_in(pb: admin_pb2.ClusterMap, shard_id: str, new_primary: str) -> None:
    """In `pb`, `new_primary` becomes the shard's primary. The old primary leaves the replica
    list: it rejoins as a replica (and is registered again) when it comes back."""
    for s in pb.shards:
        if s.id == shard_id:
            reps = [r for r in s.replicas if r != new_primary]
            s.primary = new_primary
            del s.replicas[:]
            s.replicas.extend(reps)


def promoted_map(pb: admin_pb2.ClusterMap, shard_id: str, new_primary: str) -> admin_pb2.ClusterMap:
    """`pb` at the next epoch with `new_primary` as the shard's primary."""
    out = admin_pb2.ClusterMap()
    out.CopyFrom(pb)
    out.epoch = pb.epoch + 1
    promote_in(out, shard_id, new_primary)
    return out


async def _own_status(nodes: NodePool, address: str) -> admin_pb2.NodeStatus | str:
    try:
        # wait_for_ready: a replica just restarted may find the channel still backing off.
        st = await nodes.admin(address).Status(admin_pb2.StatusRequest(), timeout=STATUS_TIMEOUT_S,
                                               wait_for_ready=True)
    except grpc.RpcError as e:
        return describe(e)
    if not st.nodes:
        return "answered Status without its own line"
    return st.nodes[0]


async def choose(nodes: NodePool, shard: admin_pb2.ShardInfo, replica: str) -> str:
    """The replica to promote: the one asked for, after checking it; else the most caught-up.
    One the map lists as a replica but that already reports itself primary of the shard is
    chosen at once: an earlier promote promoted it and could not change the map."""
    if replica:
        if replica == shard.primary:
            raise errors.FailedPreconditionError(
                f"{replica} is already the primary of shard {shard.id}; nothing changed")
        if replica not in shard.replicas:
            listed = ", ".join(shard.replicas) or "none"
            raise errors.InvalidArgumentError(
                f"{replica} is not a replica of shard {shard.id} in the cluster map (its replicas: {listed}); nothing changed")
        candidates = [replica]
    else:
        candidates = list(shard.replicas)
        if not candidates:
            raise errors.FailedPreconditionError(
                f"shard {shard.id} has no replica in the cluster map to promote; nothing changed")
    got = await asyncio.gather(*(_own_status(nodes, a) for a in candidates))
    problems: list[str] = []
    unreachable = 0
    best: tuple[int, str] | None = None
    for address, st in zip(candidates, got, strict=True):
        if isinstance(st, str):
            unreachable += 1
            problems.append(f"{address} is unreachable ({st})")
        elif st.role == admin_pb2.PRIMARY and st.shard_id == shard.id:
            # Promoted by an earlier promote whose map change did not go through (e.g. the
            # keeper was down): it holds the shard's writes since; finish its promotion.
            return address
        elif st.role != admin_pb2.REPLICA or st.shard_id != shard.id:
            role = admin_pb2.NodeRole.Name(st.role).lower()
            problems.append(f"{address} reports itself as {role} of shard {st.shard_id or '?'}, not a replica of shard {shard.id}")
        elif best is None or st.revision > best[0]:
            best = (st.revision, address)
    if best is None:
        err = errors.UnavailableError if unreachable == len(candidates) else errors.FailedPreconditionError
        raise err(f"cannot promote in shard {shard.id}: {'; '.join(problems)}; nothing changed")
    return best[1]


async def promote(maps: MapHolder, nodes: NodePool, req: admin_pb2.PromoteReplicaRequest) -> admin_pb2.PromoteReplicaResponse:
    if not req.shard_id:
        raise errors.InvalidArgumentError("shard_id is required: the shard whose replica to promote")
    view = await maps.refresh()
    shard = view.shard(req.shard_id)
    if shard is None:
        known = ", ".join(s.id for s in view.pb.shards) or "none"
        raise errors.NotFoundError(f"no shard {req.shard_id!r} in the cluster map (epoch {view.epoch}; shards: {known})")
    chosen = await choose(nodes, shard, req.replica)
    old_primary = shard.primary
    try:
        done = await nodes.admin(chosen).PromoteReplica(
            admin_pb2.PromoteReplicaRequest(shard_id=shard.id, replica=chosen), timeout=PROMOTE_TIMEOUT_S,
            wait_for_ready=True)
    except grpc.RpcError as e:
        raise errors.from_rpc_error(e) from None
    log.warning("promoted replica", extra=fields(shard=shard.id, new_primary=chosen, old_primary=old_primary,
                                                 revision=done.revision))
    try:
        await maps.change(lambda pb: promote_in(pb, shard.id, chosen), also=[old_primary])
    except errors.ShardstateError as e:
        raise type(e)(
            f"{chosen} was promoted to primary of shard {shard.id}, but the cluster map could not "
            f"name it: {e.message.removesuffix('; nothing changed')}; run the same promote again to "
            "finish it") from None
    return admin_pb2.PromoteReplicaResponse(cluster_map=maps.view.pb, new_primary=chosen, revision=done.revision)
