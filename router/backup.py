"""The router's side of backups: Admin.Backup and Admin.Restore forwarded, one shard per call,
to the primary the cluster map names (docs/design.md §13).

The router only relays messages: the shard takes the snapshot and installs it, the admin CLI
writes and reads the files. An operator who can reach a router can so back up a cluster whose
shards it cannot reach itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from shardstate.common import errors
from shardstate.common.clustermap import ClusterView
from shardstate.common.grpcserve import Malformed
from shardstate.router.maps import MapHolder
from shardstate.router.nodes import NodePool
from shardstate.v1 import admin_pb2


def _primary(view: ClusterView, shard_id: str, what: str) -> str:
    if not shard_id:
        raise errors.InvalidArgumentError(
            f"{what}: shard_id is required (one call per shard; `shardstate admin backup` makes one for each)")
    shard = view.shard(shard_id)
    if shard is None:
        have = ", ".join(s.id for s in view.pb.shards) or "none"
        raise errors.NotFoundError(f"{what}: shard {shard_id!r} is not in the cluster map "
                                   f"(epoch {view.epoch}; shards: {have})")
    return shard.primary


def _shard_error(e: grpc.RpcError, primary: str, shard_id: str) -> errors.ShardstateError:
    err = errors.from_rpc_error(e)
    if isinstance(err, errors.TransientError):
        return type(err)(f"shard {shard_id}'s primary {primary} failed: {err.message}")
    return err


async def backup(maps: MapHolder, nodes: NodePool, req: admin_pb2.BackupRequest,
                 context: Any) -> AsyncIterator[admin_pb2.BackupChunk]:
    try:
        view = maps.view
        if req.epoch and view.epoch < req.epoch:
            view = await maps.refresh(req.epoch)
        primary = _primary(view, req.shard_id, "Backup")
    except Exception as e:
        await errors.abort(context, e)
    try:
        async for chunk in nodes.admin(primary).Backup(req):
            yield chunk
    except grpc.RpcError as e:
        await errors.abort(context, _shard_error(e, primary, req.shard_id))


async def restore(maps: MapHolder, nodes: NodePool, requests: AsyncIterator[Any],
                  context: Any) -> admin_pb2.RestoreResponse:
    bad: list[errors.ShardstateError] = []

    async def relay(first: admin_pb2.BackupChunk) -> AsyncIterator[admin_pb2.BackupChunk]:
        yield first
        async for msg in it:
            if type(msg) is Malformed:
                bad.append(msg.error())
                raise bad[-1]  # ends the shard's stream before its last chunk: it installs nothing whole
            yield msg

    try:
        it = aiter(requests)
        first = await anext(it, None)
        if type(first) is Malformed:
            raise first.error()
        if first is None or not first.HasField("header"):
            raise errors.InvalidArgumentError("Restore: the first message must carry the backup's header")
        head: admin_pb2.BackupChunk = first
        primary = _primary(maps.view, head.header.shard_id, "Restore")
    except Exception as e:
        await errors.abort(context, e)
    try:
        resp: admin_pb2.RestoreResponse = await nodes.admin(primary).Restore(relay(head))
        return resp
    except grpc.RpcError as e:
        await errors.abort(context, bad[0] if bad else _shard_error(e, primary, head.header.shard_id))
        raise  # unreachable: abort raises
