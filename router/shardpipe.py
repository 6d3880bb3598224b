"""Sub-batches to one shard: over a long-lived Pipeline stream when the shard has one, else unary Batch.

Each shard address gets one bidi stream; requests carry router-chosen ids and answers are
matched back to their waiting futures. A broken stream fails what is in flight with
UNAVAILABLE (those ops may or may not have run; request_ids make the caller's retry safe) and
the next sub-batch opens a new stream. A shard answering UNIMPLEMENTED is sent unary Batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

import grpc
from grpc import aio

from shardstate import errors
from shardstate.router.logs import fields
from shardstate.router.nodes import NodePool
from shardstate.router.wire import (
    RawBatch,
    RawBatchResponse,
    RawPipelineRequest,
    RawPipelineResponse,
)

log = logging.getLogger("shardstate.router.shardpipe")


class SubBatchError(Exception):
    """The whole sub-batch failed: `code`/`message` for every op in it."""

    def __init__(self, code: grpc.StatusCode, message: str, rpc_error: grpc.RpcError | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.rpc_error = rpc_error


class _Stream:
    """One open Pipeline stream to a shard and the futures waiting on it."""

    def __init__(self, call: Any, address: str) -> None:
        self.call = call
        self.address = address
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count(1)
        self.write_lock = asyncio.Lock()
        self.closed = False
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        err: BaseException | None = None
        try:
            async for raw in self.call:
                resp = RawPipelineResponse.FromString(raw)
                fut = self.pending.pop(resp.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
            err = SubBatchError(grpc.StatusCode.UNAVAILABLE, f"pipeline stream to {self.address} ended")
        except aio.AioRpcError as e:
            err = SubBatchError(e.code(), e.details() or "", e)
        except asyncio.CancelledError:
            err = SubBatchError(grpc.StatusCode.UNAVAILABLE, f"pipeline stream to {self.address} closed")
        except Exception as e:
            err = SubBatchError(grpc.StatusCode.UNAVAILABLE, f"pipeline stream to {self.address} broke: {e}")
        finally:
            self.closed = True
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(err or SubBatchError(grpc.StatusCode.UNAVAILABLE, "stream closed"))
            self.pending.clear()

    async def send(self, ops: list[bytes], timeout: float) -> Any:
        rid = next(self.ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        try:
            payload = RawPipelineRequest(id=rid, batch=RawBatch(ops=ops)).SerializeToString()
            async with self.write_lock:
                if self.closed:
                    raise SubBatchError(grpc.StatusCode.UNAVAILABLE, f"pipeline stream to {self.address} closed")
                await self.call.write(payload)
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise SubBatchError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"shard at {self.address} did not answer within the deadline") from None
        except aio.AioRpcError as e:
            raise SubBatchError(e.code(), e.details() or "", e) from None
        except (aio.UsageError, grpc.RpcError, RuntimeError) as e:
            if not fut.done():
                fut.cancel()
            raise SubBatchError(grpc.StatusCode.UNAVAILABLE, f"pipeline stream to {self.address} broke: {e}") from None
        finally:
            self.pending.pop(rid, None)

    async def close(self) -> None:
        self.closed = True
        self.call.cancel()
        self.reader.cancel()
        with contextlib.suppress(BaseException):
            await self.reader


class ShardLinks:
    """Per shard address: the Pipeline stream (or the knowledge that there is none)."""

    def __init__(self, nodes: NodePool, use_pipeline: bool = True) -> None:
        self.nodes = nodes
        self.use_pipeline = use_pipeline
        self._streams: dict[str, _Stream] = {}
        self._no_pipeline: set[str] = set()
        self._opening: dict[str, asyncio.Lock] = {}

    async def _stream(self, address: str) -> _Stream:
        s = self._streams.get(address)
        if s is not None and not s.closed:
            return s
        lock = self._opening.setdefault(address, asyncio.Lock())
        async with lock:
            s = self._streams.get(address)
            if s is None or s.closed:
                call = self.nodes.bidi(address, "Pipeline")()
                s = _Stream(call, address)
                self._streams[address] = s
            return s

    async def batch(self, address: str, ops: list[bytes], timeout: float) -> tuple[bytes, list[bytes]]:
        """Run a sub-batch on the shard: (encoded header, encoded results in op order).
        Raises SubBatchError when the whole sub-batch failed."""
        if self.use_pipeline and address not in self._no_pipeline:
            stream = await self._stream(address)
            try:
                resp = await stream.send(ops, timeout)
            except SubBatchError as e:
                if e.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info("shard has no Pipeline; using unary Batch", extra=fields(address=address))
                self._no_pipeline.add(address)
            else:
                if resp.code:
                    raise SubBatchError(errors.code_from_int(resp.code), resp.message)
                return bytes(resp.batch.header), [bytes(r) for r in resp.batch.results]
        try:
            raw = await self.nodes.unary(address, "Batch")(RawBatch(ops=ops).SerializeToString(), timeout=timeout)
        except aio.AioRpcError as e:
            raise SubBatchError(e.code(), e.details() or "", e) from None
        resp = RawBatchResponse.FromString(raw)
        return bytes(resp.header), [bytes(r) for r in resp.results]

    async def close(self) -> None:
        streams = list(self._streams.values())
        self._streams.clear()
        for s in streams:
            await s.close()
