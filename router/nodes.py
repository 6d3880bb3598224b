"""One long-lived grpc.aio channel per node address, and the raw and typed stubs over it.

Reconnect backoff is kept short so a restarted shard is reachable again within seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio

from shardstate.common import authwire, tls
from shardstate.common.transport import channel_options
from shardstate.v1 import admin_pb2_grpc, replication_pb2_grpc

STATE = "/shardstate.v1.State/"

# The router bounds what it forwards itself (max_request_bytes at its edge); keepalives find a
# dead shard connection between calls.
CHANNEL_OPTIONS = channel_options(-1, [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.enable_retries", 0),
])


class NodePool:
    """Channels by address, created on first use and closed together."""

    def __init__(self) -> None:
        self._channels: dict[str, aio.Channel] = {}
        self._calls: dict[tuple[str, str, str], Callable[..., Any]] = {}
        self._admin: dict[str, admin_pb2_grpc.AdminStub] = {}

    def channel(self, address: str) -> aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = authwire.node_channel(tls.aio_channel(address, CHANNEL_OPTIONS))
            self._channels[address] = ch
        return ch

    def _call(self, kind: str, address: str, method: str) -> Callable[..., Any]:
        key = (kind, address, method)
        fn = self._calls.get(key)
        if fn is None:
            ch = self.channel(address)
            factory = {
                "uu": ch.unary_unary,
                "us": ch.unary_stream,
                "ss": ch.stream_stream,
            }[kind]
            # No (de)serializers: requests and responses stay bytes end to end.
            fn = factory(STATE + method)
            self._calls[key] = fn
        return fn

    def unary(self, address: str, method: str) -> Callable[..., Any]:
        """Raw unary State call: fn(request_bytes, timeout=...) -> awaitable response bytes."""
        return self._call("uu", address, method)

    def server_stream(self, address: str, method: str) -> Callable[..., Any]:
        return self._call("us", address, method)

    def bidi(self, address: str, method: str) -> Callable[..., Any]:
        return self._call("ss", address, method)

    def admin(self, address: str) -> admin_pb2_grpc.AdminStub:
        stub = self._admin.get(address)
        if stub is None:
            stub = admin_pb2_grpc.AdminStub(self.channel(address))
            self._admin[address] = stub
        return stub

    def replication(self, address: str) -> replication_pb2_grpc.ReplicationStub:
        """Node-to-node calls of rebalancing (Fence, MigrationStatus)."""
        return replication_pb2_grpc.ReplicationStub(self.channel(address))

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        self._calls.clear()
        self._admin.clear()
        for ch in channels:
            await ch.close()


def describe(err: grpc.RpcError) -> str:
    """Short text of a failed call: its code and details."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}"
