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
from typing import Any

import grpc
import grpc.aio
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
from shardstate.v1 import state_pb2, state_pb2_grpc
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


class _Unanswering(state_pb2_grpc.StateServicer):
    """A real gRPC server that takes Get, Batch and (unless `pipeline` is off) Pipeline calls
    and never answers them; without Pipeline it answers UNIMPLEMENTED, as a server built
    before Pipeline would."""

    def __init__(self, pipeline: bool) -> None:
        self.pipeline = pipeline

    async def Get(self, req: Any, context: Any) -> Any:
        await asyncio.sleep(3600)

    async def Batch(self, req: Any, context: Any) -> Any:
        await asyncio.sleep(3600)

    async def Watch(self, req: Any, context: Any) -> Any:
        await asyncio.sleep(3600)
        yield state_pb2.WatchResponse()

    async def Pipeline(self, requests: Any, context: Any) -> Any:
        if not self.pipeline:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Pipeline is not built here")
        async for _ in requests:
            pass
        await asyncio.sleep(3600)
        yield state_pb2.PipelineResponse()


@pytest.mark.parametrize("mode", ["pipeline", "batch", "unary", "watch"])
def test_async_close_ends_calls_in_flight_with_a_client_error(mode: str) -> None:
    """close() while a call without a deadline (or a watch) waits for its answer: the call
    ends with a ShardstateError saying the client was closed, in every batching mode - it
    neither waits forever nor throws asyncio.CancelledError into a task nobody cancelled."""
    async def watch(s: Any) -> None:
        async for _ in s.watch():
            pass

    async def main() -> None:
        server = grpc.aio.server()
        state_pb2_grpc.add_StateServicer_to_server(_Unanswering(mode == "pipeline"), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            c = AsyncClient(f"127.0.0.1:{port}", timeout=None, batching=mode not in ("unary", "watch"))
            s = c.session(uid())
            call = asyncio.ensure_future(watch(s) if mode == "watch" else s.get("k"))
            await asyncio.sleep(0.5)  # sent, unanswered
            assert not call.done()
            if c.batching:
                assert c.batching_stats()[f"127.0.0.1:{port}"]["mode"] == mode
            await c.close()
            done, _ = await asyncio.wait([call], timeout=T)
            assert done, "the call still waits after close()"
            exc = call.exception()
            assert isinstance(exc, ShardstateError) and "closed" in str(exc), repr(exc)
        finally:
            await server.stop(None)

    asyncio.run(main())


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
