"""Auto-batching for AsyncClient: single ops issued in the same event-loop tick are coalesced
into one batch and multiplexed over one long-lived `Pipeline` stream per address (tagged ids,
answered out of order) - DESIGN §8.

Fallbacks, per address: a server without Pipeline gets the same batches as unary `Batch`
calls; without Batch either, `accepts()` turns false and callers make plain unary calls.
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
from shardstate.v1 import state_pb2, state_pb2_grpc

Futures = list["asyncio.Future[Any]"]
PIPELINE, BATCH, UNARY = "pipeline", "batch", "unary"


def _fail(futs: Futures, exc: BaseException) -> None:
    for f in futs:
        if not f.done():
            f.set_exception(exc)


def _deliver(futs: Futures, results: Any) -> None:
    results = list(results)
    for i, f in enumerate(futs):
        if f.done():
            continue
        if i < len(results):
            f.set_result(results[i])
        else:
            f.set_exception(errors.InternalError(f"batch of {len(futs)} ops got {len(results)} results"))


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


class _Stream:
    """One Pipeline call: a queue feeding its requests, a task reading its responses."""

    def __init__(self, stub: state_pb2_grpc.StateStub, on_unimplemented: Callable[[list[tuple[Any, Futures]]], None]) -> None:
        self._queue: asyncio.Queue[state_pb2.PipelineRequest | None] = asyncio.Queue()
        self._waiting: dict[int, tuple[state_pb2.BatchRequest, Futures]] = {}
        self._next_id = 1
        self._on_unimplemented = on_unimplemented
        self.broken = False
        self.last_heard = asyncio.get_running_loop().time()
        self._call = stub.Pipeline(self._requests())
        self._reader = asyncio.ensure_future(self._read())

    async def _requests(self) -> AsyncIterator[state_pb2.PipelineRequest]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    def send(self, batch: state_pb2.BatchRequest, futs: Futures) -> None:
        rid = self._next_id
        self._next_id += 1
        self._waiting[rid] = (batch, futs)
        self._queue.put_nowait(state_pb2.PipelineRequest(id=rid, batch=batch))

    async def _read(self) -> None:
        exc: ShardstateError = errors.UnavailableError("the pipeline stream was ended by the server")
        try:
            async for resp in self._call:
                self.last_heard = asyncio.get_running_loop().time()
                entry = self._waiting.pop(resp.id, None)
                if entry is None:
                    continue
                if resp.code:
                    _fail(entry[1], codec.pipeline_error(resp))
                else:
                    _deliver(entry[1], resp.batch.results)
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
                for _, futs in waiting:
                    _fail(futs, exc)

    def silent_for(self, now: float) -> float:
        """How long the stream has owed answers without giving any (0 when it owes none)."""
        return now - self.last_heard if self._waiting and not self.broken else 0.0

    def abandon(self, exc: ShardstateError) -> None:
        """Give up on a stream that stopped answering (say a half-open connection): fail what
        it owes with a retryable error, so the retries go over a new stream."""
        self.broken = True
        waiting, self._waiting = list(self._waiting.values()), {}
        for _, futs in waiting:
            _fail(futs, exc)
        self.close()

    def close(self) -> None:
        self._queue.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()


class _Conn:
    """The batching state for one address."""

    def __init__(self, stub: state_pb2_grpc.StateStub, max_ops: int, timeout: float | None) -> None:
        self.stub = stub
        self.max_ops = max_ops
        self.timeout = timeout
        self.mode = PIPELINE
        self._pending: list[tuple[str, Any, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._stream: _Stream | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # batches sent, ops in them: how well calls coalesce
        self.ops = 0

    def submit(self, field: str, request: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        pending = self._pending
        pending.append((field, request, fut))
        if len(pending) >= self.max_ops:
            # A full batch leaves now: the server starts on it while later callers still run.
            self._pending = []
            self._send_ops(pending)
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)  # after every task already runnable in this tick
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        if pending:
            self._send_ops(pending)

    def _send_ops(self, pending: list[tuple[str, Any, asyncio.Future[Any]]]) -> None:
        live = [p for p in pending if not p[2].done()]
        for i in range(0, len(live), self.max_ops):
            chunk = live[i:i + self.max_ops]
            batch = state_pb2.BatchRequest(ops=[state_pb2.BatchOp(**{f: r}) for f, r, _ in chunk])
            self._send(batch, [fut for _, _, fut in chunk])

    def _send(self, batch: state_pb2.BatchRequest, futs: Futures) -> None:
        self.batches += 1
        self.ops += len(futs)
        if self.mode == PIPELINE:
            if self._stream is None or self._stream.broken:
                self._stream = _Stream(self.stub, self._fall_back)
            self._stream.send(batch, futs)
        elif self.mode == BATCH:
            self._spawn(self._unary_batch(batch, futs))
        else:
            _fail(futs, UnimplementedError("the server implements neither Pipeline nor Batch"))

    def expire(self, fut: asyncio.Future[Any], timeout: float) -> None:
        """An op's deadline passed: fail it, and drop the stream if it has gone silent."""
        if fut.done():
            return
        fut.set_exception(DeadlineExceededError(f"no answer within the deadline of {timeout} s (batched)"))
        stream = self._stream
        if stream is not None and stream.silent_for(asyncio.get_running_loop().time()) >= timeout:
            stream.abandon(errors.UnavailableError(f"the pipeline stream gave no answer for {timeout} s"))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fall_back(self, waiting: list[tuple[Any, Futures]]) -> None:
        if self.mode == PIPELINE:
            self.mode = BATCH
        for batch, futs in waiting:
            self._send(batch, futs)

    async def _unary_batch(self, batch: state_pb2.BatchRequest, futs: Futures) -> None:
        try:
            resp = await self.stub.Batch(batch, timeout=self.timeout)
        except grpc.RpcError as e:
            exc = errors.from_rpc_error(e)
            if isinstance(exc, UnimplementedError):
                self.mode = UNARY
            _fail(futs, exc)
            return
        _deliver(futs, resp.results)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        for t in list(self._tasks):
            t.cancel()
        _fail([fut for _, _, fut in self._pending], errors.CancelledError("the client was closed"))
        self._pending.clear()


