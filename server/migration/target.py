"""The target side of a migration (docs/design.md §6.4): one `Puller` per source shard follows
the source's primary with a filtered Follow stream, writes what it receives as its own writes
(replicas get it through their normal stream), and keeps its progress - the source revision it
is complete through - in node meta `_|migrate/<source>`, written in the same WriteBatch as the
data, so a restart resumes exactly where the data stops.

If the source's primary changed under a different history (a failover that lost writes the
target had copied), the pair starts again from a snapshot, after dropping what it copied.

The position the pair reports (MigrationStatus, which the hand-over waits on) is the one whose
copy the target's replicas acknowledged under --min-replica-acks (at once without it): a moved
session's acknowledged writes must survive a failover of its new owner too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

import grpc
from grpc import aio

from shardstate.common import authwire, errors, tls
from shardstate.common.rebalance import Move
from shardstate.common.transport import channel_options
from shardstate.v1 import admin_pb2, replication_pb2

from ..node import Node
from ..replication import timeline, wire
from ..storage import encoding as enc
from ..storage.engine import Engine
from ..storage.revision import wall_ms
from .keys import SessionFilter

log = logging.getLogger("shardstate.migration.target")

META_PREFIX = "migrate/"
DEAD_AFTER_S = 3.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.05, 2.0
PURGE_CHUNK = 2000
CHANNEL_OPTIONS = channel_options(-1, [("grpc.enable_retries", 0)])
Op = tuple[bytes, bytes | None]


@dataclass
class PairState:
    epoch: int = 0  # started_epoch of the rebalance
    term: str = ""  # the source's timeline tail when copying started
    position: int = 0  # source revision the copy is complete through
    snapshot_done: bool = False
    sessions_total: int = 0
    sessions_copied: int = 0
    size: int = 0  # bytes copied

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> PairState:
        if not raw:
            return cls()
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError):
            return cls()


class Restart(Exception):
    """The copy must start again from a snapshot."""


class Puller:
    def __init__(self, node: Node, engine: Engine, source: str, start_map: admin_pb2.ClusterMap,
                 acked: Callable[[], int] = lambda: 1 << 63) -> None:
        self.node = node
        self.engine = engine
        self.source = source
        self.map_bytes = start_map.SerializeToString()
        self.started_epoch = int(start_map.migrations[0].started_epoch)
        move = Move.of(start_map)
        me = node.shard_id
        self.pick = SessionFilter(lambda ns, sid: move.moves(source, me, ns, sid))
        self.meta_key = enc.node_key(META_PREFIX + source)
        st = PairState.decode(engine.node_meta(META_PREFIX + source))
        self.state = st if st.epoch == self.started_epoch else PairState(epoch=self.started_epoch)
        # Highest revision of this node that --min-replica-acks replicas acknowledged, and the
        # positions written since that they may not hold yet: (revision, position).
        self.acked = acked
        self._unacked: deque[tuple[int, int]] = deque()
        self._acked_position = 0
        self._written(engine.revision())
        self.source_revision = 0
        self.connected = False
        self.error = ""
        self._task: asyncio.Task[None] | None = None
        self._contact = 0

    # ---- status ----

    def _written(self, revision: int) -> None:
        """The copy is complete through state.position once this node's `revision` is on its replicas."""
        q = self._unacked
        if q and q[-1][0] >= revision:
            q[-1] = (q[-1][0], self.state.position)
        else:
            q.append((revision, self.state.position))
        self.position()

    def _reset(self) -> None:
        self._unacked.clear()
        self._acked_position = 0

    def position(self) -> int:
        """The source revision the copy is complete through on this node and its replicas."""
        top = self.acked()
        while self._unacked and self._unacked[0][0] <= top:
            self._acked_position = max(self._acked_position, self._unacked.popleft()[1])
        return self._acked_position

    def phase(self) -> str:
        if not self.state.snapshot_done:
            return "copying"
        return "caught_up" if self.position() >= self.source_revision else "tailing"

    def status(self) -> replication_pb2.PairStatus:
        s = self.state
        return replication_pb2.PairStatus(
            source=self.source, phase=self.phase(), sessions_total=s.sessions_total,
            sessions_copied=s.sessions_copied, bytes=s.size, position=self.position(),
            source_revision=self.source_revision, error=self.error, epoch=self.started_epoch)

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

    def _address(self) -> str:
        shard = self.node.view.shard(self.source)
        return shard.primary if shard is not None else ""

    async def run(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            address = self._address()
            if not address:
                self.error = f"shard {self.source} is not in the cluster map"
                await asyncio.sleep(1.0)
                continue
            channel = tls.aio_channel(address, CHANNEL_OPTIONS)
            try:
                await self._stream(authwire.node_channel(channel))
                backoff = BACKOFF_MIN_S
            except Restart as r:
                log.warning("migration restarts from a snapshot", extra={"fields": {"source": self.source, "why": str(r)}})
                self.state = PairState(epoch=self.started_epoch)
                self._reset()
                self.error = str(r)
                backoff = BACKOFF_MIN_S
                continue
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                self.error = f"{address}: no message from the source for {DEAD_AFTER_S:g}s"
            except grpc.RpcError as e:
                err = errors.from_rpc_error(e)
                self.error = f"{address}: {err.code.name} {err.message}"
            except Exception as e:
                self.error = f"{address}: {e}"
                log.exception("migration stream failed", extra={"fields": {"source": self.source}})
            finally:
                self.connected = False
                await channel.close()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _watchdog(self, call: aio.StreamStreamCall) -> None:
        while True:
            await asyncio.sleep(DEAD_AFTER_S / 3)
            if wall_ms() - self._contact > DEAD_AFTER_S * 1000:
                call.cancel()
                return

    async def _read(self, call: aio.StreamStreamCall) -> replication_pb2.LeaderMessageRaw:
        msg = await call.read()
        if msg is aio.EOF:
            raise RuntimeError("the source ended the stream")
        self._contact = wall_ms()
        return msg  # type: ignore[no-any-return]

    async def _stream(self, channel: aio.Channel) -> None:
        st = self.state
        call = channel.stream_stream(
            wire.FOLLOW_METHOD, request_serializer=replication_pb2.FollowerMessage.SerializeToString,
            response_deserializer=replication_pb2.LeaderMessageRaw.FromString,
        )()
        self._contact = wall_ms()
        dog = asyncio.create_task(self._watchdog(call))
        try:
            await call.write(replication_pb2.FollowerMessage(hello=replication_pb2.FollowHello(
                follower_id=f"{self.node.address}#{self.node.shard_id}", shard_id=self.node.shard_id,
                from_revision=st.position + 1 if st.snapshot_done else 0, resync=not st.snapshot_done,
                filter_owner=self.node.shard_id, filter_map=self.map_bytes,
            )))
            first = await self._read(call)
            if first.WhichOneof("msg") != "timeline":
                raise RuntimeError("the source did not open the stream with its timeline")
            if st.snapshot_done and st.term and timeline.fork_point(first.timeline, st.term, st.position) is not None:
                raise Restart(f"shard {self.source}'s primary changed and lacks writes this copy holds")
            term = timeline.tail(first.timeline)
            hb = await self._read(call)
            self.source_revision = max(self.source_revision, hb.heartbeat.leader_revision)
            self.connected, self.error = True, ""
            while True:
                msg = await self._read(call)
                kind = msg.WhichOneof("msg")
                if kind == "snapshot":
                    await self._chunk(msg.snapshot, term)
                elif kind == "changes":
                    await self._changes(msg.changes)
                elif kind == "heartbeat":
                    self.source_revision = max(self.source_revision, msg.heartbeat.leader_revision)
                    if st.snapshot_done:
                        st.position = max(st.position, msg.heartbeat.leader_revision)
                        self._written(self.engine.revision())
                else:
                    continue
                if st.snapshot_done:
                    await call.write(replication_pb2.FollowerMessage(ack=replication_pb2.FollowAck(applied_revision=st.position)))
        finally:
            dog.cancel()
            call.cancel()

    def _meta_op(self) -> Op:
        return (self.meta_key, self.state.encode())

    async def _chunk(self, chunk: replication_pb2.SnapshotChunk, term: str) -> None:
        st = self.state
        if chunk.first:
            await self.purge()
            self.state = st = PairState(epoch=self.started_epoch, term=term, sessions_total=chunk.sessions_total)
            self._reset()
            log.info("copying sessions", extra={"fields": {"source": self.source, "sessions": chunk.sessions_total}})
        ops: list[Op] = [(op.key, None if op.delete else op.value) for op in chunk.ops]
        st.sessions_copied += chunk.sessions
        st.size += sum(len(k) + len(v or b"") for k, v in ops)
        if chunk.last:
            st.position, st.snapshot_done = chunk.revision, True
            self.source_revision = max(self.source_revision, chunk.revision)
        rev = await self.engine.write_raw([*ops, self._meta_op()], floor=chunk.revision)
        if chunk.last:
            self._written(rev)
            log.info("snapshot copied", extra={"fields": {"source": self.source, "revision": chunk.revision,
                                                        "sessions": st.sessions_copied, "bytes": st.size}})

    async def _changes(self, b: replication_pb2.ChangeBatchRaw) -> None:
        st = self.state
        self.source_revision = max(self.source_revision, b.leader_revision)
        if not st.snapshot_done:
            return
        view = replication_pb2.ChangeEntryOps.FromString
        ops: list[Op] = []
        for raw in b.entries:
            e = view(raw)
            if e.revision <= st.position:
                continue
            for op in e.ops:
                ops.append((op.key, None if op.delete else op.value))
                st.size += len(op.key) + len(op.value)
        st.position = max(st.position, b.leader_revision)
        self._written(await self.engine.write_raw([*ops, self._meta_op()], floor=st.position) if ops
                      else self.engine.revision())

    async def purge(self) -> int:
        """Drop whatever an earlier attempt copied of this pair's sessions."""
        db = self.engine.store.db
        skip = (enc.CHANGE[0], enc.NODE[0])
        n = 0
        batch: list[Op] = []
        for k in db.iterator(include_value=False):
            if k[0] in skip or not self.pick.pick(k):
                continue
            batch.append((k, None))
            if len(batch) >= PURGE_CHUNK:
                await self.engine.write_raw(batch)
                n += len(batch)
                batch = []
        if batch:
            await self.engine.write_raw(batch)
            n += len(batch)
        if n:
            log.info("dropped an earlier copy", extra={"fields": {"source": self.source, "keys": n}})
        return n
