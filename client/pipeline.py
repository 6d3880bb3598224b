"""Auto-batching for AsyncClient: single ops issued in the same event-loop tick are coalesced
into one batch and multiplexed over one long-lived `Pipeline` stream per address (tagged ids,
answered out of order) - DESIGN §8.

Per op the hot path does little: a future and a pending entry at submit; at flush the ops'
serialized requests are framed by hand into the PipelineRequest bytes (no message copies);
one timer per batch enforces every op's own deadline; the answer resolves each op's future
with its response message, or fails it with its own error.

Fallbacks, per address: a server without Pipeline gets the same batches as unary `Batch`
calls; without Batch either, `mode` turns UNARY and callers make plain unary calls.
A broken stream fails its in-flight ops with UnavailableError; the retry policy resends them
(same request_ids, so nothing applies twice) and the next flush opens a new stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from shardstate import codec, errors
from shardstate.errors import DeadlineExceededError, ShardstateError, UnimplementedError
from shardstate.protowire import field_head, varint
from shardstate.v1 import state_pb2, state_pb2_grpc

PIPELINE, BATCH, UNARY = "pipeline", "batch", "unary"
PIPELINE_METHOD = "/shardstate.v1.State/Pipeline"

# BatchOp oneof name -> its field number (every one is below 16: a one-byte tag)
_OP_NUMBER = {f.name: f.number for f in state_pb2.BatchOp.DESCRIPTOR.fields}
_ID_TAG, _BATCH_TAG = b"\x08", b"\x12"  # PipelineRequest.id = 1, .batch = 2


_NEVER = float("inf")
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


# One pending op: its BatchOp field, request message, future, timeout and deadline (loop time;
# _NEVER without a timeout).
Pending = tuple[str, Any, "asyncio.Future[Any]", float | None, float]


class _Sent:
    """The ops of one batch in flight: answered together, each op failing on its own."""

    __slots__ = ("body", "ops", "timer")

    def __init__(self, ops: list[Pending], body: bytes) -> None:
        self.ops = ops
        self.body = body  # the serialized BatchRequest, kept for a resend as a unary Batch
        self.timer: asyncio.TimerHandle | None = None

    def deliver(self, results: Any) -> None:
        """Resolve each op with its response message, or its error."""
        if self.timer is not None:
            self.timer.cancel()
        ops = self.ops
        if len(results) != len(ops):
            self.fail(errors.InternalError(f"batch of {len(ops)} ops got {len(results)} results"))
            return
        for (field, _, fut, _, _), result in zip(ops, results, strict=True):
            if result.code or result.WhichOneof("result") != field:
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

    def fail(self, exc: BaseException) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for op in self.ops:
            fut = op[2]
            if not fut.done():
                fut.set_exception(exc)


class _Stream:
    """One Pipeline call: a queue feeding its requests, a task reading its responses."""

    def __init__(self, pipeline: Any, loop: asyncio.AbstractEventLoop,
                 on_unimplemented: Callable[[list[_Sent]], None]) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._waiting: dict[int, _Sent] = {}
        self._next_id = 1
        self._on_unimplemented = on_unimplemented
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
                    sent.fail(codec.pipeline_error(resp))
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
                    sent.fail(exc)

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


class Conn:
    """The batching state for one address."""

    def __init__(self, stub: state_pb2_grpc.StateStub, pipeline: Any, max_ops: int,
                 timeout: float | None) -> None:
        self.stub = stub
        self.pipeline = pipeline
        self.max_ops = max_ops
        self.timeout = timeout
        self.mode = PIPELINE
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[Pending] = []
        self._earliest = _NEVER  # the earliest deadline among them
        self._scheduled = False
        self._stream: _Stream | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # batches sent, ops in them: how well calls coalesce
        self.ops = 0

    def submit(self, field: str, request: Any, timeout: float | None) -> asyncio.Future[Any]:
        """One op into the next batch: a future of its response message (or its error),
        failed with DeadlineExceededError once `timeout` seconds have passed."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if timeout is not None:
            deadline = loop.time() + timeout
            if deadline < self._earliest:
                self._earliest = deadline
        else:
            deadline = _NEVER
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
        if self._pending:
            self._send_pending()

    def _send_pending(self) -> None:
        """The pending ops as one batch: each op's serialized request framed as a BatchOp."""
        pending, earliest = self._pending, self._earliest
        self._pending, self._earliest = [], _NEVER
        parts: list[bytes] = []
        add = parts.append
        dropped = False
        for field, request, fut, _, _ in pending:
            if fut.done():  # cancelled (or expired) before it left
                dropped = True
                continue
            data = request.SerializeToString()
            n = len(data)
            add(_OP_HEADS[field].get(n) or _op_head(field, n))
            add(data)
        if dropped:
            pending = [p for p in pending if not p[2].done()]
            if not pending:
                return
        self._send(_Sent(pending, b"".join(parts)), earliest)

    def _send(self, sent: _Sent, earliest: float | None = None) -> None:
        self.batches += 1
        self.ops += len(sent.ops)
        self._arm(sent, earliest)
        if self.mode == PIPELINE:
            if self._stream is None or self._stream.broken:
                assert self._loop is not None
                self._stream = _Stream(self.pipeline, self._loop, self._fall_back)
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
            sent.fail(exc)
            return
        sent.deliver(resp.results)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        for t in list(self._tasks):
            t.cancel()
        _Sent(self._pending, b"").fail(errors.CancelledError("the client was closed"))
        self._pending, self._earliest = [], _NEVER


class Mux:
    """Per-address batching of single ops for one AsyncClient."""

    def __init__(self, stub_for: Callable[[str], state_pb2_grpc.StateStub],
                 pipeline_for: Callable[[str], Any], max_ops: int = 1000,
                 timeout: float | None = None) -> None:
        self._stub_for = stub_for
        self._pipeline_for = pipeline_for
        self._max_ops = max_ops
        self._timeout = timeout
        self._conns: dict[str, Conn] = {}

    def conn(self, address: str) -> Conn:
        conn = self._conns.get(address)
        if conn is None:
            conn = self._conns[address] = Conn(self._stub_for(address), self._pipeline_for(address),
                                               self._max_ops, self._timeout)
        return conn

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per address: mode, batches sent, ops sent (resends after a fallback included)."""
        return {a: {"mode": c.mode, "batches": c.batches, "ops": c.ops} for a, c in self._conns.items()}

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
