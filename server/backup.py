"""A shard's side of backups: Admin.Backup streams one consistent snapshot of its data
(`engine.snapshot`, the one replica catch-up uses); Admin.Restore installs one into an empty shard.

The snapshot point is `_|revision` inside the LevelDB snapshot: every write with a revision up
to it is in the backup and none above (docs/design.md §13); only sessions the shard owns under
its map are in, and no backup is taken while a rebalance moves sessions. A restore keeps every key as it
was stored (versions, seqs, metas, idempotency records) and raises the revision clock to the
backup's revision; node meta `_|restoring` marks a restore under way, so one cut short (the
stream broke) may be run again and is not taken for data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from shardstate.common import errors
from shardstate.common.grpcserve import Malformed
from shardstate.v1 import admin_pb2

from .migration.keys import SessionFilter, session_of
from .node import Node
from .storage import snapshot
from .storage.engine import Engine
from .storage.revision import wall_ms

log = logging.getLogger("shardstate.backup")
RESTORING_META = "restoring"


class ShardBackup:
    def __init__(self, node: Node, engine: Engine) -> None:
        self.node = node
        self.engine = engine
        self.restoring = False  # a Restore stream is being applied in this process

    def _check_target(self, shard_id: str, what: str) -> None:
        node = self.node
        if not shard_id:
            raise errors.InvalidArgumentError(f"{what}: shard_id is required")
        if shard_id != node.shard_id:
            raise errors.FailedPreconditionError(
                f"{what}: this node ({node.address}) serves shard {node.shard_id!r}, not {shard_id!r}")
        if node.is_replica:
            raise errors.NotPrimaryError.of(node.primary, node.shard_id)

    async def backup(self, req: admin_pb2.BackupRequest, context: Any) -> AsyncIterator[admin_pb2.BackupChunk]:
        try:
            self._check_target(req.shard_id, "Backup")
            node = self.node
            # No await between the epoch check and the snapshot: both see the same map.
            if req.epoch and req.epoch != node.epoch:
                raise errors.FailedPreconditionError(
                    f"Backup: shard {node.shard_id} holds cluster map epoch {node.epoch}, the backup is "
                    f"taken at epoch {req.epoch}: the map changed; run the backup again")
            moving = node.view.pb.migrations
            if moving:
                pairs = ", ".join(f"{m.source} -> {m.target}" for m in moving)
                raise errors.FailedPreconditionError(
                    f"Backup: a rebalance is under way at map epoch {node.epoch} ({pairs}); back up "
                    "once it has ended")
            keep = owned_by(node)
            snap = self.engine.snapshot()
        except Exception as e:
            await errors.abort(context, e)
        try:
            counts = await asyncio.to_thread(snap.count, keep)
            header = admin_pb2.BackupHeader(
                shard_id=node.shard_id, node=node.address, revision=snap.revision, epoch=node.epoch,
                taken_at_ms=wall_ms(), counts=admin_pb2.BackupCounts(**counts))
            log.info("backup started", extra={"fields": {"revision": snap.revision, "entries": counts["entries"]}})
            yield admin_pb2.BackupChunk(header=header)
            it = (kv for kv in snap if keep(kv[0]))
            first = True
            while True:
                chunk, done = await asyncio.to_thread(snapshot.take, it)
                chunk.first, first = first, False
                if done:
                    chunk.last = True
                    chunk.revision = snap.revision
                yield admin_pb2.BackupChunk(snapshot=chunk)
                if done:
                    break
            log.info("backup streamed", extra={"fields": {"revision": snap.revision}})
        finally:
            snap.close()

    async def restore(self, requests: AsyncIterator[Any], context: Any) -> admin_pb2.RestoreResponse:
        try:
            return await self._restore(requests)
        except Exception as e:
            await errors.abort(context, e)
            raise  # unreachable: abort raises

    async def _restore(self, requests: AsyncIterator[Any]) -> admin_pb2.RestoreResponse:
        it = aiter(requests)
        first = await _next(it, "the first message must carry the backup's header")
        if first is None or not first.HasField("header"):
            raise errors.InvalidArgumentError("Restore: the first message must carry the backup's header")
        header = first.header
        self._check_target(header.shard_id, "Restore")
        if self.restoring:
            raise errors.FailedPreconditionError(
                f"Restore: shard {header.shard_id} is already taking a restore; wait for it to finish")
        engine, node = self.engine, self.node
        if not engine.node_meta(RESTORING_META) and await asyncio.to_thread(snapshot.holds_data, engine.store):
            raise errors.FailedPreconditionError(await self._holds(header.shard_id))
        self.restoring = True
        try:
            engine.set_node_meta(RESTORING_META, b"1")
            log.info("restore started", extra={"fields": {"revision": header.revision,
                                                          "entries": header.counts.entries}})
            written, last, started = 0, False, False
            while not last:
                msg = await _next(it, "")
                if msg is None:
                    raise errors.InvalidArgumentError(
                        f"Restore: the stream ended after {written} of {header.counts.entries} entries, "
                        "before the last chunk; the shard keeps what it got marked as a restore under "
                        "way: run the restore again")
                chunk = msg.snapshot
                if chunk.first != (not started):
                    raise errors.InvalidArgumentError(
                        "Restore: chunks out of order (only the first data chunk carries first=true)")
                started, last = True, chunk.last
                ops = [(op.key, None if op.delete else op.value) for op in chunk.ops]
                engine.install_snapshot_chunk(ops, chunk.first, None)
                written += len(ops)
                await asyncio.sleep(0)  # let other calls in between chunks
            if written != header.counts.entries:
                raise errors.InvalidArgumentError(
                    f"Restore: the backup's header counts {header.counts.entries} entries, the stream "
                    f"carried {written}; the backup is damaged (the shard keeps a restore under way)")
            # Above every restored version, and above anything this node handed out meanwhile.
            revision = max(header.revision, engine.revision())
            engine.install_snapshot_chunk([], False, revision)
            engine.set_node_meta(RESTORING_META, b"")
        finally:
            self.restoring = False
        log.info("restore done", extra={"fields": {"revision": revision, "entries": written}})
        return admin_pb2.RestoreResponse(shard_id=node.shard_id, node=node.address,
                                         revision=engine.revision(), entries=written)

    async def _holds(self, shard_id: str) -> str:
        """What a shard that refuses a restore holds, in words."""
        sessions, keys = await asyncio.to_thread(self.engine.count_sessions)
        return (f"Restore: shard {shard_id} on {self.node.address} is not empty: it holds {sessions} "
                f"live sessions and {keys} keys (revision {self.engine.revision()}); a restore needs "
                "a fresh cluster: start its shards on empty data directories")


def owned_by(node: Node) -> Callable[[bytes], bool]:
    """Does a stored key belong in this shard's backup? Not when its session is another
    shard's under the node's map: a shard keeps sessions that moved away for
    `--moved-data-grace-s` (docs/design.md §6), and they are backed up where they live now."""
    view, me = node.view, node.shard_id
    ring = view.ring if view.epoch else None
    if ring is None:
        return lambda key: True
    pick = SessionFilter(lambda ns, sid: ring.owner(ns, sid) == me)

    def keep(key: bytes) -> bool:
        s = session_of(key)
        return s is None or pick.session(*s)

    return keep


async def _next(it: AsyncIterator[Any], missing: str) -> Any:
    """The next message, None at the end; a message that does not parse is INVALID_ARGUMENT."""
    try:
        msg = await anext(it)
    except StopAsyncIteration:
        if missing:
            raise errors.InvalidArgumentError(f"Restore: {missing}") from None
        return None
    if type(msg) is Malformed:
        raise msg.error()
    return msg
