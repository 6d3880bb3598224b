"""Client edges (issue 13, defect 9) against real processes: calls after close() raise
ClientClosedError instead of reconnecting; an address where nothing listens is reported as a
refused connection naming the address; a message over gRPC's size limit names the limit
(max_request_bytes on the server, max_message_bytes on the client) like every other limit.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardstate import (
    NO_RETRY,
    AsyncClient,
    Client,
    ClientClosedError,
    ConstantBackoff,
    LimitExceededError,
    Retry,
    ShardstateError,
    UnavailableError,
)
from tests.procs import Procs
from tests.stubs import uid

MiB = 1024 * 1024
T = 30.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(shard address, router address)."""
    tmp: Path = tmp_path_factory.mktemp("edges")
    procs = Procs(tmp)
    try:
        shard = procs.shard("s1")
        router = procs.router([shard.address])
        yield shard.address, router.address
    finally:
        procs.close()


def free_address() -> str:
    """An address nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# ---- close() ----


def test_sync_client_refuses_calls_after_close(cluster: tuple[str, str]) -> None:
    c = Client(cluster[1], timeout=T)
    s = c.session(uid())
    assert s.put("k", b"v") > 0
    c.close()
    with pytest.raises(ClientClosedError, match="close"):
        s.get("k")
    with pytest.raises(ClientClosedError):
        c.session(uid()).put("k", b"v")
    with pytest.raises(ClientClosedError):
        list(c.list_sessions())
    assert issubclass(ClientClosedError, ShardstateError)


@pytest.mark.parametrize("batching", [True, False])
def test_async_client_refuses_calls_after_close(cluster: tuple[str, str], batching: bool) -> None:
    async def main() -> None:
        c = AsyncClient(cluster[1], timeout=T, batching=batching)
        s = c.session(uid())
        assert await s.put("k", b"v") > 0
        await c.close()
        with pytest.raises(ClientClosedError, match="close"):
            await s.get("k")
        with pytest.raises(ClientClosedError):
            await s.put("k", b"w")
        with pytest.raises(ClientClosedError):
            await s.append("log", [b"x"])
        with pytest.raises(ClientClosedError):
            _ = [i async for i in c.list_sessions()]

    asyncio.run(main())
    with Client(cluster[1], timeout=T) as c:  # nothing was written after close()
        assert sum(1 for _ in c.list_sessions()) >= 1


# ---- nothing listening ----

# Enough attempts that the later ones meet gRPC's backoff text ("FD Shutdown (connect() timed
# out)") rather than the first "Connection refused".
FEW = Retry(attempts=4, backoff=ConstantBackoff(0.3))


def test_sync_client_says_connection_refused_naming_the_address() -> None:
    address = free_address()
    with Client(address, timeout=5, retry=FEW) as c, pytest.raises(UnavailableError) as ei:
        c.session("a").get("k")
    assert f"cannot connect to {address}: connection refused" in ei.value.message, ei.value.message


@pytest.mark.parametrize("batching", [True, False])
def test_async_client_says_connection_refused_naming_the_address(batching: bool) -> None:
    address = free_address()

    async def main() -> str:
        async with AsyncClient(address, timeout=5, retry=FEW, batching=batching) as c:
            with pytest.raises(UnavailableError) as ei:
                await c.session("a").put("k", b"v")
            return ei.value.message

    message = asyncio.run(main())
    assert f"cannot connect to {address}: connection refused" in message, message


# ---- gRPC's own size limit ----


@pytest.mark.parametrize("via", ["shard", "router"])
def test_a_request_over_grpcs_limit_names_max_request_bytes(cluster: tuple[str, str], via: str) -> None:
    address = cluster[0] if via == "shard" else cluster[1]
    with Client(address, timeout=T, retry=NO_RETRY) as c:
        s = c.session(uid())
        with pytest.raises(LimitExceededError) as ei:
            s.put("big", b"x" * (5 * MiB))
        e = ei.value
        assert e.limit == "max_request_bytes"
        assert e.detail.value == 4 * MiB  # the default --max-request-bytes
        assert e.detail.actual > 5 * MiB
        assert "max_request_bytes=4194304" in e.message
        assert s.put("small", b"y") > 0  # the client and the server carry on
        assert s.get("big") is None


def test_a_request_over_the_clients_own_limit_names_max_message_bytes(cluster: tuple[str, str]) -> None:
    with (Client(cluster[1], timeout=T, retry=NO_RETRY, max_message_bytes=1 * MiB) as c,
          pytest.raises(LimitExceededError) as ei):
        c.session(uid()).put("big", b"x" * (2 * MiB))
    assert ei.value.limit == "max_message_bytes"
    assert ei.value.detail.value == 1 * MiB
    assert "max_message_bytes=1048576" in ei.value.message
