"""Namespace limits on sessions and bytes, on a shard (docs/design.md §15): a write that would
take its namespace past `max_sessions` or `max_bytes` is refused before anything is written.

The figure a write is judged by: what this shard holds of the namespace (exact, kept by every
write: storage/usage.py) plus what the other primaries held when this one last asked them
(Replication.NamespaceUsage, every --usage-poll-s). So the cluster's total can pass a limit
only by what other shards accepted since their last answer; a single shard never passes it.
A shard that does not answer keeps its last figure; sessions in the middle of a move count on
both shards until the source drops them (refusing early, never late because of the move).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc import aio

from shardstate.common import authwire, errors, grpcserve, tls
from shardstate.common.auth import Authorizer
from shardstate.v1 import replication_pb2, replication_pb2_grpc, types_pb2

from .node import Node
from .storage.engine import Engine
from .storage.usage import Usage

log = logging.getLogger("shardstate.quota")
SERVICE = "shardstate.v1.Replication"
POLL_TIMEOUT_S = 2.0
MAX_ASKED = 10_000


def over(namespace: str, limit: str, value: int, now: int, after: int, what: str) -> errors.LimitExceededError:
    return errors.LimitExceededError(
        f"namespace {namespace!r} is at its limit {limit}={value} ({what}: {now} held, this write would make "
        f"{after}); nothing was written",
        detail=types_pb2.LimitExceeded(limit=limit, value=value, actual=after))


class Quota:
    def __init__(self, auth: Authorizer, node: Node, engine: Engine, poll_s: float) -> None:
        self.auth = auth
        self.node = node
        self.engine = engine
        self.poll_s = poll_s
        self.usage = Usage(engine.store)
        self.others: dict[str, dict[str, tuple[int, int]]] = {}  # shard id -> namespace -> figures
        self._stubs: dict[str, Any] = {}
        self._channels: list[aio.Channel] = []
        engine.store.usage = self.usage
        engine.quota = self.check

    # ---- the check (Engine._write, before the write lands) ----

    def remote(self, namespace: str) -> tuple[int, int]:
        s = b = 0
        for figures in self.others.values():
            f = figures.get(namespace)
            if f is not None:
                s += f[0]
                b += f[1]
        return s, b

    def check(self, d: tuple[str, int, int]) -> None:
        ns, ds, db = d
        lim = self.auth.limits(ns)
        if lim is None or not lim.stored:
            return
        here_s, here_b = self.usage.of(ns)  # tracked from now on: later writes are counted
        there_s, there_b = self.remote(ns)
        if ds > 0 and lim.max_sessions and here_s + there_s + ds > lim.max_sessions:
            now = here_s + there_s
            raise over(ns, "max_sessions", lim.max_sessions, now, now + ds, "sessions")
        if db > 0 and lim.max_bytes and here_b + there_b + db > lim.max_bytes:
            now = here_b + there_b
            raise over(ns, "max_bytes", lim.max_bytes, now, now + db, "bytes")

    # ---- what this node holds, for the others ----

    def answer(self, namespaces: list[str]) -> replication_pb2.NamespaceUsageResponse:
        resp = replication_pb2.NamespaceUsageResponse(shard_id=self.node.shard_id)
        for ns in namespaces[:MAX_ASKED]:
            s, b = self.usage.of(ns)
            resp.held.add(namespace=ns, sessions=s, bytes=b)
            rs, rb = self.remote(ns)
            resp.cluster.add(namespace=ns, sessions=s + rs, bytes=b + rb)
        return resp

    async def usage_rpc(self, req: replication_pb2.NamespaceUsageRequest, context: Any) -> Any:
        return self.answer(list(req.namespaces))

    def register(self, server: aio.Server) -> None:
        methods = {"NamespaceUsage": grpcserve.unary(self.usage_rpc, replication_pb2.NamespaceUsageRequest,
                                                     replication_pb2.NamespaceUsageResponse)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))

    # ---- asking the other primaries ----

    def limited(self) -> list[str]:
        return sorted(ns for ns, lim in self.auth.source.current().limits.items() if lim.stored)

    def _stub(self, address: str) -> Any:
        stub = self._stubs.get(address)
        if stub is None:
            ch = tls.aio_channel(address)
            self._channels.append(ch)
            stub = self._stubs[address] = replication_pb2_grpc.ReplicationStub(authwire.node_channel(ch))
        return stub

    async def poll_once(self) -> None:
        names = self.limited()
        view = self.node.view
        peers = {s.id: s.primary for s in view.pb.shards if s.id != self.node.shard_id and s.primary}
        for gone in [sid for sid in self.others if sid not in peers]:
            del self.others[gone]
        if not names or not peers or self.node.is_replica:
            return
        req = replication_pb2.NamespaceUsageRequest(namespaces=names)

        async def ask(sid: str, address: str) -> None:
            try:
                resp = await self._stub(address).NamespaceUsage(req, timeout=POLL_TIMEOUT_S)
            except grpc.RpcError as e:
                log.debug("namespace usage poll failed", extra={"fields": {"shard": sid, "code": str(e.code())}})
                return  # keep its last figures
            self.others[sid] = {f.namespace: (int(f.sessions), int(f.bytes)) for f in resp.held}

        await asyncio.gather(*(ask(sid, a) for sid, a in peers.items()))

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("namespace usage poll failed")
            await asyncio.sleep(self.poll_s)

    async def close(self) -> None:
        channels, self._channels = self._channels, []
        self._stubs.clear()
        for ch in channels:
            await ch.close()
