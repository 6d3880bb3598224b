"""Connections of a client to several node addresses: one long-lived channel per address, calls
spread round-robin, and an address that failed with UNAVAILABLE skipped for a while.

`AddressPool` is the pure choice logic shared by the sync and asyncio clients.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from shardstate.common import tracing
from shardstate.common.auth import CLIENT_TOKEN_ENV
from shardstate.common.authwire import with_token
from shardstate.common.errors import (
    ClientClosedError,
    InvalidArgumentError,
    ShardstateError,
    UnavailableError,
)
from shardstate.v1 import state_pb2_grpc

DOWN_FOR_S = 1.0
CLOSED = "the client is closed; calls after close() need a new client"
# gRPC's text for a connection that could not be made: refused at first, then (its poll-based
# client endpoint, shardstate.common.transport) "FD Shutdown (connect() timed out)" or "tcp handshaker shutdown"
# for the same refused connection while it backs off.
_CONNECT_FAILED = "failed to connect"
_REFUSED = "Connection refused"
_BACKING_OFF = ("FD Shutdown", "handshaker shutdown")
_CLOSED = "Socket closed"  # among others, what a TLS server does to a plaintext connection


def parse_addresses(addresses: str | Iterable[str]) -> tuple[str, ...]:
    """"h:p", "h:p,h2:p2" or a list of them -> a tuple of distinct addresses, in order."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    out: list[str] = []
    for a in items:
        if not isinstance(a, str):
            raise InvalidArgumentError(f"an address must be a str 'host:port', got {type(a).__name__}")
        a = a.strip()
        if not a:
            continue
        if ":" not in a or a.rsplit(":", 1)[1] == "":
            raise InvalidArgumentError(f"address {a!r} is not 'host:port'")
        if a not in out:
            out.append(a)
    if not out:
        raise InvalidArgumentError("at least one address 'host:port' is required")
    return tuple(out)


class AddressPool:
    """Round-robin over addresses, skipping those marked down until their time is up."""

    def __init__(self, addresses: Sequence[str], down_for: float = DOWN_FOR_S, tls: bool = False) -> None:
        self.addresses = tuple(addresses)
        self.tls = tls  # the client connects with TLS credentials
        self.down_for = down_for
        self._counter = itertools.count()  # next() on a count is atomic under the GIL
        self._down_until: dict[str, float] = {}
        self._refused: set[str] = set()  # addresses whose last connect attempt was refused

    def explain(self, address: str, exc: ShardstateError) -> ShardstateError:
        """A failure to connect said plainly, naming the address; any other error as it is."""
        if not isinstance(exc, UnavailableError) or _CONNECT_FAILED not in exc.message:
            return exc
        msg = exc.message
        if _REFUSED in msg:
            self._refused.add(address)
            reason = "connection refused (is a router or shard listening there?)"
        elif address in self._refused and any(s in msg for s in _BACKING_OFF):
            reason = "connection refused (is a router or shard listening there?)"
        else:
            reason = msg.split("last error: ", 1)[-1]
            if not self.tls and reason.endswith(_CLOSED):
                reason += " (if the cluster serves TLS, give the client ca_file=)"
        out = UnavailableError(f"cannot connect to {address}: {reason}")
        out.__cause__ = exc
        return out

    def pick(self) -> str:
        n = len(self.addresses)
        if n == 1:
            return self.addresses[0]
        start = next(self._counter)
        now = time.monotonic()
        for i in range(n):
            a = self.addresses[(start + i) % n]
            if self._down_until.get(a, 0.0) <= now:
                return a
        # All down: the one that comes back first.
        return min(self.addresses, key=lambda a: self._down_until.get(a, 0.0))

    def mark_down(self, address: str) -> None:
        self._down_until[address] = time.monotonic() + self.down_for

    def mark_up(self, address: str) -> None:
        self._refused.discard(address)
        if address in self._down_until:
            self._down_until.pop(address, None)

    def is_up(self, address: str) -> bool:
        return self._down_until.get(address, 0.0) <= time.monotonic()

    def other_up(self, address: str) -> bool:
        """Whether another address is up, so a retry can go there without waiting."""
        return any(a != address and self.is_up(a) for a in self.addresses)


def client_token(token: str | None) -> str | None:
    """The token a client sends: `token`, else SHARDSTATE_TOKEN, else none."""
    if token is not None and not isinstance(token, str):
        raise InvalidArgumentError(f"token must be a str, got {type(token).__name__}")
    return token or os.environ.get(CLIENT_TOKEN_ENV) or None


class SyncChannels:
    """One `grpc.Channel` and State stub per address, made on first use; with a token, every
    call on them sends it (`authorization: Bearer ...`)."""

    def __init__(self, options: list[tuple[str, Any]],
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None) -> None:
        self._options = options
        self._credentials = credentials
        self._token = token
        self._stubs: dict[str, state_pb2_grpc.StateStub] = {}
        self._by_address: dict[str, grpc.Channel] = {}
        self._channels: list[grpc.Channel] = []
        self._lock = threading.Lock()
        self.closed = False

    def channel(self, address: str) -> grpc.Channel:
        ch = self._by_address.get(address)
        if ch is None:
            with self._lock:
                if self.closed:
                    raise ClientClosedError(CLOSED)
                ch = self._by_address.get(address)
                if ch is None:
                    if self._credentials is not None:
                        ch = grpc.secure_channel(address, self._credentials, options=self._options)
                    else:
                        ch = grpc.insecure_channel(address, options=self._options)
                    self._channels.append(ch)
                    traced = tracing.client_interceptors()
                    if traced:
                        ch = grpc.intercept_channel(ch, *traced)
                    ch = with_token(ch, self._token)
                    self._by_address[address] = ch
        return ch

    def stub(self, address: str) -> state_pb2_grpc.StateStub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = state_pb2_grpc.StateStub(self.channel(address))
        return stub

    def close(self) -> None:
        with self._lock:
            self.closed = True
            for ch in self._channels:
                ch.close()
            self._channels.clear()
            self._by_address.clear()
            self._stubs.clear()


class AsyncChannels:
    """One `grpc.aio.Channel` and State stub per address, made on first use (inside the loop);
    with a token, every call and stream on them sends it."""

    def __init__(self, options: list[tuple[str, Any]],
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None) -> None:
        self._options = options
        self._credentials = credentials
        self._token = token
        self._stubs: dict[str, state_pb2_grpc.StateStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.closed = False

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            if self.closed:
                raise ClientClosedError(CLOSED)
            traced = tracing.client_interceptors(aio=True) or None
            if self._credentials is not None:
                ch = grpc.aio.secure_channel(address, self._credentials, options=self._options,
                                             interceptors=traced)
            else:
                ch = grpc.aio.insecure_channel(address, options=self._options, interceptors=traced)
            ch = with_token(ch, self._token)
            self._channels[address] = ch
        return ch

    def stub(self, address: str) -> state_pb2_grpc.StateStub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = state_pb2_grpc.StateStub(self.channel(address))  # type: ignore[arg-type]
        return stub

    async def close(self) -> None:
        self.closed = True
        channels, self._channels = self._channels, {}
        self._stubs.clear()
        for ch in channels.values():
            await ch.close()
