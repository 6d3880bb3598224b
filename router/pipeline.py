"""The caller's Pipeline stream: each tagged batch runs like a Batch (split per shard) and is
answered by id as soon as it completes, out of order.

A bounded number of batches run at once per stream, so a fast writer gets back-pressure from
gRPC flow control instead of piling tasks up in the router. A message that does not parse is
answered INVALID_ARGUMENT under its id (when its id can be read, else 0); the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.message import DecodeError

from shardstate.common import errors
from shardstate.common.auth import Authorizer
from shardstate.common.protowire import last_varint
from shardstate.router.batching import BatchRunner
from shardstate.router.metrics import RouterMetrics
from shardstate.router.wire import RawPipelineRequest, RawPipelineResponse, length_delimited, varint

log = logging.getLogger("shardstate.router.pipeline")

MAX_IN_FLIGHT = 256


def malformed(raw: bytes, e: Exception) -> bytes:
    """The answer to a PipelineRequest that does not parse: INVALID_ARGUMENT for its id."""
    rid = last_varint(raw, 1)
    err = errors.InvalidArgumentError(f"malformed request: not a valid shardstate.v1.PipelineRequest ({e})")
    return bytes(RawPipelineResponse(id=rid, code=errors.to_code_int(err), message=err.message).SerializeToString())


def response_bytes(rid: int, batch_response: bytes) -> bytes:
    """PipelineResponse{id, batch} around an already encoded BatchResponse (no re-encoding)."""
    head = b"\x08" + varint(rid) if rid else b""
    return head + length_delimited(2, batch_response)


class PipelineHandler:
    def __init__(self, runner: BatchRunner, metrics: RouterMetrics, auth: Authorizer | None = None) -> None:
        self.runner = runner
        self.m = metrics
        self.auth = auth
        self.draining = False
        self._readers: set[asyncio.Task[None]] = set()

    def drain(self) -> None:
        """Shutdown: every stream stops reading, answers what it holds, then ends UNAVAILABLE
        so its caller re-sends elsewhere what it had not yet sent."""
        self.draining = True
        for r in list(self._readers):
            r.cancel()

    async def one(self, req: Any, metadata: Any = None) -> bytes:
        deadline = asyncio.get_running_loop().time() + self.runner.fwd.default_timeout_s
        t0 = time.perf_counter()
        ops = list(req.batch.ops)
        self.m.calls.inc()
        self.m.batch_ops.observe(len(ops))
        try:
            # Auth on: the token is looked up again for each message (a token removed from the
            # file stops working on open streams too), each op checked on its own.
            gate = self.auth.gate(metadata) if self.auth is not None else None
            body = await self.runner.run(ops, deadline, gate=gate, max_response_bytes=req.batch.max_response_bytes)
            self.m.done("Pipeline", t0)
        except Exception as e:
            self.m.failed("Pipeline", e, t0)
            err = errors.as_shardstate_error(e)
            if not isinstance(e, errors.ShardstateError):
                log.exception("pipeline batch failed")
            return bytes(RawPipelineResponse(id=req.id, code=errors.to_code_int(err), message=err.message).SerializeToString())
        return response_bytes(req.id, body)

    async def serve(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        if self.draining:
            raise errors.UnavailableError("the router is shutting down; use another router")
        out: asyncio.Queue[bytes | None] = asyncio.Queue()
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()
        ending: list[errors.ShardstateError] = []
        metadata = context.invocation_metadata() if self.auth is not None else None

        async def run(req: Any) -> None:
            try:
                out.put_nowait(await self.one(req, metadata))
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for raw in requests:
                    try:
                        req = RawPipelineRequest.FromString(raw)
                    except DecodeError as e:
                        out.put_nowait(malformed(raw, e))
                        continue
                    await slots.acquire()
                    t = asyncio.ensure_future(run(req))
                    running.add(t)
                    t.add_done_callback(running.discard)
                self._readers.discard(reader)  # done reading: a drain no longer interrupts it
            except asyncio.CancelledError:
                if not self.draining:
                    raise
                ending.append(errors.UnavailableError("the router is shutting down; resend unanswered batches to another router"))
            try:
                if running:
                    await asyncio.gather(*list(running), return_exceptions=True)
            finally:
                out.put_nowait(None)

        reader = asyncio.ensure_future(read())
        self._readers.add(reader)
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                yield item
            self._readers.discard(reader)
            await reader  # surfaces a broken incoming stream
            if ending:
                raise ending[0]
        finally:
            self._readers.discard(reader)
            reader.cancel()
            for t in list(running):
                t.cancel()
            with contextlib.suppress(BaseException):
                await reader
