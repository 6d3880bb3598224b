"""Sub-batches to one shard: coalesced while the previous write is in flight, over a long-lived Pipeline stream when
the shard has one, else unary Batch.

Each shard address gets one bidi stream; requests carry router-chosen ids and the reader hands
each answer straight to the futures of the sub-batches it carried (no task per batch). A broken stream fails what is in flight with
UNAVAILABLE (those ops may or may not have run; request_ids make the caller's retry safe) and
the next sub-batch opens a new stream. A shard answering UNIMPLEMENTED is sent unary Batch.

Byte budgets (BatchRequest.max_response_bytes): each sub-batch has one (its share of its
caller's); a shard message carrying several asks for the smallest, so no sub-batch's answer
passes its own. Ops a shard left unprocessed because other callers' answers in the same
message filled it are sent again here, first in the next message (whose first op always
runs), until the sub-batch's own answer reaches its budget: a caller sees unprocessed ops only
for what its own batch asked (a unary call never).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from shardstate.common import budget, errors
from shardstate.common.budget import wire_tail
from shardstate.common.jsonlog import fields
from shardstate.common.metrics import Registry
from shardstate.router.nodes import NodePool
from shardstate.router.wire import (
    RawBatch,
    RawBatchResponse,
    RawPipelineResponse,
    error_result,
    limit_result,
    repeated_bytes,
    unprocessed,
    varint,
)

log = logging.getLogger("shardstate.router.shardlink")


class SubBatchError(Exception):
    """The whole sub-batch failed: `code`/`message` for every op in it (`error`: the typed
    error when the router refused it itself)."""

    def __init__(self, code: grpc.StatusCode, message: str, rpc_error: grpc.RpcError | None = None,
                 error: errors.ShardstateError | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.rpc_error = rpc_error
        self.error = error


Settle = Callable[[str, "list[_Unit]", bytes, "list[bytes]"], None]


class _Stream:
    """One open Pipeline stream to a shard and the chunks waiting for their answer."""

    def __init__(self, call: Any, address: str, settle: Settle) -> None:
        self.call = call
        self.address = address
        self.settle = settle
        self.pending: dict[int, list[_Unit]] = {}
        self.ids = itertools.count(1)
        self.closed = False
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        err: SubBatchError | None = None
        try:
            async for raw in self.call:
                resp = RawPipelineResponse.FromString(raw)
                chunk = self.pending.pop(resp.id, None)
                if chunk is None:
                    continue
                if resp.code:
                    _fail(chunk, SubBatchError(errors.code_from_int(resp.code), resp.message))
                else:
                    self.settle(self.address, chunk, bytes(resp.batch.header), list(resp.batch.results))
            err = SubBatchError(grpc.StatusCode.UNAVAILABLE, f"pipeline stream to {self.address} ended")
        except aio.AioRpcError as e:
            err = SubBatchError(e.code(), e.details() or "", e)
        except asyncio.CancelledError:
            err = SubBatchError(grpc.StatusCode.UNAVAILABLE, f"pipeline stream to {self.address} closed")
        except Exception as e:
            err = SubBatchError(grpc.StatusCode.UNAVAILABLE, f"pipeline stream to {self.address} broke: {e}")
        finally:
            self.closed = True
            for chunk in self.pending.values():
                _fail(chunk, err or SubBatchError(grpc.StatusCode.UNAVAILABLE, "stream closed"))
            self.pending.clear()

    async def submit(self, ops: list[bytes], chunk: list[_Unit], budget: int) -> None:
        """Write one batch on the stream; its answer settles `chunk`'s futures."""
        rid = next(self.ids)
        payload = pipeline_request(rid, ops, budget)
        if self.closed:
            raise SubBatchError(grpc.StatusCode.UNAVAILABLE, f"pipeline stream to {self.address} closed")
        self.pending[rid] = chunk
        try:
            await self.call.write(payload)
        except aio.AioRpcError as e:
            self.pending.pop(rid, None)
            raise SubBatchError(e.code(), e.details() or "", e) from None
        except Exception as e:  # e.g. asyncio.InvalidStateError "RPC already finished"
            self.pending.pop(rid, None)
            self.closed = True  # the next batch opens a new stream
            raise SubBatchError(grpc.StatusCode.UNAVAILABLE, f"pipeline stream to {self.address} broke: {e}") from None

    async def close(self) -> None:
        self.closed = True
        self.call.cancel()
        self.reader.cancel()
        with contextlib.suppress(BaseException):
            await self.reader


