"""Auto-batching for AsyncClient: single ops issued in the same event-loop tick are coalesced
into one batch and multiplexed over one long-lived `Pipeline` stream per address (tagged ids,
answered out of order) - docs/design.md §8. At most WINDOW batches per address are
unanswered; ops submitted meanwhile wait and leave together when an answer comes (without
that, callers whose ops go to different shards fall out of step and batches shrink to one op).

Per op the hot path does little: a future and a pending entry at submit; at flush the ops'
serialized requests are framed by hand into the PipelineRequest bytes (no message copies);
one timer per batch enforces every op's own deadline; the answer resolves each op's future
with its response message, or fails it with its own error.

Fallbacks, per address: a server without Pipeline gets the same batches as unary `Batch`
calls; without Batch either, `mode` turns UNARY and callers make plain unary calls.
A broken stream fails its in-flight ops with UnavailableError; the retry policy resends them
(same request_ids, so nothing applies twice) and the next flush opens a new stream.

Each batch asks for an answer of at most `max_response_bytes` (BatchRequest's byte budget, a
quarter of what the client can receive): ops the server answers `unprocessed` (not run, the
answer was full) go again at the head of the next batch, under the same futures, so many
callers' large reads never add up to an answer no one can receive.

A batch is answered whole, so an op to a healthy shard in a batch with an op to a slow shard
waits for the slow one. A batch in flight may hold its ops back for `hold_s` at most (or 20
times the usual answer time, when that is longer: an overloaded cluster, slow everywhere, gets
no extra work from this): then its ops are re-sent as one batch per owning shard (the cluster
map from the address tells which, fetched then; same request_ids, so nothing applies twice,
and the first answer wins), and ops to the shards that were in it go in batches of their own
until the shard has not held a batch back for CALM_S. Healthy, every batch stays whole.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from shardstate import codec
from shardstate.common import budget, errors
from shardstate.common.clustermap import ClusterView
from shardstate.common.config import Limits
from shardstate.common.errors import (
    DeadlineExceededError,
    LimitExceededError,
    RateLimitedError,
    ShardstateError,
    UnimplementedError,
)
from shardstate.common.metrics import Registry
from shardstate.common.protowire import field_head, varint
from shardstate.v1 import state_pb2, state_pb2_grpc, types_pb2

PIPELINE, BATCH, UNARY = "pipeline", "batch", "unary"
PIPELINE_METHOD = "/shardstate.v1.State/Pipeline"

# BatchOp oneof name -> its field number (every one is below 16: a one-byte tag)
_OP_NUMBER = {f.name: f.number for f in state_pb2.BatchOp.DESCRIPTOR.fields}
_ID_TAG, _BATCH_TAG = b"\x08", b"\x12"  # PipelineRequest.id = 1, .batch = 2


_NEVER = float("inf")
WINDOW = 1  # batches a connection has unanswered at most (docs/design.md §8)
HOLD_S = 0.3  # the longest a batch in flight holds back its ops before they go per shard
CALM_S = 1.0  # a shard answering within HOLD_S for this long has its ops batched with others again
USUAL_FACTOR = 20.0  # held back means unanswered for this many times the usual answer time ...
USUAL_WEIGHT = 0.05  # ... an exponentially weighted mean of the answer times
VIEW_TTL_S = 5.0  # a cluster map fetched for splitting is fetched again when older
# The largest batch sent (BatchRequest bytes): a server's default max_request_bytes, which it
# enforces on the whole message (plus a small envelope). Larger ops go alone.
MAX_BATCH_BYTES = Limits().max_request_bytes
FRAMING_BYTES = 1024  # what a Pipeline message adds around its BatchRequest (id, tags), with room


def batch_bytes(max_message_bytes: int) -> int:
    """The largest batch a client sending at most `max_message_bytes` builds (<= 0: no limit
    of its own): MAX_BATCH_BYTES, or less when its own limit is lower, so that concurrent
    callers' ops never add up to a message the client itself cannot send."""
    if max_message_bytes <= 0:
        return MAX_BATCH_BYTES
    return max(1, min(MAX_BATCH_BYTES, max_message_bytes - FRAMING_BYTES))
