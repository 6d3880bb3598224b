"""The leader side of `Replication.Follow`: per follower, the timeline, a consistent snapshot
when it is behind the retained change log, then change batches as they commit, heartbeats
when idle; acks feed semi-sync waiters, lag figures and change-log retention.

Batches are built from the change log's stored bytes (wire.py): the leader never parses them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from shardstate.common import errors, tracing
from shardstate.v1 import admin_pb2, replication_pb2

from .. import tracerefs
from ..node import Node
from ..storage import changelog, snapshot
from ..storage import encoding as enc
from ..storage.engine import Engine
from ..storage.revision import wall_ms
from . import timeline, wire
from .acks import AckTracker

log = logging.getLogger("shardstate.replication.leader")

BATCH = 256  # entries per ChangeBatch
HEARTBEAT_S = 0.5
# Without semi-sync (--min-replica-acks 0), batches to a follower go out at most this often: what commits
# meanwhile rides in the next one, so a busy primary sends (and its follower applies and acks)
# a few large batches instead of one per commit. Lag grows by at most this much.
COALESCE_S = 0.025
HELLO_TIMEOUT_S = 10.0
SNAPSHOT_CHUNK_OPS = snapshot.CHUNK_OPS  # the migration source's chunks follow them too
SNAPSHOT_CHUNK_BYTES = snapshot.CHUNK_BYTES
BACKLOG_CAP = 10_000  # counting the backlog stops here (lag figures, not control)
BACKLOG_EVERY_S = 0.25
HOLD_GRACE_S = 300.0  # a disconnected follower keeps the log from being trimmed this long
HOLD_MAX_FACTOR = 10  # ... unless the log grew past this many times its retention


@dataclass
class FollowerInfo:
    id: str
    acked: int = 0
    conn: int = 0  # connection counter: only the newest stream of a follower updates state
    connected: bool = False
    last_seen: float = 0.0  # monotonic
    hold_from: int = 0  # while a snapshot streams: its revision + 1
    caught_up: bool = False


def needed_from(streams: Iterable[Any]) -> int:
    """Lowest revision any of these streams (followers, migration targets: `acked`,
    `hold_from`, `connected`, `last_seen`) still needs from the change log; 0 = none. One
    disconnected longer than HOLD_GRACE_S holds nothing."""
    now = time.monotonic()
    need = 0
    for f in streams:
        if not f.connected and now - f.last_seen > HOLD_GRACE_S:
            continue
        want = f.hold_from or f.acked + 1
        need = want if not need else min(need, want)
    return need


class Leader:
    def __init__(self, node: Node, engine: Engine, acks: AckTracker,
                 on_caught_up: Callable[[str], None]) -> None:
        self.node = node
        self.engine = engine
        self.acks = acks
        self.on_caught_up = on_caught_up
        self.followers: dict[str, FollowerInfo] = {}
        self.generation = 0  # bumped to end every stream (demotion, shutdown)
        self.closing = False
        # Serves a Follow with a migration filter (shardstate.server.migration.source).
        self.mover: Callable[[replication_pb2.FollowHello, AsyncIterator[Any], Any], AsyncIterator[bytes]] | None = None
        m = node.metrics
        self.batches_sent = m.counter("shardstate_replication_batches_sent_total",
                                      "change batches streamed to a replica", ("replica",))
        self.entries_sent = m.counter("shardstate_replication_entries_sent_total",
                                      "change-log entries streamed to a replica", ("replica",))

    # ---- retention and status ----

    def hold(self) -> int:
        """Lowest revision a follower still needs (0 = none): the change-log trim keeps it."""
        store = self.engine.store
        if store.change_count > HOLD_MAX_FACTOR * self.engine.config.changelog_retention:
            return 0  # beyond reason: a follower this far behind gets a snapshot instead
        return needed_from(self.followers.values())

    def end_streams(self) -> None:
        """Every open Follow stream ends (the node is no longer primary, or is stopping)."""
        self.generation += 1
        self.followers.clear()
        changelog.keep_tail(self.engine.store, False)
        self.engine.wake_waiters()

    def count_after(self, revision: int, cap: int = BACKLOG_CAP) -> int:
        n = 0
        for _ in self.engine.store.db.iterator(start=enc.change_key(revision + 1), stop=enc.CHANGE_END,
                                               include_value=False):
            n += 1
            if n >= cap:
                break
        return n

    def statuses(self) -> list[admin_pb2.NodeStatus]:
        """One line per follower as this leader sees it: acked revision and lag."""
        out = []
        committed = self.engine.revision()
        now = wall_ms()
        for f in sorted(self.followers.values(), key=lambda f: f.id):
            lag = self.count_after(f.acked) if f.acked < committed else 0
            lag_ms = 0
            if lag:
                nxt = self.engine.store.db.iterator(start=enc.change_key(f.acked + 1), stop=enc.CHANGE_END)
                for _, raw in nxt:
                    lag_ms = max(0, now - replication_pb2.ChangeEntry.FromString(raw).ts_ms)
                    break
            out.append(admin_pb2.NodeStatus(
                address=f.id, role=admin_pb2.REPLICA, shard_id=self.node.shard_id, up=f.connected,
                error="" if f.connected else "not connected to the primary",
                revision=f.acked, epoch=self.node.epoch, lag_revisions=lag, lag_ms=lag_ms,
                primary=self.node.address, serving=f.caught_up,
            ))
        return out

    # ---- the stream ----

    def handler(self) -> grpc.GenericRpcHandler:
        def parse(data: bytes) -> Any:
            try:
                return replication_pb2.FollowerMessage.FromString(data)
            except Exception:
                return None

        method = grpc.stream_stream_rpc_method_handler(self.follow, request_deserializer=parse)
        return grpc.method_handlers_generic_handler(wire.SERVICE, {"Follow": method})

    def _msg(self, **kw: Any) -> bytes:
        return bytes(replication_pb2.LeaderMessage(epoch=self.node.epoch, **kw).SerializeToString())

    async def follow(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[bytes]:
        it = requests.__aiter__()
        try:
            first = await asyncio.wait_for(it.__anext__(), HELLO_TIMEOUT_S)
        except (StopAsyncIteration, TimeoutError):
            await errors.abort(context, errors.InvalidArgumentError("Follow: send a hello first"))
            return
        if first is None or first.WhichOneof("msg") != "hello":
            await errors.abort(context, errors.InvalidArgumentError("Follow: the first message must be a hello"))
            return
        hello = first.hello
        if hello.filter_owner or hello.filter_map:  # a rebalance's target, not a replica
            if self.mover is None:
                await errors.abort(context, errors.UnimplementedError("this node serves no migration streams"))
                return
            async for msg in self.mover(hello, it, context):
                yield msg
            return
        try:
            self._check_hello(hello)
        except errors.ShardstateError as e:
            await errors.abort(context, e)
            return
        gen = self.generation
        changelog.keep_tail(self.engine.store, True)  # batches come from memory once caught up
        info = self.followers.get(hello.follower_id) or FollowerInfo(hello.follower_id)
        self.followers[info.id] = info
        info.conn += 1
        conn = info.conn
        info.connected = True
        info.caught_up = False
        info.last_seen = time.monotonic()
        rev0 = self.engine.revision()
        reader = asyncio.create_task(self._read_acks(it, info, conn, rev0))
        log.info("follower connected", extra={"fields": {
            "follower": info.id, "from_revision": hello.from_revision, "resync": hello.resync,
            "revision": rev0,
        }})
        try:
            yield self._msg(timeline=timeline.load(self.engine))
            yield wire.leader_message(wire.HEARTBEAT, wire.change_batch((), rev0, wall_ms()), self.node.epoch)
            start = max(1, hello.from_revision)
            if hello.resync or start < self.engine.oldest_revision():
                snap_rev: list[int] = []
                async for chunk in self._snapshot(info, snap_rev):
                    yield chunk
                    if gen != self.generation:
                        break
                start = snap_rev[0] + 1
            try:
                async for msg in self._changes(start, gen, info):
                    yield msg
            except errors.HistoryCompactedError as e:  # fell behind retention: reconnect for a snapshot
                await errors.abort(context, e)
            await errors.abort(context, errors.UnavailableError(
                "this node is no longer the primary of the shard, or is shutting down; follow the primary the cluster map names"
            ))
        finally:
            reader.cancel()
            if info.conn == conn:
                info.connected = False
                info.hold_from = 0
                info.last_seen = time.monotonic()
            log.info("follower disconnected", extra={"fields": {
                "follower": info.id, "acked": info.acked, "batches_sent": self.batches_sent.value(replica=info.id),
                "entries_sent": self.entries_sent.value(replica=info.id)}})

    def _check_hello(self, hello: replication_pb2.FollowHello) -> None:
        node = self.node
        if hello.shard_id and hello.shard_id != node.shard_id:
            raise errors.FailedPreconditionError(
                f"this node serves shard {node.shard_id!r}, not {hello.shard_id!r}: a replica follows its own shard's primary"
            )
        if not hello.follower_id:
            raise errors.InvalidArgumentError("Follow: hello.follower_id (the follower's address) is required")
        if hello.follower_id == node.address:
            raise errors.InvalidArgumentError("Follow: a node cannot follow itself")
        if self.closing:
            raise errors.UnavailableError("shard is shutting down; retry on another node or later")
        if node.is_replica:
            raise errors.NotPrimaryError.of(node.primary, node.shard_id)

    async def _read_acks(self, it: AsyncIterator[Any], info: FollowerInfo, conn: int, rev0: int) -> None:
        try:
            async for msg in it:
                if msg is None or msg.WhichOneof("msg") != "ack" or info.conn != conn:
                    continue
                rev = msg.ack.applied_revision
                info.last_seen = time.monotonic()
                if rev > info.acked:
                    info.acked = rev
                    self.acks.ack(info.id, rev)
                if info.hold_from and rev >= info.hold_from - 1:
                    info.hold_from = 0
                if not info.caught_up and rev >= rev0:
                    info.caught_up = True
                    self.on_caught_up(info.id)
        except (asyncio.CancelledError, grpc.RpcError):
            pass
        except Exception:
            log.exception("reading follower acks failed", extra={"fields": {"follower": info.id}})

    async def _snapshot(self, info: FollowerInfo, revision: list[int]) -> AsyncIterator[bytes]:
        snap = self.engine.snapshot()
        revision.append(snap.revision)
        try:
            info.hold_from = snap.revision + 1
            log.info("streaming snapshot", extra={"fields": {"follower": info.id, "revision": snap.revision}})
            it = iter(snap)
            first = True
            while True:
                chunk, done = await asyncio.to_thread(snapshot.take, it)
                chunk.first = first
                if done:
                    chunk.last = True
                    chunk.revision = snap.revision
                first = False
                yield self._msg(snapshot=chunk)
                if done:
                    break
        finally:
            snap.close()

    async def _changes(self, start: int, gen: int, info: FollowerInfo) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        engine = self.engine
        last_sent = loop.time()
        backlog, backlog_at = 0, 0.0
        while gen == self.generation and not self.closing:
            leader_rev = engine.revision()
            batch = engine.changes_since_raw(start, BATCH)  # HistoryCompacted: the follower reconnects
            now = loop.time()
            if batch:
                if len(batch) < BATCH:
                    backlog = 0
                elif now - backlog_at >= BACKLOG_EVERY_S:
                    backlog, backlog_at = self.count_after(batch[-1][0]), now
                else:
                    backlog = max(0, backlog - len(batch))
                lazy = self.acks.need <= 0 and info.caught_up and not info.hold_from
                traces = tracerefs.between(batch[0][0], batch[-1][0]) if tracing.ON else ()
                body = wire.change_batch([raw for _, raw in batch], leader_rev, wall_ms(), backlog, lazy, traces)
                yield wire.leader_message(wire.CHANGES, body, self.node.epoch)
                self.batches_sent.inc(replica=info.id)
                self.entries_sent.inc(len(batch), replica=info.id)
                start = batch[-1][0] + 1
                last_sent = loop.time()
                if len(batch) < BATCH and self.acks.need <= 0 and not self.acks.waiting():
                    await asyncio.sleep(COALESCE_S)
                continue  # read again before waiting: commits during the send must not be missed
            if now - last_sent >= HEARTBEAT_S:
                body = wire.change_batch((), leader_rev, wall_ms())
                yield wire.leader_message(wire.HEARTBEAT, body, self.node.epoch)
                last_sent = loop.time()
                continue
            await engine.wait_for_change(max(0.0, HEARTBEAT_S - (now - last_sent)))