def pipeline_request(rid: int, ops: list[bytes], budget: int = 0) -> bytes:
    """PipelineRequest{id, batch{ops, max_response_bytes}} framed around the encoded ops (no
    re-encoding)."""
    parts, size = repeated_bytes(1, ops)
    tail = wire_tail(budget)
    if tail:
        parts.append(tail)
        size += len(tail)
    return b"".join([b"\x08", varint(rid), b"\x12", varint(size), *parts])


@dataclass(slots=True)
class _Unit:
    """One caller's sub-batch waiting to be coalesced; never split across shard batches, so
    its ops on one session keep their order."""

    ops: list[bytes]
    size: int
    deadline: float
    fut: asyncio.Future[tuple[bytes, list[bytes]]]
    budget: int  # BatchRequest.max_response_bytes for its ops' answer (> 0)


def _unprocessed(results: list[bytes]) -> list[int]:
    """The positions of the unprocessed results (a two-byte comparison for any other)."""
    return [k for k, r in enumerate(results) if unprocessed(r)]


def _fail(chunk: list[_Unit], e: SubBatchError) -> None:
    for u in chunk:
        if not u.fut.done():
            u.fut.set_exception(e)


def expire_at(deadline: float, waiting: list[tuple[str, asyncio.Future[Any]]]) -> asyncio.TimerHandle:
    """One timer for many sub-batches: at loop time `deadline`, each of `waiting`
    (address, future) not yet answered fails DEADLINE_EXCEEDED. Cancel it once all are done."""

    def expire() -> None:
        for address, fut in waiting:
            if not fut.done():
                fut.set_exception(SubBatchError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                f"shard at {address} did not answer within the deadline"))

    return asyncio.get_running_loop().call_at(deadline, expire)


