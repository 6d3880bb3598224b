"""The `State` service of a shard on grpc.aio: ownership and role checks, the engine call,
the response header. Batch runs ops independently; Pipeline and Watch are in streams.py.

Every failure leaves through `errors.abort` (unary) or a per-op code (Batch), so the one
status table in shardstate.common.errors decides what the caller sees.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from shardstate.common import auth as authz
from shardstate.common import budget, errors, pagetoken, tracing
from shardstate.common.metrics import gauged
from shardstate.v1 import state_pb2, types_pb2

from . import tracerefs
from .handlers import Partial, authorized
from .node import Node
from .opmetrics import OpMetrics
from .storage import validation
from .storage.engine import Engine
from .streams import DRAIN, pipeline_behavior, shutting_down, watch_behavior

log = logging.getLogger("shardstate.service")
Op = Callable[[Any], Awaitable[Any]]
REPLICA_READ_WAIT_S = 1.0

# BatchOp / BatchResult field of each op kind (the same names in both messages).
WRITE_KINDS = frozenset(("put", "delete", "increment", "append", "txn", "touch"))
BATCH_KINDS = ("get", "put", "delete", "increment", "append", "read_log", "txn", "scan", "touch", "get_session")
# What counts toward a batch's answer budget (BatchRequest.max_response_bytes): the replies
# that carry data, by ByteSize, and a Put/Delete that did not apply (it answers the current
# record). Every other reply is small (versions, seqs, a TTL) and is not counted,
# so a batch of writes pays two checks per op for the budget.
SIZED_KINDS = frozenset(("get", "scan", "read_log", "txn", "get_session"))
CAS_KINDS = frozenset(("put", "delete"))


def answer_bytes(kind: str | None, reply: Any) -> int:
    """What an op's reply counts toward its batch's answer budget."""
    if kind in SIZED_KINDS or (kind in CAS_KINDS and not reply.applied):
        return int(reply.ByteSize())
    return 0


# What each unary handler's op needs (auth on): method name for messages, role.
OP_AUTH = {
    "get": ("Get", authz.READ), "scan": ("Scan", authz.READ), "read_log": ("ReadLog", authz.READ),
    "get_session": ("GetSession", authz.READ), "list_sessions": ("ListSessions", authz.READ),
    "put": ("Put", authz.WRITE), "delete": ("Delete", authz.WRITE), "increment": ("Increment", authz.WRITE),
    "txn": ("Txn", authz.WRITE), "append": ("Append", authz.WRITE), "trim_log": ("TrimLog", authz.WRITE),
    "pop_last": ("PopLast", authz.WRITE), "touch": ("Touch", authz.WRITE),
    "delete_session": ("DeleteSession", authz.WRITE),
}


class StateService:
    def __init__(self, engine: Engine, node: Node, auth: authz.Authorizer | None = None) -> None:
        self.engine = engine
        self.node = node
        self.auth = auth  # tokens on: every call's namespace and role are checked here
        self.draining = False
        self.streams: set[asyncio.Queue[Any]] = set()  # inboxes of open Pipelines
        m = node.metrics
        self.replies = m.counter("shardstate_shard_replies_total",
                                 "replies sent, each op of a Batch or Pipeline counting one (Status's load)")
        self.received = m.counter("shardstate_shard_requests_received_total",
                                  "unary calls that reached a handler, refused ones included")
        self.in_flight = m.gauge("shardstate_shard_requests_in_flight",
                                 "unary calls being served (shutdown waits for them)")
        self.opm = OpMetrics(m)
        self._batch_size = self.opm.batch_ops.child()
        self._unprocessed = self.opm.unprocessed.child()
        self._replays = self.opm.replays.child()
        # With group commit a write waits for its fsync: run a batch's sessions concurrently
        # so their writes share one. Otherwise nothing suspends and plain order is cheapest.
        self.concurrent = engine.store.group_commit
        # Semi-synchronous replication (set by shardstate.server.replication with
        # --min-replica-acks): awaited with the revision a call wrote before it is answered.
        self.ack_barrier: Callable[[int], Awaitable[None]] | None = None
        # Rebalancing's hand-over hold (shardstate.server.migration.fence.Fences), when wired.
        self.fence: Any = None
        self.ops: dict[str, Op] = {
            "get": self.get, "put": self.put, "delete": self.delete, "increment": self.increment,
            "append": self.append, "read_log": self.read_log, "txn": self.txn, "scan": self.scan,
            "touch": self.touch, "get_session": self.get_session,
        }

    @property
    def role(self) -> int:
        """admin_pb2.NodeRole of this node (the replication hook lives on Node)."""
        return self.node.role

    # ---- plumbing ----

    def header(self, resp: Any) -> Any:
        self.replies.inc()
        h = resp.header
        if h.replayed:
            self._replays.inc()
        node = self.node
        h.shard_id = node.shard_id
        h.revision = self.engine.store.committed
        h.epoch = node.epoch
        h.node = node.address
        return resp

    async def _write_gate(self, req: Any, kind: str) -> None:
        """The names first, then the rebalance's hold on a session being handed over,
        ownership, role. An invalid request is INVALID_ARGUMENT on every node, never a redirect:
        a node that would redirect it checks its input first (the owner's engine does)."""
        self.engine.ref(req.namespace, req.session_id)
        fence = self.fence
        if fence is not None and fence.active() is not None:
            await fence.hold(req.namespace, req.session_id)
        try:
            self.node.check_owner(req.namespace, req.session_id)
            self.node.check_writable()
        except (errors.WrongShardError, errors.NotPrimaryError):
            self.engine.check(kind, req)
            raise

    async def _read_gate(self, req: Any, kind: str) -> None:
        """The names and `consistency` first, then ownership; on a replica: STRONG (the
        default without min_revision) goes to the primary, EVENTUAL is served, min_revision
        is served once applied. A node that would redirect the request checks its input first,
        as _write_gate does."""
        node = self.node
        self.engine.ref(req.namespace, req.session_id)
        validation.consistency(req.consistency)
        try:
            node.check_owner(req.namespace, req.session_id)
            if not node.is_replica:
                return
            strong = req.consistency == types_pb2.STRONG or (
                req.consistency == types_pb2.CONSISTENCY_UNSPECIFIED and not req.min_revision
            )
            if strong or not node.readable:
                raise errors.NotPrimaryError.of(node.primary, node.shard_id)
            if req.min_revision and not await self.engine.wait_for_revision(req.min_revision, REPLICA_READ_WAIT_S):
                raise errors.NotPrimaryError.of(node.primary, node.shard_id)
        except (errors.WrongShardError, errors.NotPrimaryError):
            self.engine.check(kind, req)
            raise

    # ---- ops (raise shardstate errors; used by unary RPCs, Batch and Pipeline) ----

    async def get(self, req: state_pb2.GetRequest) -> state_pb2.GetResponse:
        await self._read_gate(req, "get")
        return self.header(self.engine.get(req))

    async def scan(self, req: state_pb2.ScanRequest) -> state_pb2.ScanResponse:
        await self._read_gate(req, "scan")
        return self.header(self.engine.scan(req))

    async def read_log(self, req: state_pb2.ReadLogRequest) -> state_pb2.ReadLogResponse:
        await self._read_gate(req, "read_log")
        return self.header(self.engine.read_log(req))

    async def get_session(self, req: state_pb2.GetSessionRequest) -> state_pb2.GetSessionResponse:
        await self._read_gate(req, "get_session")
        return self.header(self.engine.get_session(req))

    async def list_sessions(self, req: state_pb2.ListSessionsRequest) -> state_pb2.ListSessionsResponse:
        """Page tokens are the routers' format (pagetoken.decode_token): garbage is
        INVALID_ARGUMENT here as at a router."""
        node = self.node
        owned = node.owns if node.view.epoch else None
        validation.namespace_bytes(req.namespace, self.engine.limits)
        cursor = pagetoken.decode_token(req.page_token)
        if req.page_token:
            req.page_token = cursor.after  # the engine resumes after a session id
        resp = self.engine.list_sessions(req, owned)
        if resp.next_page_token:
            resp.next_page_token = pagetoken.encode_token(pagetoken.Cursor(resp.next_page_token))
        return self.header(resp)

    async def put(self, req: state_pb2.PutRequest) -> state_pb2.PutResponse:
        await self._write_gate(req, "put")
        return self.header(await self.engine.put(req))

    async def delete(self, req: state_pb2.DeleteRequest) -> state_pb2.DeleteResponse:
        await self._write_gate(req, "delete")
        return self.header(await self.engine.delete(req))

    async def increment(self, req: state_pb2.IncrementRequest) -> state_pb2.IncrementResponse:
        await self._write_gate(req, "increment")
        return self.header(await self.engine.increment(req))

    async def txn(self, req: state_pb2.TxnRequest) -> state_pb2.TxnResponse:
        validation.compares(req.compares)
        await self._write_gate(req, "txn")
        return self.header(await self.engine.txn(req))

    async def append(self, req: state_pb2.AppendRequest) -> state_pb2.AppendResponse:
        await self._write_gate(req, "append")
        return self.header(await self.engine.append(req))

    async def trim_log(self, req: state_pb2.TrimLogRequest) -> state_pb2.TrimLogResponse:
        await self._write_gate(req, "trim_log")
        return self.header(await self.engine.trim_log(req))

    async def pop_last(self, req: state_pb2.PopLastRequest) -> state_pb2.PopLastResponse:
        await self._write_gate(req, "pop_last")
        return self.header(await self.engine.pop_last(req))

    async def touch(self, req: state_pb2.TouchRequest) -> state_pb2.TouchResponse:
        await self._write_gate(req, "touch")
        return self.header(await self.engine.touch(req))

    async def delete_session(self, req: state_pb2.DeleteSessionRequest) -> state_pb2.DeleteSessionResponse:
        await self._write_gate(req, "delete_session")
        return self.header(await self.engine.delete_session(req))

    # ---- Batch ----

    async def run_op(self, op: state_pb2.BatchOp, out: state_pb2.BatchResult | None = None) -> state_pb2.BatchResult:
        """One op's result, filled into `out` when given (saves a copy of the response)."""
        result = state_pb2.BatchResult() if out is None else out
        kind = op.WhichOneof("op")
        await self._run(kind, getattr(op, kind) if kind else None, result)
        return result

    async def _run(self, kind: str | None, inner: Any, result: state_pb2.BatchResult) -> Any:
        """Fill `result` with the op's reply (returned: the reply inside `result`) or its error (None)."""
        if kind is None:
            result.CopyFrom(batch_error(errors.InvalidArgumentError("batch op is empty: set one of its ops")))
            return None
        t0 = time.perf_counter()
        try:
            resp = await self.ops[kind](inner)
        except Exception as e:
            self.opm.failed(kind, e, t0)
            result.CopyFrom(batch_error(e))
            return None
        self.opm.done(kind, resp, t0)
        reply = getattr(result, kind)
        reply.CopyFrom(resp)
        return reply

    async def replicated(self, before: int, replayed: bool = False, req: Any = None) -> None:
        """With --min-replica-acks, no answer shows a write that a failover could lose. A call
        that wrote (the revision moved past `before`, or a replayed write) waits until enough
        replicas applied everything up to now; a read (or a write that changed nothing, e.g. a
        failed CAS showing the current record) waits only for the last write of the sessions
        it read — at once when that is acknowledged already, so one session's unacknowledged
        write never holds up reads of the others."""
        barrier = self.ack_barrier
        if barrier is None:
            return
        committed = self.engine.store.committed
        if committed > before or replayed:
            await barrier(committed)
            return
        shown = self._shown_revision(req, committed)
        if not shown:
            return
        try:
            await barrier(shown)
        except errors.UnavailableError:
            raise errors.UnavailableError(
                f"this read would show a write (revision {shown}) that fewer replicas "
                "acknowledged than --min-replica-acks requires, so a failover could lose it; "
                "nothing was changed, retry once a replica has caught up"
            ) from None

    def _shown_revision(self, req: Any, committed: int) -> int:
        """The newest revision an answer to `req` can show: its session's last write; over a
        batch's ops, the newest of theirs; `committed` for a request of no single session."""
        if isinstance(req, state_pb2.BatchRequest):
            top = 0
            for op in req.ops:
                kind = op.WhichOneof("op")
                if kind:
                    inner = getattr(op, kind)
                    top = max(top, self._session_revision(inner))
            return top
        if req is not None and hasattr(req, "session_id"):
            return self._session_revision(req)
        return committed

    def _session_revision(self, req: Any) -> int:
        try:
            return self.engine.session_revision(req.namespace, req.session_id)
        except errors.ShardstateError:
            return 0  # an invalid name: its op was answered with its own error, showing nothing

    async def batch(
        self, req: state_pb2.BatchRequest | Partial, out: state_pb2.BatchResponse | None = None
    ) -> state_pb2.BatchResponse:
        """Run every op, or, once the answer has reached the request's byte budget, answer the
        rest `unprocessed` (not run); `out` (e.g. a PipelineResponse's batch) is filled in
        place. A `Partial` request's bad ops each get their own INVALID_ARGUMENT result."""
        bad: dict[int, errors.ShardstateError] = {}
        if isinstance(req, Partial):
            bad = req.bad
            req = req.batch
        assert isinstance(req, state_pb2.BatchRequest)
        n = len(req.ops)
        self._batch_size.observe(n)
        limits = self.engine.limits
        if n > limits.max_batch_ops:
            raise errors.LimitExceededError.of("max_batch_ops", limits.max_batch_ops, n, "ops in one Batch")
        limit = budget.effective(req.max_response_bytes, limits.max_response_bytes)
        resp = state_pb2.BatchResponse() if out is None else out
        fence = self.fence
        if fence is not None and fence.active() is not None:
            await self._hold_batch(req)  # before a grouped run, which must not suspend
        before = self.engine.store.committed
        if not self.concurrent:
            await self._run_grouped(req, resp, bad, limit)
            await self.replicated(before, req=req)
            return self.header(resp)
        # Ops of one session stay in request order; different sessions run concurrently. The
        # budget is checked before each op: ops already under way when it is reached (writes
        # waiting for their fsync) are answered too, and a session's ops after an unprocessed
        # one are unprocessed as well (the count only grows).
        groups: dict[tuple[str, str], list[int]] = {}
        results: list[state_pb2.BatchResult | None] = [None] * n
        for i, op in enumerate(req.ops):
            if i in bad:
                results[i] = batch_error(bad[i])
                continue
            kind = op.WhichOneof("op")
            inner = getattr(op, kind) if kind else None
            key = (inner.namespace or "default", inner.session_id) if inner is not None else ("", "")
            groups.setdefault(key, []).append(i)
        used = [0, 0]  # bytes of results counted, ops unprocessed

        async def run_group(idx: list[int]) -> None:
            for i in idx:
                if used[0] >= limit:
                    results[i] = budget.unprocessed_result(limit, used[0])
                    used[1] += 1
                    continue
                result = results[i] = await self.run_op(req.ops[i])
                kind = result.WhichOneof("result")
                if kind is not None:
                    used[0] += answer_bytes(kind, getattr(result, kind))

        await asyncio.gather(*(run_group(idx) for idx in groups.values()))
        resp.results.extend(r for r in results if r is not None)
        if used[1]:
            self._unprocessed.inc(used[1])
        await self.replicated(before, req=req)
        return self.header(resp)

    async def _hold_batch(self, req: state_pb2.BatchRequest) -> None:
        for op in req.ops:
            kind = op.WhichOneof("op")
            if kind and kind in WRITE_KINDS:
                inner = getattr(op, kind)
                await self.fence.hold(inner.namespace, inner.session_id)

    async def _run_grouped(self, req: state_pb2.BatchRequest, resp: state_pb2.BatchResponse,
                           bad: dict[int, errors.ShardstateError], limit: int) -> None:
        """Ops in order; the writes of a run of ops on distinct sessions go to LevelDB as one
        WriteBatch (each op keeps its own revision, change-log entry and idempotency record).
        An op on a session already in the run closes the run first, so it sees those writes.
        Nothing here yields to the event loop (no --fsync), so no other caller sees the run
        half-written; answers leave only after the run is written. Once the counted results
        reach `limit` bytes, the remaining ops are answered unprocessed, not run."""
        store = self.engine.store
        results = resp.results
        seen: set[tuple[str, str]] = set()
        first = 0
        replies: list[Any] = []  # the replies of the open run
        used = 0  # bytes of the results counted toward the budget
        unprocessed: state_pb2.BatchResult | None = None
        # A replica's reads may wait for a revision (yielding): it writes nothing here anyway.
        grouped = not self.node.is_replica and store.begin_group()
        try:
            for i, op in enumerate(req.ops):
                if bad and i in bad:
                    results.add().CopyFrom(batch_error(bad[i]))
                    continue
                if used >= limit:
                    if unprocessed is None:
                        unprocessed = budget.unprocessed_result(limit, used)
                    results.add().CopyFrom(unprocessed)
                    self._unprocessed.inc()
                    continue
                kind = op.WhichOneof("op")
                inner = getattr(op, kind) if kind else None
                if grouped:
                    key = (inner.namespace or "default", inner.session_id) if inner is not None else ("", "")
                    if key in seen:
                        self._end_group(results, first, replies)
                        first = len(results)
                        replies = []
                        seen.clear()
                        grouped = store.begin_group()
                    seen.add(key)
                reply = await self._run(kind, inner, results.add())
                if reply is not None:
                    replies.append(reply)
                    used += answer_bytes(kind, reply)
        finally:
            if grouped:
                self._end_group(results, first, replies)

    def _end_group(self, results: Any, first: int, replies: list[Any]) -> None:
        """Write the held run (results[first:]); its replies' headers then name the revision
        that includes it."""
        try:
            self.engine.store.end_group()
        except Exception as e:
            log.error("writing a batch to LevelDB failed", exc_info=e)
            for i in range(first, len(results)):
                results[i].CopyFrom(batch_error(errors.UnavailableError(f"the shard could not write: {e}")))
            return
        rev = self.engine.store.committed
        for reply in replies:
            reply.header.revision = rev

    # ---- gRPC behaviors ----

    def behaviors(self) -> dict[str, Callable[..., Any]]:
        def unary(op: Op, waits: bool = True) -> Callable[[Any, Any], Awaitable[Any]]:
            """`waits=False`: the op waits for the semi-sync barrier itself (batch), and its
            ops count themselves."""
            kind = op.__name__
            opm = self.opm
            replicated = self.replicated
            auth = self.auth
            need = OP_AUTH.get(kind)
            if tracing.ON:  # chosen once: an untraced process runs no tracing code per call
                op = tracing.traced(op, "shard storage write")
                replicated = self._traced_replicated

            async def handler(req: Any, context: Any) -> Any:
                self.received.inc()
                if self.draining:
                    await errors.abort(context, shutting_down())
                self.in_flight.inc()
                t0 = time.perf_counter()
                try:
                    before = self.engine.store.committed
                    if auth is not None:
                        gate = auth.gate(context.invocation_metadata())
                        if need is not None:
                            gate.call(req.namespace, need[1], need[0])
                        else:  # Batch: each op on its own
                            req = authorized(gate, req)
                    try:
                        resp = await op(req)
                    except Exception as e:
                        if waits:
                            opm.failed(kind, e, t0)
                        raise
                    if waits:
                        opm.done(kind, resp, t0)
                        await replicated(before, resp.header.replayed, req)
                    return resp
                except Exception as e:
                    log_unexpected(e)
                    await errors.abort(context, e)
                finally:
                    self.in_flight.dec()

            return tracing.traced_handler(handler, f"shard {kind}") if tracing.ON else handler

        return {
            "Get": unary(self.get), "Put": unary(self.put), "Delete": unary(self.delete),
            "Txn": unary(self.txn), "Increment": unary(self.increment), "Scan": unary(self.scan),
            "Append": unary(self.append), "ReadLog": unary(self.read_log),
            "TrimLog": unary(self.trim_log), "PopLast": unary(self.pop_last),
            "Touch": unary(self.touch), "DeleteSession": unary(self.delete_session),
            "GetSession": unary(self.get_session), "ListSessions": unary(self.list_sessions),
            "Batch": unary(self.batch, waits=False), "Pipeline": pipeline_behavior(self), "Watch": self._watch(),
        }

    async def _traced_replicated(self, before: int, replayed: bool = False, req: Any = None) -> None:
        committed = self.engine.store.committed
        if committed > before and not replayed:  # a write: its replicas' apply joins this trace
            for k, v in tracing.outgoing():
                if k == tracing.TRACEPARENT:
                    tracerefs.note(committed, v)
        if self.ack_barrier is None:
            return
        with tracing.span("shard semi-sync wait"):
            await self.replicated(before, replayed, req)

    def _watch(self) -> Callable[[Any, Any], Any]:
        """Watch, counted in shardstate_shard_watch_streams while open."""
        watch, gauge = watch_behavior(self), self.opm.watches

        async def counted(req: Any, context: Any) -> AsyncIterator[Any]:
            async for resp in gauged(gauge, watch(req, context)):
                yield resp

        return counted

    def drain(self) -> None:
        """Shutdown: long-lived streams finish what they hold and end (UNAVAILABLE)."""
        self.draining = True
        for inbox in self.streams:
            inbox.put_nowait(DRAIN)
        self.engine.wake_waiters()


def log_unexpected(e: BaseException) -> None:
    if not isinstance(e, errors.ShardstateError):
        log.error("unexpected error serving a request", exc_info=e)


def batch_error(e: Exception) -> state_pb2.BatchResult:
    log_unexpected(e)
    err = errors.as_shardstate_error(e)
    result = state_pb2.BatchResult(code=errors.to_code_int(err), message=err.message)
    d = err.detail
    if isinstance(d, types_pb2.WrongShard):
        result.wrong_shard.CopyFrom(d)
    elif isinstance(d, types_pb2.NotPrimary):
        result.not_primary.CopyFrom(d)
    elif isinstance(d, types_pb2.LimitExceeded):
        result.limit_exceeded.CopyFrom(d)
    return result
