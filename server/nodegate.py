"""Who may make node-to-node calls to a shard when TLS is on: only a peer whose certificate
(already verified against --tls-ca by the TLS handshake) has the cluster's node name as its
subject CN (--tls-node-name, default shardstate-node): a cluster certificate.

Node-to-node calls are every Replication RPC (Follow, Fence, MigrationStatus) and every Admin
RPC but GetClusterMap (PublishClusterMap, SwapClusterMap, Status, Backup, PromoteReplica …,
which routers and shards make of each other). State, GetClusterMap, health and reflection need
only a certificate of the CA (a direct-mode client's). Others get PERMISSION_DENIED naming the
certificate they would need and the one they presented.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from shardstate.common import errors, tls

REPLICATION = "/shardstate.v1.Replication/"
ADMIN = "/shardstate.v1.Admin/"
OPEN_TO_CLIENTS = frozenset({ADMIN + "GetClusterMap"})


def short(method: str) -> str:
    """/shardstate.v1.Replication/Follow -> Replication.Follow"""
    service, _, name = method.strip("/").partition("/")
    return f"{service.rsplit('.', 1)[-1]}.{name}"


def node_only(method: str) -> bool:
    """Whether `method` (a full gRPC method name) is a node-to-node call."""
    return method.startswith(REPLICATION) or (method.startswith(ADMIN) and method not in OPEN_TO_CLIENTS)


class NodeGate(aio.ServerInterceptor):
    """Refuses node-to-node calls from peers without a cluster certificate; passes every other
    call through untouched (installed only when TLS is on)."""

    def __init__(self, node_name: str) -> None:
        self.node_name = node_name

    def refusal(self, method: str, context: Any) -> errors.PermissionDeniedError | None:
        cn = tls.peer_common_name(context)
        if cn == self.node_name:
            return None
        has = f"subject CN {cn!r}" if cn else "no client certificate"
        return errors.PermissionDeniedError(
            f"{short(method)} is a node-to-node call: "
            f"it needs a cluster certificate (subject CN {self.node_name!r}, signed by the cluster's CA); "
            f"the caller presented {has}")

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or not node_only(details.method):
            return handler
        return self._guard(handler, details.method)

    def _guard(self, h: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        kw = {"request_deserializer": h.request_deserializer, "response_serializer": h.response_serializer}
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(h.unary_unary, method), **kw)
        if h.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._unary(h.stream_unary, method), **kw)
        if h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._stream(h.unary_stream, method), **kw)
        return grpc.stream_stream_rpc_method_handler(self._stream(h.stream_stream, method), **kw)

    def _unary(self, fn: Callable[[Any, Any], Any], method: str) -> Callable[[Any, Any], Any]:
        async def guarded(request: Any, context: Any) -> Any:
            refused = self.refusal(method, context)
            if refused is not None:
                await errors.abort(context, refused)
            out = fn(request, context)
            return await out if inspect.isawaitable(out) else out

        return guarded

    def _stream(self, fn: Callable[[Any, Any], Any], method: str) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def guarded(request: Any, context: Any) -> AsyncIterator[Any]:
            refused = self.refusal(method, context)
            if refused is not None:
                await errors.abort(context, refused)
            out = fn(request, context)
            if inspect.isawaitable(out):  # a coroutine writing with context.write
                await out
                return
            async for response in out:
                yield response

        return guarded