# BatchOp oneof name -> {request length: what precedes the request in BatchRequest.ops}
_OP_HEADS: dict[str, dict[int, bytes]] = {name: {} for name in _OP_NUMBER}


def _op_head(field: str, n: int) -> bytes:
    """The bytes before an n-byte request of `field` in a BatchRequest: the ops tag and
    length, the BatchOp field's tag and length (the first 4096 lengths met are memoized)."""
    inner = field_head(_OP_NUMBER[field], n)
    head = field_head(1, len(inner) + n) + inner  # BatchRequest.ops = 1
    memo = _OP_HEADS[field]
    if len(memo) < 4096:
        memo[n] = head
    return head


def raw_pipeline(channel: Any) -> Any:
    """The Pipeline method of a channel taking already-serialized PipelineRequest bytes."""
    return channel.stream_stream(PIPELINE_METHOD, request_serializer=None,
                                 response_deserializer=state_pb2.PipelineResponse.FromString)


# Whole-stream failures that say something about the ops themselves; any other (UNAVAILABLE,
# CANCELLED by the peer, INTERNAL "Internal error from Core" when the peer dies mid-write...)
# says the transport broke, and the ops - unanswered, each with its request_id - may be retried.
_OP_ERRORS = (errors.UnimplementedError, errors.LimitExceededError, errors.InvalidArgumentError,
              errors.UnauthenticatedError, errors.PermissionDeniedError)


def _stream_error(exc: ShardstateError) -> ShardstateError:
    if isinstance(exc, (*_OP_ERRORS, errors.TransientError)):
        return exc
    out = errors.UnavailableError(f"the pipeline stream broke: {exc.message}")
    out.__cause__ = exc
    return out


# A whole message refused for these limits says nothing about its ops: smaller batches pass.
_MESSAGE_LIMITS = ("max_batch_ops", "max_request_bytes")
_LIMIT_TEXT = re.compile(r"over the limit (\w+)=(\d+)")  # LimitExceededError.of's wording


def _message_limit(exc: ShardstateError) -> tuple[str, int] | None:
    """(limit, value) when `exc` refused a whole batch for its size ("", 0: it does not say
    which limit; a Pipeline answer carries no typed details), else None."""
    if not isinstance(exc, LimitExceededError) or isinstance(exc, RateLimitedError):
        return None
    if isinstance(exc.detail, types_pb2.LimitExceeded):
        limit, value = exc.detail.limit, int(exc.detail.value)
    else:
        m = _LIMIT_TEXT.search(exc.message)
        limit, value = (m.group(1), int(m.group(2))) if m else ("", 0)
    return (limit, value) if limit in _MESSAGE_LIMITS or not limit else None


# One pending op: its BatchOp field, request message, future, and its call's timeout and
# deadline (loop time; _NEVER without a timeout); a retried op comes back with the same ones.
Pending = tuple[str, Any, "asyncio.Future[Any]", float | None, float]


def _began(ops: list[Pending]) -> float:
    """When the earliest call among `ops` began (its deadline less its timeout), or _NEVER."""
    return min((p[4] - p[3] for p in ops if p[3] is not None), default=_NEVER)


def _encode(pending: list[Pending], max_bytes: int = MAX_BATCH_BYTES,
            max_ops: int = 1 << 62, tail: bytes = b"") -> list[tuple[list[Pending], bytes]]:
    """The ops still wanted (not cancelled or expired) as batches of at most `max_ops` ops and
    `max_bytes` of BatchRequest each (an op bigger than that alone): each batch's ops and its
    bytes, each op's serialized request framed as a BatchOp, then `tail` (budget.wire_tail).
    Concurrent callers' ops never add up to a message the server refuses whole, failing
    every one of them."""
    out: list[tuple[list[Pending], bytes]] = []
    ops: list[Pending] = []
    parts: list[bytes] = []
    size = 0
    for p in pending:
        field, request, fut, _, _ = p
        if fut.done():  # cancelled (or expired) before it left
            continue
        data = request.SerializeToString()
        n = len(data)
        head = _OP_HEADS[field].get(n) or _op_head(field, n)
        if ops and (size + len(head) + n > max_bytes or len(ops) >= max_ops):
            parts.append(tail)
            out.append((ops, b"".join(parts)))
            ops, parts, size = [], [], 0
        ops.append(p)
        parts.append(head)
        parts.append(data)
        size += len(head) + n
    if ops:
        parts.append(tail)
        out.append((ops, b"".join(parts)))
    return out