class ShardLinks:
    """Per shard address: coalesces the sub-batches (and single ops) that queue up while the
    previous write is in flight into one shard batch, sent over the Pipeline stream (or unary
    Batch when the shard has no Pipeline or it is switched off)."""

    def __init__(self, nodes: NodePool, metrics: Registry, use_pipeline: bool = True, max_ops: int = 1000,
                 max_bytes: int = 4 * 1024 * 1024, max_response_bytes: int = budget.DEFAULT_MAX_RESPONSE_BYTES) -> None:
        self.nodes = nodes
        self.use_pipeline = use_pipeline
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self.max_response_bytes = max_response_bytes  # a sub-batch's budget when its caller gave none
        self._streams: dict[str, _Stream] = {}
        self._no_pipeline: set[str] = set()
        self._opening: dict[str, asyncio.Lock] = {}
        self._queued: dict[str, list[_Unit]] = {}
        self._writers: dict[str, asyncio.Future[None]] = {}
        self._idle: dict[str, asyncio.Future[None]] = {}  # what an idle writer waits on
        self._sending: set[asyncio.Task[None]] = set()
        self.units = metrics.counter("shardstate_router_shard_units_total",
                                     "sub-batches queued for a shard (one per caller batch and shard)")
        self.shard_batches = metrics.counter("shardstate_router_shard_batches_total",
                                             "coalesced batches sent to shards")
        self.resent = metrics.counter("shardstate_router_unprocessed_resent_total",
                                      "ops a shard left unprocessed (other callers' answers filled the message's "
                                      "byte budget) sent to it again")

    async def _stream(self, address: str) -> _Stream:
        s = self._streams.get(address)
        if s is not None and not s.closed:
            return s
        lock = self._opening.setdefault(address, asyncio.Lock())
        async with lock:
            s = self._streams.get(address)
            if s is None or s.closed:
                call = self.nodes.bidi(address, "Pipeline")()
                s = _Stream(call, address, self._settle)
                self._streams[address] = s
            return s

    def submit(self, address: str, ops: list[bytes], deadline: float,
               budget: int = 0) -> asyncio.Future[tuple[bytes, list[bytes]]]:
        """Queue ops for the shard at `address` (loop-time `deadline`; `budget`: the byte
        budget of their answer, 0 = max_response_bytes); the future resolves to (encoded header,
        encoded results in op order) or fails with SubBatchError when the shard batch failed
        whole. It has no deadline of its own: the caller bounds its wait (expire_at) and a
        unit whose future is done before it is sent is dropped."""
        fut: asyncio.Future[tuple[bytes, list[bytes]]] = asyncio.get_running_loop().create_future()
        size = sum([len(o) for o in ops])
        if size > self.max_bytes:
            # The shard would refuse the message carrying it, and with it the stream and every
            # other caller's ops on it: refused here, alone.
            err = errors.LimitExceededError.of("max_request_bytes", self.max_bytes, size, "request size")
            fut.set_exception(SubBatchError(err.code, err.message, error=err))
            return fut
        self._queue(address, _Unit(ops, size, deadline, fut, budget or self.max_response_bytes))
        self.units.inc()
        return fut

    def _queue(self, address: str, unit: _Unit, first: bool = False) -> None:
        q = self._queued.get(address)
        if q is None:
            q = self._queued[address] = []
        if first:
            q.insert(0, unit)
        else:
            q.append(unit)
        idle = self._idle.pop(address, None)
        if idle is not None:
            idle.set_result(None)
        elif address not in self._writers:
            self._writers[address] = asyncio.ensure_future(self._write_loop(address))

    def _settle(self, address: str, chunk: list[_Unit], header: bytes, results: list[bytes]) -> None:
        """Hand each unit of an answered shard batch its results (ops left unprocessed within
        the unit's own budget go again first)."""
        n = sum(len(u.ops) for u in chunk) if len(chunk) > 1 else len(chunk[0].ops)
        if len(results) != n:
            _fail(chunk, SubBatchError(grpc.StatusCode.INTERNAL, f"shard at {address} answered {len(results)} results for {n} ops"))
            return
        i = 0
        for u in chunk:
            j = i + len(u.ops)
            part = results if len(chunk) == 1 else results[i:j]
            i = j
            if u.fut.done():
                continue
            todo = _unprocessed(part)
            if todo:
                skip = set(todo)
                used = sum([len(r) for k, r in enumerate(part) if k not in skip])
                if used < u.budget:  # other callers' answers filled the message: again
                    self._again(address, u, header, part, todo, u.budget - used)
                    continue
            u.fut.set_result((header, part))

    def _again(self, address: str, u: _Unit, header: bytes, part: list[bytes], todo: list[int], left: int) -> None:
        """Send `u`'s unprocessed ops (at `todo` in `part`) again, first in the next message,
        within what is `left` of its budget; `u` is answered once they are."""
        ops = [u.ops[k] for k in todo]
        rest = _Unit(ops, sum([len(o) for o in ops]), u.deadline, asyncio.get_running_loop().create_future(), left)
        self.resent.inc(len(ops))

        def merged(f: asyncio.Future[tuple[bytes, list[bytes]]]) -> None:
            if u.fut.done():
                return
            out = list(part)
            if f.cancelled():
                failed = error_result(grpc.StatusCode.CANCELLED.value[0], "cancelled before the shard answered")
                got = [failed] * len(todo)
                head = header
            elif f.exception() is not None:
                e = f.exception()
                assert isinstance(e, SubBatchError)
                failed = limit_result(e.error) if e.error is not None else error_result(e.code.value[0], e.message)
                got, head = [failed] * len(todo), header
            else:
                head, got = f.result()
            for k, r in zip(todo, got, strict=True):
                out[k] = r
            u.fut.set_result((head, out))

        def given_up(_: asyncio.Future[Any]) -> None:
            if not rest.fut.done():
                rest.fut.cancel()  # the caller gave up: the ops still queued are dropped

        rest.fut.add_done_callback(merged)
        u.fut.add_done_callback(given_up)
        self._queue(address, rest, first=True)

    async def batch(self, address: str, ops: list[bytes], deadline: float, budget: int = 0) -> tuple[bytes, list[bytes]]:
        """Run ops on the shard at `address` by loop-time `deadline`: (encoded header, encoded
        results in op order). Raises SubBatchError when the shard batch failed whole."""
        if deadline <= asyncio.get_running_loop().time():  # too late to send it at all
            raise SubBatchError(grpc.StatusCode.DEADLINE_EXCEEDED, f"shard at {address} did not answer within the deadline")
        fut = self.submit(address, ops, deadline, budget)
        timer = expire_at(deadline, [(address, fut)])
        try:
            return await fut
        finally:
            timer.cancel()

    async def _write_loop(self, address: str) -> None:
        """One writer per shard, for the life of the links: what queues up while a write is in
        progress goes out together in the next one (Nagle without a timer: an idle link sends
        at once). Idle, it waits on a future the next submit completes (cheaper than a task
        per burst)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                units = self._queued.pop(address, None)
                if not units:
                    # No await between the empty pop and here: the next submit wakes us.
                    idle = self._idle[address] = loop.create_future()
                    await idle
                    continue
                for chunk in self._chunks(units):
                    try:
                        await self._dispatch(address, chunk)
                    except Exception as e:  # one bad answer or a bug never ends the writer
                        log.exception("a shard batch failed in the router", extra=fields(address=address))
                        _fail(chunk, SubBatchError(grpc.StatusCode.UNAVAILABLE,
                                                   f"sending to shard at {address} failed: {e}"))
        finally:
            self._idle.pop(address, None)
            self._writers.pop(address, None)

    def _chunks(self, units: list[_Unit]) -> list[list[_Unit]]:
        out: list[list[_Unit]] = []
        chunk: list[_Unit] = []
        n = size = 0
        for u in units:
            if u.fut.done():
                continue  # its caller gave up before it was sent
            if chunk and (n + len(u.ops) > self.max_ops or size + u.size > self.max_bytes):
                out.append(chunk)
                chunk, n, size = [], 0, 0
            chunk.append(u)
            n += len(u.ops)
            size += u.size
        if chunk:
            out.append(chunk)
        return out

    async def _dispatch(self, address: str, chunk: list[_Unit]) -> None:
        if len(chunk) == 1:
            ops, limit = chunk[0].ops, chunk[0].budget
        else:
            ops, limit = [op for u in chunk for op in u.ops], min([u.budget for u in chunk])
        self.shard_batches.inc()
        if self.use_pipeline and address not in self._no_pipeline:
            try:
                stream = await self._stream(address)
                await stream.submit(ops, chunk, limit)
                return
            except SubBatchError as e:
                if e.code != grpc.StatusCode.UNIMPLEMENTED:
                    _fail(chunk, e)
                    return
                log.info("shard has no Pipeline; using unary Batch", extra=fields(address=address))
                self._no_pipeline.add(address)
        timeout = max(0.001, max(u.deadline for u in chunk) - asyncio.get_running_loop().time())
        self._spawn(self._unary(address, chunk, ops, limit, timeout))

    async def _unary(self, address: str, chunk: list[_Unit], ops: list[bytes], limit: int, timeout: float) -> None:
        try:
            raw = await self.nodes.unary(address, "Batch")(RawBatch(ops=ops, max_response_bytes=limit).SerializeToString(),
                                                           timeout=timeout)
            resp = RawBatchResponse.FromString(raw)
        except aio.AioRpcError as e:
            _fail(chunk, SubBatchError(e.code(), e.details() or "", e))
            return
        except Exception as e:  # a bug must not leave callers waiting forever
            log.exception("a shard batch failed in the router", extra=fields(address=address))
            _fail(chunk, SubBatchError(grpc.StatusCode.INTERNAL, f"router error: {e}"))
            return
        self._settle(address, chunk, bytes(resp.header), list(resp.results))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.ensure_future(coro)
        self._sending.add(t)
        t.add_done_callback(self._sending.discard)

    async def close(self) -> None:
        for t in [*self._sending, *self._writers.values()]:
            t.cancel()
        streams = list(self._streams.values())
        self._streams.clear()
        for s in streams:
            await s.close()
