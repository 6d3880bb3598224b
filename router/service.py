"""The State service on a router: one generic handler whose methods take and return bytes.

Session-scoped unary calls are forwarded whole; Batch, Pipeline, ListSessions and Watch go to
their own modules. Any failure becomes the caller's status through `forward.fail`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from shardstate.common import errors, tracing
from shardstate.common.auth import METHOD_ROLE, READ, Authorizer
from shardstate.common.metrics import gauged
from shardstate.router.batching import BatchRunner
from shardstate.router.forward import Forwarder, fail
from shardstate.router.listing import Lister
from shardstate.router.metrics import RouterMetrics
from shardstate.router.pipeline import PipelineHandler
from shardstate.router.watch import WatchProxy
from shardstate.router.wire import RawBatch, session_of

SERVICE = "shardstate.v1.State"
SESSION_UNARY = (
    "Get", "Put", "Delete", "Txn", "Increment", "Scan", "Append", "ReadLog", "TrimLog",
    "PopLast", "Touch", "DeleteSession", "GetSession",
)


def _bad_message(method: str, e: Exception) -> errors.InvalidArgumentError:
    return errors.InvalidArgumentError(f"{method} request is not a valid shardstate.v1 message: {e}")


class StateService:
    def __init__(self, fwd: Forwarder, runner: BatchRunner, lister: Lister, watch: WatchProxy,
                 pipeline: PipelineHandler, metrics: RouterMetrics, auth: Authorizer | None = None) -> None:
        self.auth = auth  # tokens on: each call's (each op's) namespace and role are checked here
        self.fwd = fwd
        self.runner = runner
        self.lister = lister
        self.watcher = watch
        self.pipeline = pipeline
        self.calls = metrics.calls
        self.m = metrics

    def drain(self) -> None:
        """Shutdown: long-lived streams end (UNAVAILABLE) once what they hold is answered."""
        self.pipeline.drain()
        self.watcher.drain()

    def _session_call(self, method: str) -> Callable[[bytes, Any], Awaitable[bytes]]:
        m = self.m
        auth = self.auth
        role = METHOD_ROLE[method]
        forward: Callable[[str, bytes, str, str, Any], Awaitable[bytes]] = self.fwd.unary
        if tracing.ON:  # chosen once: an untraced router runs no tracing code per call
            fwd = self.fwd

            async def traced(method: str, request: bytes, ns: str, sid: str, context: Any) -> bytes:
                with tracing.span(f"router forward {method}"):
                    return await fwd.unary(method, request, ns, sid, context, metadata=tracing.outgoing())

            forward = traced

        async def handler(request: bytes, context: Any) -> bytes:
            self.calls.inc()
            t0 = time.perf_counter()
            try:
                try:
                    ns, sid = session_of(request)
                except DecodeError as e:
                    raise _bad_message(method, e) from None
                if auth is not None:
                    auth.gate(context.invocation_metadata()).call(ns, role, method)
                resp = await forward(method, request, ns, sid, context)
                m.done(method, t0)
                return resp
            except Exception as e:
                m.failed(method, e, t0)
                await fail(context, e)
                raise  # unreachable: fail() aborts

        return tracing.traced_handler(handler, f"router {method}") if tracing.ON else handler

    async def batch(self, request: bytes, context: Any) -> bytes:
        self.calls.inc()
        t0 = time.perf_counter()
        try:
            try:
                raw = RawBatch.FromString(request)
            except DecodeError as e:
                raise _bad_message("Batch", e) from None
            ops = list(raw.ops)
            self.m.batch_ops.observe(len(ops))
            gate = self.auth.gate(context.invocation_metadata()) if self.auth is not None else None
            resp = await self.runner.run(ops, self.fwd.deadline(context), gate=gate,
                                         max_response_bytes=raw.max_response_bytes)
            self.m.done("Batch", t0)
            return resp
        except Exception as e:
            self.m.failed("Batch", e, t0)
            await fail(context, e)
            raise

    async def list_sessions(self, request: bytes, context: Any) -> bytes:
        self.calls.inc()
        t0 = time.perf_counter()
        try:
            try:
                gate = self.auth.gate(context.invocation_metadata()) if self.auth is not None else None
                resp = await self.lister.list(request, context, gate)
            except DecodeError as e:
                raise _bad_message("ListSessions", e) from None
            self.m.done("ListSessions", t0)
            return resp
        except Exception as e:
            self.m.failed("ListSessions", e, t0)
            await fail(context, e)
            raise

    async def watch(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        self.calls.inc()
        try:
            try:
                ns, _ = session_of(request)
            except DecodeError as e:
                raise _bad_message("Watch", e) from None
            if self.auth is not None:
                self.auth.gate(context.invocation_metadata()).call(ns, READ, "Watch")
            async for resp in gauged(self.m.watches, self.watcher.watch(request, context)):
                yield resp
        except Exception as e:
            self.m.failed("Watch", e, time.perf_counter())
            await fail(context, e)

    async def pipe(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        try:  # each request message counts as a call (PipelineHandler.one)
            async for resp in self.pipeline.serve(requests, context):
                yield resp
        except Exception as e:
            await fail(context, e)

    def handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, grpc.RpcMethodHandler] = {
            m: grpc.unary_unary_rpc_method_handler(self._session_call(m)) for m in SESSION_UNARY
        }
        methods["Batch"] = grpc.unary_unary_rpc_method_handler(self.batch)
        methods["ListSessions"] = grpc.unary_unary_rpc_method_handler(self.list_sessions)
        methods["Watch"] = grpc.unary_stream_rpc_method_handler(self.watch)
        methods["Pipeline"] = grpc.stream_stream_rpc_method_handler(self.pipe)
        return grpc.method_handlers_generic_handler(SERVICE, methods)
