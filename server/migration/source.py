"""The source side of a migration: a Follow stream with a filter (FollowHello.filter_owner /
filter_map) sends the target a consistent snapshot of the sessions moving to it, then the
change-log entries of those sessions, as replication does for a whole shard (docs/design.md
§6.4). Batches carry the revision the stream is complete through, so the target knows its
position even when nothing of its sessions changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from shardstate.common import errors
from shardstate.common.rebalance import Move
from shardstate.v1 import admin_pb2, replication_pb2

from ..node import Node
from ..replication import timeline, wire
from ..replication.leader import (
    BATCH,
    COALESCE_S,
    HEARTBEAT_S,
        SNAPSHOT_CHUNK_BYTES,
    SNAPSHOT_CHUNK_OPS,
    needed_from,
)
from ..storage import encoding as enc
from ..storage.engine import Engine
from ..storage.revision import wall_ms
from ..storage.snapshot import Snapshot
from .keys import SessionFilter, session_of

log = logging.getLogger("shardstate.migration.source")


@dataclass
class TargetInfo:
    id: str
    acked: int = 0
    hold_from: int = 0
    connected: bool = False
    last_seen: float = 0.0
    conn: int = 0


def _take(it: Iterator[tuple[bytes, bytes]], pick: SessionFilter,
          seen: set[tuple[bytes, bytes]]) -> tuple[replication_pb2.SnapshotChunk, bool]:
    """The next chunk of the sessions `pick` takes; `chunk.sessions` counts those met for the
    first time (keys sort by family, then session: most sessions are met in their first family)."""
    chunk = replication_pb2.SnapshotChunk()
    size = sessions = 0
    for k, v in it:
        s = session_of(k)
        if s is None or not pick.session(*s):
            continue
        chunk.ops.add(key=k, value=v)
        size += len(k) + len(v)
        if s not in seen:
            seen.add(s)
            sessions += 1
        if len(chunk.ops) >= SNAPSHOT_CHUNK_OPS or size >= SNAPSHOT_CHUNK_BYTES:
            chunk.sessions = sessions
            return chunk, False
    chunk.sessions = sessions
    return chunk, True


def _count(snap: Snapshot, pick: SessionFilter) -> int:
    return sum(1 for k in snap.keys(enc.META) if pick.pick(k))


class Source:
    def __init__(self, node: Node, engine: Engine, rate_bytes_s: int = 0) -> None:
        self.node = node
        self.engine = engine
        self.rate_bytes_s = rate_bytes_s
        self.targets: dict[str, TargetInfo] = {}
        self.generation = 0

    def hold(self) -> int:
        """Lowest revision a migration target still needs (0 = none)."""
        return needed_from(self.targets.values())

    def end_streams(self) -> None:
        self.generation += 1
        self.engine.wake_waiters()

    def _check(self, hello: replication_pb2.FollowHello) -> tuple[admin_pb2.ClusterMap, Move]:
        node = self.node
        try:
            pb = admin_pb2.ClusterMap.FromString(hello.filter_map)
        except Exception:
            raise errors.InvalidArgumentError("Follow: filter_map is not a ClusterMap") from None
        if node.is_replica:
            raise errors.NotPrimaryError.of(node.primary, node.shard_id)
        if not any(m.source == node.shard_id and m.target == hello.filter_owner for m in pb.migrations):
            raise errors.FailedPreconditionError(
                f"the rebalance at epoch {pb.epoch} moves nothing from shard {node.shard_id} to {hello.filter_owner!r}")
        if pb.epoch > node.epoch:
            node.adopt(pb)  # a map the keeper swapped in; this node had not heard of it yet
        held = node.view.pb
        if not held.migrations or held.migrations[0].started_epoch != pb.migrations[0].started_epoch:
            raise errors.FailedPreconditionError(
                f"the rebalance started at epoch {pb.migrations[0].started_epoch} is not running here "
                f"(this node holds epoch {held.epoch})")
        return pb, Move.of(pb)

    async def stream(self, hello: replication_pb2.FollowHello, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[bytes]:
        try:
            _, move = self._check(hello)
        except errors.ShardstateError as e:
            await errors.abort(context, e)
            return
        engine, node = self.engine, self.node
        src, dst = node.shard_id, hello.filter_owner
        pick = SessionFilter(lambda ns, sid: move.moves(src, dst, ns, sid))
        info = self.targets.get(dst) or TargetInfo(dst)
        self.targets[dst] = info
        info.conn += 1
        conn, gen = info.conn, self.generation
        info.connected, info.last_seen = True, time.monotonic()
        reader = asyncio.create_task(self._acks(requests, info, conn))
        rev0 = engine.revision()
        log.info("migration target connected", extra={"fields": {
            "target": dst, "from_revision": hello.from_revision, "resync": hello.resync, "revision": rev0}})
        try:
            yield bytes(replication_pb2.LeaderMessage(epoch=node.epoch, timeline=timeline.load(engine)).SerializeToString())
            yield wire.leader_message(wire.HEARTBEAT, wire.change_batch((), rev0, wall_ms()), node.epoch)
            start = hello.from_revision
            if hello.resync or not start or start < engine.oldest_revision():
                snap = engine.snapshot()
                info.hold_from = snap.revision + 1
                try:
                    total = await asyncio.to_thread(_count, snap, pick)
                    it = iter(snap)
                    first = True
                    sent, began = 0, time.monotonic()
                    seen: set[tuple[bytes, bytes]] = set()
                    while gen == self.generation:
                        chunk, done = await asyncio.to_thread(_take, it, pick, seen)
                        chunk.first = first
                        if first:
                            chunk.sessions_total = total
                        if done:
                            chunk.last, chunk.revision = True, snap.revision
                        first = False
                        msg = bytes(replication_pb2.LeaderMessage(epoch=node.epoch, snapshot=chunk).SerializeToString())
                        yield msg
                        if done:
                            break
                        sent += len(msg)
                        if self.rate_bytes_s:  # --migration-rate-bytes-s
                            ahead = sent / self.rate_bytes_s - (time.monotonic() - began)
                            if ahead > 0:
                                await asyncio.sleep(ahead)
                finally:
                    snap.close()
                start = snap.revision + 1
            async for msg in self._changes(start, gen, pick):
                yield msg
            await errors.abort(context, errors.UnavailableError("the migration source is stopping or no longer primary; retry"))
        except errors.HistoryCompactedError as e:
            await errors.abort(context, e)
        finally:
            reader.cancel()
            if info.conn == conn:
                info.connected, info.hold_from, info.last_seen = False, 0, time.monotonic()

    async def _acks(self, requests: AsyncIterator[Any], info: TargetInfo, conn: int) -> None:
        try:
            async for msg in requests:
                if msg is None or msg.WhichOneof("msg") != "ack" or info.conn != conn:
                    continue
                info.last_seen = time.monotonic()
                info.acked = max(info.acked, msg.ack.applied_revision)
                if info.hold_from and info.acked >= info.hold_from - 1:
                    info.hold_from = 0
        except (asyncio.CancelledError, Exception):
            pass

    async def _changes(self, start: int, gen: int, pick: SessionFilter) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        engine, node = self.engine, self.node
        view = replication_pb2.ChangeEntrySession.FromString
        last_sent = loop.time()
        while gen == self.generation and not node.is_replica:
            leader_rev = engine.revision()
            batch = engine.changes_since_raw(start, BATCH)
            if batch:
                picked = []
                for _, raw in batch:
                    e = view(raw)
                    if e.session_id and pick.session(e.namespace.encode(), e.session_id.encode()):
                        picked.append(raw)
                # Complete through: everything up to leader_rev is in a batch that is not full.
                through = batch[-1][0] if len(batch) >= BATCH else max(leader_rev, batch[-1][0])
                yield wire.leader_message(wire.CHANGES, wire.change_batch(picked, through, wall_ms()), node.epoch)
                start = batch[-1][0] + 1
                last_sent = loop.time()
                if len(batch) < BATCH:
                    await asyncio.sleep(COALESCE_S)
                continue
            now = loop.time()
            if now - last_sent >= HEARTBEAT_S:
                yield wire.leader_message(wire.HEARTBEAT, wire.change_batch((), leader_rev, wall_ms()), node.epoch)
                last_sent = now
                continue
            await engine.wait_for_change(max(0.0, HEARTBEAT_S - (now - last_sent)))