class _Sent:
    """The ops of one batch in flight: answered together, each op failing on its own."""

    __slots__ = ("again", "answered", "at", "body", "on_done", "ops", "rescued", "shard", "timer")

    def __init__(self, ops: list[Pending], body: bytes, shard: str | None = None) -> None:
        self.ops = ops
        self.body = body  # the serialized BatchRequest, kept for a resend as a unary Batch
        self.timer: asyncio.TimerHandle | None = None
        self.shard = shard  # the one shard owning every op, when the batch was split by shard
        self.at = 0.0  # time.monotonic() when it was sent
        self.answered = 0.0  # time.monotonic() when it was answered (0: not yet)
        self.rescued = False  # its ops were re-sent per shard after it held them back too long
        self.on_done: Callable[[], None] | None = None  # Conn's window: called once, when answered, failed or rescued
        self.again: Callable[[list[Pending]], None] | None = None  # Conn's: ops answered unprocessed go again

    def release(self) -> None:
        """Give back the batch's place in its connection's window (once)."""
        done, self.on_done = self.on_done, None
        if done is not None:
            done()

    def deliver(self, results: Any) -> None:
        """Resolve each op with its response message, or its error; ops answered unprocessed
        go again (`again`), unresolved."""
        self.answered = time.monotonic()
        if self.timer is not None:
            self.timer.cancel()
        ops = self.ops
        if len(results) != len(ops):
            self.fail(errors.InternalError(f"batch of {len(ops)} ops got {len(results)} results"))
            return
        unprocessed: list[tuple[Pending, Any]] = []
        for p, result in zip(ops, results, strict=True):
            field, _, fut, _, _ = p
            if result.code or result.WhichOneof("result") != field:
                if result.unprocessed:
                    if not fut.done():
                        unprocessed.append((p, result))
                    continue
                try:
                    codec.batch_response(result, field)
                except ShardstateError as e:
                    if not fut.done():
                        fut.set_exception(e)
                    continue
            try:
                fut.set_result(getattr(result, field))
            except asyncio.InvalidStateError:
                pass  # expired or cancelled meanwhile
        if unprocessed:
            self._unprocessed(unprocessed, len(results))
        self.release()  # last: the callers it woke run before the next batch leaves, and join it

    def _unprocessed(self, unprocessed: list[tuple[Pending, Any]], n: int) -> None:
        """Ops the server did not run, its answer being full: sent again (before release(),
        so they lead the next batch; an op of a rescued batch may have a copy in flight too,
        which is safe: same request_id, and the first answer wins). A server that ran none of
        the batch broke the budget's promise (its first op always runs): the ops fail with
        their error rather than go round for ever."""
        again = self.again
        if again is not None and len(unprocessed) < n:
            again([p for p, _ in unprocessed])
            return
        for p, result in unprocessed:
            try:
                codec.batch_response(result, p[0])
            except ShardstateError as e:
                if not p[2].done():
                    p[2].set_exception(e)

    def fail(self, exc: BaseException) -> None:
        self.answered = time.monotonic()
        if self.timer is not None:
            self.timer.cancel()
        for op in self.ops:
            fut = op[2]
            if not fut.done():
                fut.set_exception(exc)
        self.release()