class Mux:
    """Per-address batching of single ops for one AsyncClient."""

    def __init__(self, stub_for: Callable[[str], state_pb2_grpc.StateStub], max_ops: int = 1000,
                 timeout: float | None = None) -> None:
        self._stub_for = stub_for
        self._max_ops = max_ops
        self._timeout = timeout
        self._conns: dict[str, _Conn] = {}

    def _conn(self, address: str) -> _Conn:
        conn = self._conns.get(address)
        if conn is None:
            conn = self._conns[address] = _Conn(self._stub_for(address), self._max_ops, self._timeout)
        return conn

    def accepts(self, address: str) -> bool:
        """False once the server at address answered UNIMPLEMENTED to Pipeline and Batch."""
        return self._conn(address).mode != UNARY

    def mode(self, address: str) -> str:
        return self._conn(address).mode

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per address: mode, batches sent, ops sent (resends after a fallback included)."""
        return {a: {"mode": c.mode, "batches": c.batches, "ops": c.ops} for a, c in self._conns.items()}

    async def op(self, address: str, field: str, request: Any, timeout: float | None) -> Any:
        """One op through the next batch to address: its response message, or its error."""
        conn = self._conn(address)
        fut = conn.submit(field, request)
        if timeout is None:
            result = await fut
        else:
            # cheaper than asyncio.wait_for, which wraps every op in another future
            timer = asyncio.get_running_loop().call_later(timeout, conn.expire, fut, timeout)
            try:
                result = await fut
            finally:
                timer.cancel()
        return codec.batch_response(result, field)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
