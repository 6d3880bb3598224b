"""The source's hold on writes at the hand-over (docs/design.md §6.4): once fenced, a write to a
session leaving this shard waits; the fence's revision is then the last change any of them
will have here. The hold ends when the node adopts a newer map (the write then gets
WrongShard and its router sends it to the new owner), when released, or when it outlives
`hold_ms` and the keeper shows no newer map (the hand-over did not happen: writes go on here).

A fence is kept in node meta `_|fence` until it ends, so a source restarted (kill -9 included)
while fenced holds again before it serves: the coordinator may hand over at the fence revision
it was given, and a write the restarted source took for a leaving session would be lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from shardstate.common import errors
from shardstate.common.rebalance import Move
from shardstate.v1 import admin_pb2, replication_pb2

from ..node import Node
from ..storage.revision import wall_ms

log = logging.getLogger("shardstate.migration.fence")

DEFAULT_HOLD_MS = 10_000
MAX_HOLD_MS = 60_000
IN_FLIGHT_WAIT_S = 5.0
META = "fence"  # node meta: {"epoch", "revision", "until_ms"} of the fence in force


class Fence:
    def __init__(self, node: Node, move: Move, epoch: int, revision: int = 0) -> None:
        self.node = node
        self.move = move
        self.epoch = epoch  # the map epoch it was set under
        self.revision = revision
        self.released = asyncio.Event()
        self.deadline = 0.0
        self.on_release: Callable[[], None] | None = None

    def holds(self, namespace: str, session_id: str) -> bool:
        return not self.released.is_set() and self.move.leaving(self.node.shard_id, namespace, session_id)

    async def wait(self) -> None:
        await self.released.wait()

    def release(self, why: str) -> None:
        if not self.released.is_set():
            self.released.set()
            if self.on_release is not None:
                self.on_release()
            log.info("fence released", extra={"fields": {"epoch": self.epoch, "why": why}})


class Fences:
    """The node's fence (one at a time) and the Fence RPC."""

    def __init__(self, node: Node, engine_revision: Callable[[], int], last_issued: Callable[[], int],
                 wait_for_revision: Callable[[int, float], Awaitable[bool]],
                 busy_sessions: Callable[[], list[tuple[str, str]]],
                 keeper_map: Callable[[], Awaitable[admin_pb2.ClusterMap | None]]) -> None:
        self.node = node
        self.current: Fence | None = None
        self._revision = engine_revision
        self._last_issued = last_issued
        self._wait_for = wait_for_revision
        self._busy = busy_sessions
        self._keeper_map = keeper_map
        self._timer: asyncio.Task[None] | None = None

    def active(self) -> Fence | None:
        f = self.current
        return f if f is not None and not f.released.is_set() else None

    def adopted(self, epoch: int) -> None:
        """Node.adopt hook: a newer map ends the hold (ownership is checked by it from now)."""
        f = self.active()
        if f is not None and epoch > f.epoch:
            f.release(f"map epoch {epoch} adopted")

    async def hold(self, namespace: str, session_id: str) -> None:
        f = self.active()
        if f is not None and f.holds(namespace, session_id):
            await f.wait()

    async def fence(self, req: replication_pb2.FenceRequest) -> tuple[int, int]:
        node = self.node
        if node.is_replica:
            raise errors.NotPrimaryError.of(node.primary, node.shard_id)
        if req.release:
            f = self.active()
            if f is not None and (not req.epoch or f.epoch == req.epoch):
                f.release("released by the coordinator")
            return self._revision(), node.epoch
        pb = node.view.pb
        if not pb.migrations or node.epoch != req.epoch:
            raise errors.FailedPreconditionError(
                f"Fence for a rebalance at epoch {req.epoch}: this node holds the map at epoch {node.epoch}"
                + (" with no rebalance" if not pb.migrations else ""))
        hold_ms = min(req.hold_ms or DEFAULT_HOLD_MS, MAX_HOLD_MS)
        f = self.active()
        if f is None or f.epoch != req.epoch:
            # Its revision starts at the head: writes held from now have none, and what is in
            # flight lands below the final one.
            f = self._install(Fence(node, Move.of(pb), req.epoch, self._revision()))
        loop = asyncio.get_running_loop()
        f.deadline = loop.time() + hold_ms / 1000
        self._start_timer(f)
        # Writes already past the gate (waiting for a group commit) must land first.
        end = loop.time() + IN_FLIGHT_WAIT_S
        while any(f.move.leaving(node.shard_id, ns, sid) for ns, sid in self._busy()) and loop.time() < end:
            await asyncio.sleep(0.002)
        top = self._last_issued()
        await self._wait_for(top, IN_FLIGHT_WAIT_S)
        f.revision = max(f.revision, self._revision())
        if not f.released.is_set():
            self._save(f, wall_ms() + hold_ms)
        return f.revision, node.epoch

    def _install(self, f: Fence) -> Fence:
        self.current = f
        f.on_release = lambda: self._forget(f)
        return f

    def _start_timer(self, f: Fence) -> None:
        if self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(self._expire(f))

    def _save(self, f: Fence, until_ms: int) -> None:
        self.node.engine.set_node_meta(META, json.dumps(
            {"epoch": f.epoch, "revision": f.revision, "until_ms": until_ms}).encode())

    def _forget(self, f: Fence) -> None:
        if self.current is f:
            self.node.engine.set_node_meta(META, b"")

    def restore(self) -> None:
        """At start-up, before serving: a fence this node had set (and not ended) before it
        stopped holds again, under the map it was set at; else the record goes."""
        raw = self.node.engine.node_meta(META)
        if not raw:
            return
        try:
            kept = json.loads(raw)
            epoch, revision, until_ms = int(kept["epoch"]), int(kept["revision"]), int(kept["until_ms"])
        except (ValueError, KeyError, TypeError):
            epoch = revision = until_ms = 0
        node = self.node
        pb = node.view.pb
        if not epoch or epoch != node.epoch or not pb.migrations:
            self.node.engine.set_node_meta(META, b"")
            return
        f = self._install(Fence(node, Move.of(pb), epoch, revision))
        f.deadline = asyncio.get_running_loop().time() + max(0, until_ms - wall_ms()) / 1000
        self._start_timer(f)
        log.info("fence restored", extra={"fields": {"epoch": epoch, "revision": revision}})

    async def _expire(self, f: Fence) -> None:
        """Past its deadline a fence asks the keeper: a newer map is adopted (which releases
        the fence); the same epoch means no hand-over happened, so the hold ends."""
        loop = asyncio.get_running_loop()
        while not f.released.is_set():
            delay = f.deadline - loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(f.released.wait(), delay)
                except TimeoutError:
                    pass
                continue
            try:
                pb = await self._keeper_map()
            except Exception as e:  # keep holding: the keeper may have swapped the map
                log.warning("fence: the keeper did not answer", extra={"fields": {"error": str(e)}})
                pb = None
            if pb is None:
                await asyncio.sleep(0.5)
                continue
            if pb.epoch > self.node.epoch:
                self.node.adopt(pb)  # a newer map: adopting it releases the fence (adopted())
            f.release(f"the hold ran out; the keeper's map is at epoch {pb.epoch}")
