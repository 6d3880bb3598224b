"""Tokens on the wire: channels that send a bearer token with every call (the client's token,
or the cluster token between nodes), and the servers' interceptor for the method-level check.

A channel is wrapped, not intercepted: grpc's client interceptors cost a task per call and
per stream message, a wrapper adds the metadata to each call's keyword arguments. Nothing
here runs unless auth is configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc import aio

from shardstate.common import errors
from shardstate.common.auth import OPEN, Authorizer, bearer, metadata_for, method_role

Metadata = tuple[tuple[str, str], ...]

# The cluster token's metadata, set once at start-up by a router or shard process
# (`set_cluster_token`): every node-to-node channel (`node_channel`) sends it.
NODE_METADATA: Metadata = ()


def set_cluster_token(token: str) -> None:
    global NODE_METADATA
    NODE_METADATA = metadata_for(token) if token else ()


class _Call:
    """A multicallable whose calls carry extra metadata (sync: also with_call and future)."""

    __slots__ = ("_fn", "_md")

    def __init__(self, fn: Any, md: Metadata) -> None:
        self._fn = fn
        self._md = md

    def _merged(self, metadata: Sequence[tuple[str, Any]] | None) -> Any:
        return self._md if not metadata else (*metadata, *self._md)

    def __call__(self, *args: Any, metadata: Sequence[tuple[str, Any]] | None = None, **kw: Any) -> Any:
        return self._fn(*args, metadata=self._merged(metadata), **kw)

    def with_call(self, *args: Any, metadata: Sequence[tuple[str, Any]] | None = None, **kw: Any) -> Any:
        return self._fn.with_call(*args, metadata=self._merged(metadata), **kw)

    def future(self, *args: Any, metadata: Sequence[tuple[str, Any]] | None = None, **kw: Any) -> Any:
        return self._fn.future(*args, metadata=self._merged(metadata), **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


class MetadataChannel:
    """A grpc (sync or aio) channel whose every call sends `md`; generated stubs take it as a channel."""

    def __init__(self, channel: Any, md: Metadata) -> None:
        self.channel = channel
        self._md = md

    def unary_unary(self, *a: Any, **kw: Any) -> Any:
        return _Call(self.channel.unary_unary(*a, **kw), self._md)

    def unary_stream(self, *a: Any, **kw: Any) -> Any:
        return _Call(self.channel.unary_stream(*a, **kw), self._md)

    def stream_unary(self, *a: Any, **kw: Any) -> Any:
        return _Call(self.channel.stream_unary(*a, **kw), self._md)

    def stream_stream(self, *a: Any, **kw: Any) -> Any:
        return _Call(self.channel.stream_stream(*a, **kw), self._md)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.channel, name)

    def __enter__(self) -> MetadataChannel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.channel.close()

    async def __aenter__(self) -> MetadataChannel:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.channel.close()


def with_token(channel: Any, token: str | None) -> Any:
    """`channel`, sending `authorization: Bearer token` with every call when a token is given."""
    return MetadataChannel(channel, metadata_for(token)) if token else channel


def node_channel(channel: Any) -> Any:
    """A node-to-node channel: it sends the cluster token when this process has one."""
    return MetadataChannel(channel, NODE_METADATA) if NODE_METADATA else channel


# ---- the server side ----


def _refusal(handler: grpc.RpcMethodHandler, err: errors.ShardstateError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers `err` without reading the request."""

    async def unary(request: Any, context: Any) -> Any:
        await errors.abort(context, err)

    async def streaming(request: Any, context: Any) -> Any:
        await errors.abort(context, err)
        yield  # pragma: no cover - an async generator that only aborts

    kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


class AuthInterceptor(aio.ServerInterceptor):
    """Who may call a method at all (`auth.method_role`): an unknown or missing token is
    UNAUTHENTICATED, a role below the method's PERMISSION_DENIED; State calls pass on to
    their handlers, which check each op's namespace and role."""

    def __init__(self, auth: Authorizer, node: bool) -> None:
        self.auth = auth
        self.node = node

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        need = method_role(method, self.node)
        handler = await continuation(details)
        if need == OPEN or handler is None:
            return handler
        try:
            self.auth.gate(details.invocation_metadata).method(need, method.rsplit("/", 1)[-1])
        except errors.ShardstateError as e:
            return _refusal(handler, e)
        return handler


def server_interceptors(auth: Authorizer | None, node: bool) -> list[aio.ServerInterceptor] | None:
    return [AuthInterceptor(auth, node)] if auth is not None else None


def gate_of(auth: Authorizer, context: Any) -> Any:
    """The caller's Gate (auth.Gate) from a grpc.aio context's metadata."""
    return auth.gate(context.invocation_metadata())


__all__ = ["NODE_METADATA", "AuthInterceptor", "MetadataChannel", "bearer", "gate_of", "node_channel",
           "server_interceptors", "set_cluster_token", "with_token"]