class _Stream:
    """One Pipeline call: a queue feeding its requests, a task reading its responses."""

    def __init__(self, pipeline: Any, loop: asyncio.AbstractEventLoop,
                 on_unimplemented: Callable[[list[_Sent]], None],
                 on_failed: Callable[[_Sent, ShardstateError], None]) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._waiting: dict[int, _Sent] = {}
        self._next_id = 1
        self._on_unimplemented = on_unimplemented
        self._on_failed = on_failed  # a batch failed whole (Conn._failed)
        self.broken = False
        self.last_heard = loop.time()
        self._call = pipeline(self._requests())
        self._reader = asyncio.ensure_future(self._read())

    async def _requests(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    def send(self, sent: _Sent) -> None:
        rid = self._next_id
        self._next_id += 1
        self._waiting[rid] = sent
        body = sent.body
        self._queue.put_nowait(b"".join((_ID_TAG, varint(rid), _BATCH_TAG, varint(len(body)), body)))

    async def _read(self) -> None:
        exc: ShardstateError = errors.UnavailableError("the pipeline stream was ended by the server")
        try:
            async for resp in self._call:
                self.last_heard = self._loop.time()
                sent = self._waiting.pop(resp.id, None)
                if sent is None:
                    continue
                if resp.code:
                    self._on_failed(sent, codec.pipeline_error(resp))
                else:
                    sent.deliver(resp.batch.results)
        except grpc.RpcError as e:
            exc = _stream_error(errors.from_rpc_error(e))
        except asyncio.CancelledError:
            exc = errors.CancelledError("the client was closed")
        finally:
            self.broken = True
            self._queue.put_nowait(None)
            waiting, self._waiting = list(self._waiting.values()), {}
            if isinstance(exc, UnimplementedError):
                self._on_unimplemented(waiting)
            else:
                for sent in waiting:
                    self._on_failed(sent, exc)

    def silent_for(self, now: float) -> float:
        """How long the stream has owed answers without giving any (0 when it owes none)."""
        return now - self.last_heard if self._waiting and not self.broken else 0.0

    def abandon(self, exc: ShardstateError) -> None:
        """Give up on a stream that stopped answering (say a half-open connection): fail what
        it owes with a retryable error, so the retries go over a new stream."""
        self.broken = True
        waiting, self._waiting = list(self._waiting.values()), {}
        for sent in waiting:
            sent.fail(exc)
        self.close()

    def close(self) -> None:
        self._queue.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()


class BatchingMetrics:
    """How well one client's calls coalesce, per address, in the client's registry."""

    def __init__(self, registry: Registry) -> None:
        self.batches = registry.counter("shardstate_client_batches_total", "batches sent", ("address",))
        self.ops = registry.counter("shardstate_client_ops_sent_total",
                                    "ops sent in batches (re-sent ones included)", ("address",))
        self.resent = registry.counter("shardstate_client_ops_resent_total",
                                       "ops re-sent one batch per shard because their batch held them back",
                                       ("address",))
        self.unprocessed = registry.counter("shardstate_client_ops_unprocessed_total",
                                            "ops the server answered unprocessed (its answer had reached the "
                                            "batch's byte budget), sent again in a later batch", ("address",))


class Conn:
    """The batching state for one address."""

    def __init__(self, stub: state_pb2_grpc.StateStub, pipeline: Any, max_ops: int,
                 timeout: float | None,
                 fetch_view: Callable[[], Awaitable[ClusterView | None]] | None = None,
                 hold_s: float = HOLD_S, address: str = "",
                 metrics: BatchingMetrics | None = None, window: int = WINDOW,
                 max_bytes: int = MAX_BATCH_BYTES, max_response_bytes: int = 0) -> None:
        self.address = address
        self.metrics = metrics or BatchingMetrics(Registry())
        self.stub = stub
        self.pipeline = pipeline
        self.max_ops = max_ops
        self.max_bytes = max_bytes  # a batch's BatchRequest bytes at most (MAX_BATCH_BYTES)
        self.tail = budget.wire_tail(max_response_bytes)  # each batch asks for an answer within this
        self.timeout = timeout
        self.mode = PIPELINE
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[Pending] = []
        self._earliest = _NEVER  # the earliest deadline among them
        self._scheduled = False
        self._stream: _Stream | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Keeping a slow shard from holding back the others (the module docstring):
        self.hold_s = hold_s
        self._fetch_view = fetch_view
        self._view: ClusterView | None = None
        self._view_at = -_NEVER  # loop time the view was fetched (or its fetch failed)
        self._fetching = False
        self._flight: deque[_Sent] = deque()  # batches sent, oldest first (answered ones pruned)
        self._watch: asyncio.TimerHandle | None = None
        self._split: dict[str, float] = {}  # shard id -> when it was last seen holding ops back
        self._usual = 0.0  # the usual answer time of a batch (USUAL_WEIGHT)
        self.window = window  # at most this many batches unanswered; later ops wait and coalesce
        self._unanswered = 0

    def submit(self, field: str, request: Any, timeout: float | None,
               deadline: float | None = None) -> asyncio.Future[Any]:
        """One op into the next batch: a future of its response message (or its error),
        failed with DeadlineExceededError at `deadline` (loop time, time.monotonic() on
        asyncio's loops: a retried op passes its call's deadline, which it keeps), or else
        once `timeout` seconds (the call's) have passed."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if deadline is None:
            deadline = _NEVER if timeout is None else loop.time() + timeout
        if deadline < self._earliest:
            self._earliest = deadline
        pending = self._pending
        pending.append((field, request, fut, timeout, deadline))
        if len(pending) >= self.max_ops:
            # A full batch leaves now: the server starts on it while later callers still run.
            self._send_pending()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)  # after every task already runnable in this tick
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        if self._pending and self._unanswered < self.window:
            self._send_pending()

    def _answered(self) -> None:
        """A batch left the window: the ops that waited for room go now, with those of the
        callers its answer woke (this runs after them, scheduled behind their wake-ups)."""
        self._unanswered -= 1
        if self._pending and not self._scheduled:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _send_pending(self) -> None:
        """The pending ops as one batch; ops to a shard that held a batch back go apart, one
        batch per such shard."""
        pending, earliest = self._pending, self._earliest
        self._pending, self._earliest = [], _NEVER
        if self._split and self._view is not None:
            self._send_split(pending)
            return
        batches = _encode(pending, self.max_bytes, self.max_ops, self.tail)
        if len(batches) == 1:
            self._send(_Sent(*batches[0]), earliest)
        else:
            for ops, body in batches:
                self._send(_Sent(ops, body))

    def _owner(self, request: Any) -> str:
        assert self._view is not None
        try:
            return self._view.ring.owner(request.namespace, request.session_id)
        except LookupError:
            return ""

    def _send_split(self, pending: list[Pending]) -> None:
        split = self._split
        groups: dict[str | None, list[Pending]] = {}
        for p in pending:
            sid: str | None = self._owner(p[1])
            if sid not in split:
                sid = None  # batched with the other healthy shards' ops
            groups.setdefault(sid, []).append(p)
        for sid, group in groups.items():
            for ops, body in _encode(group, self.max_bytes, self.max_ops, self.tail):
                self._send(_Sent(ops, body, sid))

    def _again(self, ops: list[Pending]) -> None:
        """Ops answered unprocessed: ahead of the ops waiting, into the next batch (which the
        answer's release lets go, or the flush scheduled here)."""
        self.metrics.unprocessed.inc(len(ops), address=self.address)
        self._pending[:0] = ops
        for p in ops:
            if p[4] < self._earliest:
                self._earliest = p[4]
        if not self._scheduled:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _send(self, sent: _Sent, earliest: float | None = None) -> None:
        if sent.on_done is None:  # (a batch sent again after a fallback holds its place already)
            self._unanswered += 1
            sent.on_done = self._answered
            sent.again = self._again
        self.metrics.batches.inc(address=self.address)
        self.metrics.ops.inc(len(sent.ops), address=self.address)
        self._arm(sent, earliest)
        sent.at = time.monotonic()
        self._flight.append(sent)
        if self._watch is None:
            assert self._loop is not None
            self._watch = self._loop.call_later(self.hold_s, self._check_held)
        if self.mode == PIPELINE:
            if self._stream is None or self._stream.broken:
                assert self._loop is not None
                self._stream = _Stream(self.pipeline, self._loop, self._fall_back, self._failed)
                # It owes answers from when the calls of its first ops began, so one of them
                # that reaches its deadline unanswered was kept waiting by it for its call's
                # whole timeout (_expire): a half-open stream is left at that first deadline.
                self._stream.last_heard = min(self._stream.last_heard, _began(sent.ops))
            self._stream.send(sent)
        elif self.mode == BATCH:
            self._spawn(self._unary_batch(sent))
        else:
            sent.fail(UnimplementedError("the server implements neither Pipeline nor Batch"))

    def _arm(self, sent: _Sent, earliest: float | None = None) -> None:
        """One timer for the batch, at the earliest deadline of its unanswered ops (found
        when not given)."""
        if earliest is None:
            earliest = min((p[4] for p in sent.ops if not p[2].done()), default=_NEVER)
        if earliest < _NEVER:
            assert self._loop is not None
            sent.timer = self._loop.call_at(earliest, self._expire, sent)

    def _expire(self, sent: _Sent) -> None:
        """Deadlines passed: fail those ops, and drop the stream if it has gone silent."""
        assert self._loop is not None
        sent.timer = None
        now = self._loop.time()
        longest = 0.0
        for _, _, fut, timeout, deadline in sent.ops:
            if timeout is not None and deadline <= now and not fut.done():
                fut.set_exception(DeadlineExceededError(f"no answer within the deadline of {timeout} s (batched)"))
                longest = max(longest, timeout)
        self._arm(sent)  # the ops with later deadlines
        stream = self._stream
        if longest and stream is not None and stream.silent_for(now) >= longest:
            stream.abandon(errors.UnavailableError(f"the pipeline stream gave no answer for {longest} s"))

    def _check_held(self) -> None:
        """Every hold_s while batches are in flight: a batch of several shards' ops held back
        (unanswered for hold_s, or USUAL_FACTOR times the usual answer time when longer) has
        its ops re-sent per shard, and its shards' ops go apart until they stop holding back."""
        assert self._loop is not None
        self._watch = None
        now = time.monotonic()
        flight = self._flight
        usual = self._usual
        while flight and flight[0].answered:
            sent = flight.popleft()
            if sent.shard is None and not sent.rescued:  # whole batches: not a slow shard's own
                usual += USUAL_WEIGHT * (sent.answered - sent.at - usual)
        self._usual = usual
        if not flight:
            self._split.clear()
            return
        hold = max(self.hold_s, USUAL_FACTOR * usual)
        held: list[_Sent] = []
        for sent in flight:
            if now - sent.at < hold:
                break  # sent in order: the rest are younger
            if sent.answered:
                continue
            sent.release()  # held back: it no longer keeps later ops waiting for room
            if sent.shard is not None:
                self._split[sent.shard] = now  # still slow
            elif not sent.rescued:
                held.append(sent)
        for sid, since in list(self._split.items()):
            if now - since >= CALM_S:
                del self._split[sid]
        if held:
            if self._view is None or now - self._view_at >= VIEW_TTL_S:
                self._refresh_view(now)
            if self._view is not None:
                self._rescue(held, now)
        self._watch = self._loop.call_later(self.hold_s, self._check_held)

    def _rescue(self, held: list[_Sent], now: float) -> None:
        for sent in held:
            sent.rescued = True
            sent.release()  # a held-back batch does not keep the others' ops waiting
            groups: dict[str, list[Pending]] = {}
            for p in sent.ops:
                if not p[2].done():
                    groups.setdefault(self._owner(p[1]), []).append(p)
            for sid in groups:
                self._split[sid] = now
            if len(groups) < 2:
                continue  # one shard's ops only: nothing else waits on them
            for sid, group in groups.items():
                for ops, body in _encode(group, self.max_bytes, self.max_ops, self.tail):
                    self.metrics.resent.inc(len(ops), address=self.address)
                    self._send(_Sent(ops, body, sid))

    def _refresh_view(self, now: float) -> None:
        if self._fetch_view is None or self._fetching:
            return
        self._fetching = True
        self._view_at = now

        async def fetch() -> None:
            try:
                view = await self._fetch_view()  # type: ignore[misc]
            finally:
                self._fetching = False
            if view is not None:
                self._view = view
                if self._watch is not None:  # act on it now rather than at the next check
                    self._watch.cancel()
                    self._check_held()

        self._spawn(fetch())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fall_back(self, waiting: list[_Sent]) -> None:
        if self.mode == PIPELINE:
            self.mode = BATCH
        for sent in waiting:
            if sent.timer is not None:
                sent.timer.cancel()
            self._send(sent)

    async def _unary_batch(self, sent: _Sent) -> None:
        try:
            resp = await self.stub.Batch(state_pb2.BatchRequest.FromString(sent.body), timeout=self.timeout)
        except grpc.RpcError as e:
            exc = errors.from_rpc_error(e)
            if isinstance(exc, UnimplementedError):
                self.mode = UNARY
            self._failed(sent, exc)
            return
        sent.deliver(resp.results)

    def _failed(self, sent: _Sent, exc: ShardstateError) -> None:
        """A batch failed whole. Refused for its size (the server's max_batch_ops or
        max_request_bytes is below this client's), its ops - not run, each within its limits
        as far as that answer says - go again in batches the server accepts, and the
        connection keeps to that limit from now on; any other failure is every op's."""
        ops = [p for p in sent.ops if not p[2].done()]
        refused = _message_limit(exc) if len(ops) > 1 else None
        if refused is None:
            sent.fail(exc)
            return
        limit, value = refused
        if limit == "max_batch_ops" and 0 < value < len(ops):
            self.max_ops = min(self.max_ops, value)
        elif limit == "max_request_bytes" and 0 < value < len(sent.body):
            self.max_bytes = min(self.max_bytes, value)
        else:  # the limit is not known: halve
            self.max_ops = min(self.max_ops, len(ops) // 2)
        sent.answered = time.monotonic()
        if sent.timer is not None:
            sent.timer.cancel()
        sent.release()
        for part, body in _encode(ops, self.max_bytes, self.max_ops, self.tail):
            self._send(_Sent(part, body, sent.shard))

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._stream is not None:
            self._stream.close()
        for t in list(self._tasks):
            t.cancel()
        closed = errors.CancelledError("the client was closed")
        # Every batch in flight ends now, whatever carried it (a stream's reader, a unary
        # Batch task, both cancelled above and perhaps before they ever ran).
        flight, self._flight = list(self._flight), deque()
        for sent in flight:
            sent.fail(closed)
        _Sent(self._pending, b"").fail(closed)
        self._pending, self._earliest = [], _NEVER


class Mux:
    """Per-address batching of single ops for one AsyncClient."""

    def __init__(self, stub_for: Callable[[str], state_pb2_grpc.StateStub],
                 pipeline_for: Callable[[str], Any], max_ops: int = 1000,
                 timeout: float | None = None,
                 view_for: Callable[[str], Awaitable[ClusterView | None]] | None = None,
                 hold_s: float = HOLD_S, max_response_bytes: int = 0,
                 max_bytes: int = MAX_BATCH_BYTES) -> None:
        self._stub_for = stub_for
        self._max_bytes = max_bytes  # a batch's BatchRequest bytes at most (batch_bytes)
        self._pipeline_for = pipeline_for
        self._max_ops = max_ops
        self._timeout = timeout
        self._view_for = view_for
        self._hold_s = hold_s
        self._max_response_bytes = max_response_bytes  # each batch's answer budget (0: the server's)
        self._conns: dict[str, Conn] = {}
        self.metrics = Registry()  # this client's
        self._batching = BatchingMetrics(self.metrics)

    def conn(self, address: str) -> Conn:
        conn = self._conns.get(address)
        if conn is None:
            view_for = self._view_for
            fetch = (lambda: view_for(address)) if view_for is not None else None
            conn = self._conns[address] = Conn(self._stub_for(address), self._pipeline_for(address),
                                               self._max_ops, self._timeout, fetch, self._hold_s,
                                               address, self._batching, max_bytes=self._max_bytes,
                                               max_response_bytes=self._max_response_bytes)
        return conn

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per address: mode, batches sent, ops sent (resends after a fallback, ops re-sent
        per shard after their batch held them back and unprocessed ops sent again included),
        those re-sent ops, and the ops answered unprocessed."""
        m = self._batching
        return {a: {"mode": c.mode, "batches": int(m.batches.value(address=a)), "ops": int(m.ops.value(address=a)),
                    "rescued": int(m.resent.value(address=a)),
                    "unprocessed": int(m.unprocessed.value(address=a))}
                for a, c in self._conns.items()}

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
