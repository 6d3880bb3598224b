"""The caller's Pipeline stream: each tagged batch runs like a Batch (split per shard) and is
answered by id as soon as it completes, out of order.

A bounded number of batches run at once per stream, so a fast writer gets back-pressure from
gRPC flow control instead of piling tasks up in the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from shardstate import errors
from shardstate.router.batching import BatchRunner
from shardstate.router.wire import RawPipelineRequest, RawPipelineResponse, length_delimited, varint

log = logging.getLogger("shardstate.router.pipeline")

MAX_IN_FLIGHT = 256


def response_bytes(rid: int, batch_response: bytes) -> bytes:
    """PipelineResponse{id, batch} around an already encoded BatchResponse (no re-encoding)."""
    head = b"\x08" + varint(rid) if rid else b""
    return head + length_delimited(2, batch_response)


class PipelineHandler:
    def __init__(self, runner: BatchRunner) -> None:
        self.runner = runner

    async def one(self, raw: bytes) -> bytes:
        req = RawPipelineRequest.FromString(raw)
        deadline = asyncio.get_running_loop().time() + self.runner.fwd.default_timeout_s
        try:
            body = await self.runner.run(list(req.batch.ops), deadline)
        except errors.ShardstateError as e:
            return bytes(RawPipelineResponse(id=req.id, code=errors.to_code_int(e), message=e.message).SerializeToString())
        except Exception as e:
            log.exception("pipeline batch failed")
            err = errors.as_shardstate_error(e)
            return bytes(RawPipelineResponse(id=req.id, code=errors.to_code_int(err), message=err.message).SerializeToString())
        return response_bytes(req.id, body)

    async def serve(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        out: asyncio.Queue[bytes | None] = asyncio.Queue()
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()

        async def run(raw: bytes) -> None:
            try:
                out.put_nowait(await self.one(raw))
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for raw in requests:
                    await slots.acquire()
                    t = asyncio.ensure_future(run(raw))
                    running.add(t)
                    t.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*list(running), return_exceptions=True)
            finally:
                out.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                yield item
            await reader  # surfaces a broken incoming stream
        finally:
            reader.cancel()
            for t in list(running):
                t.cancel()
            with contextlib.suppress(BaseException):
                await reader
