"""The follower side: one stream to the primary, reconnecting with backoff forever; checks the
leader's timeline, installs snapshots, applies change batches in one WriteBatch each, acks.

Node meta `_|resync` = b"1" while this node's data cannot be trusted as a prefix of the
leader's (a snapshot is half installed, or diverged writes were set aside): the next stream
asks for a full snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc import aio

from shardstate.common import authwire, errors, tls, tracing
from shardstate.common.transport import channel_options
from shardstate.v1 import replication_pb2

from ..node import Node
from ..storage.engine import Engine
from ..storage.revision import wall_ms
from . import timeline, wire

log = logging.getLogger("shardstate.replication.follower")

RESYNC_META = "resync"
DEAD_AFTER_S = 3.0  # no message (heartbeats come every 0.5 s) for this long: the stream is dead
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
# When the leader says it waits for no ack (ChangeBatch.ack_lazily), ack at most this often.
LAZY_ACK_S = 0.1
# Messages between nodes are bounded by their senders (change batches, snapshot chunks).
CHANNEL_OPTIONS = channel_options(-1, [("grpc.enable_retries", 0)])


class Diverged(Exception):
    """This node holds writes the leader never received, above `fork`."""

    def __init__(self, fork: int) -> None:
        super().__init__(f"diverged after revision {fork}")
        self.fork = fork


class Follower:
    def __init__(self, node: Node, engine: Engine, target: str,
                 set_aside: Callable[[int, str], Awaitable[None]],
                 resynced: Callable[[], None] | None = None) -> None:
        self.node = node
        self.engine = engine
        self.target = target
        self.set_aside = set_aside
        self.resynced = resynced  # called once a full snapshot is installed
        self.synced = asyncio.Event()  # the first full catch-up since start
        self.connected = False
        self.leader_revision = 0  # highest revision the leader told us about
        self.backlog = 0
        self.applied_ts_ms = 0  # leader write time of the last applied entry
        self.last_contact_ms = 0
        self.error = ""
        self._ack_lazily = False  # the leader's last ChangeBatch.ack_lazily
        self._traced: list[tuple[int, str, int]] = []  # (revision, traceparent, arrival ns) until acked
        self._resync = False  # node meta _|resync is b"1" (read at stream start, kept by _install)
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle ----

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self.connected = False

    async def retarget(self, target: str) -> None:
        """Follow another primary: the current stream ends, the loop reconnects there."""
        if target == self.target:
            return
        log.info("following a new primary", extra={"fields": {"old": self.target, "new": target}})
        running = self._task is not None
        await self.stop()
        self.target = target
        if running:
            self.start()

    # ---- lag ----

    def lag(self) -> tuple[int, int]:
        """(revisions, ms) behind the leader as last heard; ms grows while disconnected."""
        applied = self.engine.revision()
        now = wall_ms()
        behind = 0 if applied >= self.leader_revision else max(self.backlog, 1)
        lag_ms = max(0, now - self.applied_ts_ms) if behind and self.applied_ts_ms else 0
        if not self.connected and self.last_contact_ms:
            lag_ms = max(lag_ms, now - self.last_contact_ms)
        return behind, lag_ms

    # ---- the loop ----

    async def run(self) -> None:
        backoff = BACKOFF_MIN_S
        channel: aio.Channel | None = None
        target = ""
        try:
            while True:
                if channel is None or target != self.target:
                    if channel is not None:
                        await channel.close()
                    target = self.target
                    channel = tls.aio_channel(target, CHANNEL_OPTIONS)
                try:
                    await self._stream(authwire.node_channel(channel))
                    backoff = BACKOFF_MIN_S
                except Diverged as d:
                    await self.set_aside(d.fork, target)
                    backoff = BACKOFF_MIN_S
                    continue
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        raise  # this follower is being stopped
                    # The watchdog cancelled a silent stream's call (its pending read raises
                    # CancelledError): the primary stopped answering; reconnect like any failure.
                    self.error = f"{target}: no message from the primary for {DEAD_AFTER_S:g}s"
                except grpc.RpcError as e:
                    err = errors.from_rpc_error(e)
                    self.error = f"{target}: {err.code.name} {err.message}"
                    hint = err.detail.primary if isinstance(err, errors.NotPrimaryError) else ""
                    if hint and hint != self.node.address and hint != target:
                        # Told to follow a node that is not the primary: follow the one it names.
                        log.info("redirected to the primary", extra={"fields": {"from": target, "to": hint}})
                        self.target = self.node.primary = hint
                except Exception as e:
                    self.error = f"{target}: {e}"
                    log.exception("replication stream failed", extra={"fields": {"primary": target}})
                finally:
                    if self.connected:
                        self.last_contact_ms = wall_ms()
                    self.connected = False
                if self.error:
                    log.info("replication stream ended", extra={"fields": {"primary": target, "error": self.error}})
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            if channel is not None:
                await channel.close()

    async def _read(self, call: aio.StreamStreamCall) -> replication_pb2.LeaderMessageRaw | None:
        msg = await call.read()
        if msg is aio.EOF:
            return None
        self.last_contact_ms = wall_ms()
        return msg  # type: ignore[no-any-return]

    async def _watchdog(self, call: aio.StreamStreamCall) -> None:
        """Heartbeats come every 0.5 s: a silent stream is a dead primary (or network)."""
        while True:
            await asyncio.sleep(DEAD_AFTER_S / 3)
            if wall_ms() - self.last_contact_ms > DEAD_AFTER_S * 1000:
                call.cancel()
                return

    async def _acker(self, call: aio.StreamStreamCall, wanted: asyncio.Event) -> None:
        """Sends the applied revision whenever it moved; while one ack is on the wire, later
        batches fold into the next one (a busy follower acks less often, never later)."""
        engine = self.engine
        sent = 0
        while True:
            await wanted.wait()
            wanted.clear()
            rev = engine.revision()
            if rev != sent or not rev:
                await call.write(replication_pb2.FollowerMessage(ack=replication_pb2.FollowAck(applied_revision=rev)))
                sent = rev
                if self._traced:
                    self._end_traced(rev)
                if self._ack_lazily:
                    await asyncio.sleep(LAZY_ACK_S)  # what arrives meanwhile folds into the next ack

    def _end_traced(self, acked: int) -> None:
        """Traced writes up to `acked`: a span from their batch's arrival to the ack."""
        keep = []
        for revision, traceparent, start_ns in self._traced:
            if revision <= acked:
                tracing.ended_span("replica apply", traceparent, start_ns, revision=revision,
                                   replica=self.node.address)
            else:
                keep.append((revision, traceparent, start_ns))
        self._traced = keep

    async def _stream(self, channel: aio.Channel) -> None:
        engine, node = self.engine, self.node
        # Change entries arrive as their raw bytes (LeaderMessageRaw): stored verbatim, and
        # only their ops are decoded (storage/changelog.replica_pending).
        call = channel.stream_stream(
            wire.FOLLOW_METHOD, request_serializer=replication_pb2.FollowerMessage.SerializeToString,
            response_deserializer=replication_pb2.LeaderMessageRaw.FromString,
        )()
        self.last_contact_ms = wall_ms()
        helpers: list[asyncio.Task[None]] = [asyncio.create_task(self._watchdog(call))]
        try:
            resync = self._resync = engine.node_meta(RESYNC_META) == b"1"
            mine = timeline.load(engine)
            applied = engine.revision()
            await call.write(replication_pb2.FollowerMessage(hello=replication_pb2.FollowHello(
                follower_id=node.address, from_revision=applied + 1, shard_id=node.shard_id,
                term=timeline.tail(mine), resync=resync,
            )))
            first = await self._read(call)
            if first is None or first.WhichOneof("msg") != "timeline":
                raise RuntimeError("the primary did not open the stream with its timeline")
            hb = await self._read(call)
            if hb is None or hb.WhichOneof("msg") != "heartbeat":
                raise RuntimeError("the primary did not send its revision after its timeline")
            if not resync:
                fork = timeline.fork_point(first.timeline, timeline.tail(mine), applied)
                if fork is None and applied > hb.heartbeat.leader_revision:
                    fork = hb.heartbeat.leader_revision  # same term, but ahead of the leader
                if fork is not None:
                    node.readable = False
                    raise Diverged(fork)
            timeline.save(engine, first.timeline)
            self.connected = True
            self.error = ""
            self._heard(hb.heartbeat)
            log.info("following", extra={"fields": {"primary": self.target, "applied": applied,
                                                    "leader_revision": hb.heartbeat.leader_revision, "resync": resync}})
            ack = asyncio.Event()
            self._ack_lazily = False
            acker = asyncio.create_task(self._acker(call, ack))
            helpers.append(acker)
            while True:
                if acker.done():
                    acker.result()  # the ack stream broke: raise why

                msg = await self._read(call)
                if msg is None:
                    raise RuntimeError("the primary ended the stream")
                kind = msg.WhichOneof("msg")
                if kind == "changes":
                    b = msg.changes
                    self._ack_lazily = b.ack_lazily
                    entries = b.entries
                    if b.traces and tracing.ON:
                        now = time.time_ns()
                        self._traced.extend((t.revision, t.traceparent, now) for t in b.traces)
                    if entries:
                        await engine.apply_changes(entries)
                        self.applied_ts_ms = replication_pb2.ChangeEntryOps.FromString(entries[-1]).ts_ms
                    self._heard(b)
                elif kind == "heartbeat":
                    self._heard(msg.heartbeat)
                elif kind == "snapshot":
                    self._install(msg.snapshot)
                    if not msg.snapshot.last:
                        continue
                else:
                    continue
                ack.set()
        finally:
            for t in helpers:
                t.cancel()
            call.cancel()

    def _heard(self, b: replication_pb2.ChangeBatchRaw) -> None:
        self.leader_revision = max(self.leader_revision, b.leader_revision)
        self.backlog = b.backlog
        if self.engine.revision() >= b.leader_revision and not self._resync:
            self.node.readable = True
            if not self.synced.is_set():
                log.info("caught up with the primary", extra={"fields": {"revision": self.engine.revision()}})
                self.synced.set()

    def _install(self, chunk: replication_pb2.SnapshotChunk) -> None:
        engine = self.engine
        if chunk.first:
            self.node.readable = False
            engine.set_node_meta(RESYNC_META, b"1")
            self._resync = True
            log.info("installing a snapshot from the primary", extra={"fields": {"primary": self.target}})
        ops = [(op.key, None if op.delete else op.value) for op in chunk.ops]
        engine.install_snapshot_chunk(ops, chunk.first, chunk.revision if chunk.last else None)
        if chunk.last:
            engine.set_node_meta(RESYNC_META, b"")
            self._resync = False
            log.info("snapshot installed", extra={"fields": {"revision": chunk.revision}})
            self._heard(replication_pb2.ChangeBatchRaw(leader_revision=chunk.revision))
            if self.resynced is not None:
                self.resynced()
