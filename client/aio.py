"""The asyncio client: `AsyncClient` and its `AsyncSession` handles, the same surface as the
sync Client with async/await, driving the same operation generators (shardstate.operations).

With `batching=True` (the default) concurrent single ops are coalesced per event-loop tick and
multiplexed over one Pipeline stream per address (shardstate.pipeline).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from shardstate import codec
from shardstate.batch import Batch
from shardstate.channels import (
    AddressPool,
    AsyncChannels,
    client_token,
    parse_addresses,
)
from shardstate.client import DEFAULT_TIMEOUT_S, VIEW_TIMEOUT_S
from shardstate.common import budget, errors, tls, tracing
from shardstate.common.clustermap import ClusterView
from shardstate.common.errors import ConflictError, ShardstateError, UnimplementedError
from shardstate.common.records import Change, Entry, Record, SessionInfo
from shardstate.common.transport import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from shardstate.operations import (
    Call,
    ClientCore,
    Emit,
    NextMessage,
    Op,
    OpenStream,
    SessionCore,
    Sleep,
    conflict_pause,
    gave_up,
    same_record,
)
from shardstate.pipeline import HOLD_S, UNARY, Mux, batch_bytes, raw_pipeline
from shardstate.retry import Retry, deadline_exceeded
from shardstate.txn import Txn, TxnResult
from shardstate.v1 import admin_pb2, admin_pb2_grpc
from shardstate.versions import UNKNOWN

T = TypeVar("T")


class AsyncClient:
    """asyncio connection to one or more routers (or shards); use from one event loop.

    Keywords as Client, plus `batching` (coalesce concurrent ops into Pipeline batches),
    `max_batch_ops` (largest batch sent) and `batch_hold_s` (the longest a batch in flight may
    hold its ops back before they are re-sent per shard, so a slow shard does not stall ops to
    the others; shardstate.pipeline). As on Client, `timeout` is the deadline of a whole call:
    its attempts (batched or not), backoff pauses and map fetches all fit in it, and a retried
    op rides its next batch under the same deadline."""

    def __init__(
        self,
        addresses: str | Iterable[str] = "127.0.0.1:7400",
        *,
        namespace: str = "default",
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: Retry | None = None,
        batching: bool = True,
        max_batch_ops: int = 1000,
        batch_hold_s: float = HOLD_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        options: Sequence[tuple[str, Any]] = (),
        version_cache: int = 256,
        direct: bool = False,
        token: str | None = None,
    ) -> None:
        credentials = tls.client_credentials(credentials, ca_file, cert_file, key_file, direct)
        pool = AddressPool(parse_addresses(addresses), tls=credentials is not None)
        opts = channel_options(max_message_bytes, options)
        answer_budget = budget.for_channel(opts)  # each batch asks for an answer within it
        self._core = ClientCore(pool, retry or Retry(), namespace, timeout, version_cache, direct,
                                max_response_bytes=answer_budget)
        self._fetching: asyncio.Future[None] | None = None  # direct mode: the map fetch under way
        self._channels = AsyncChannels(opts, credentials, client_token(token))
        self._max_batch_ops = max_batch_ops
        # With tracing on, a call made inside a span goes alone, as a unary call carrying its
        # `traceparent` (a batch shared with other callers cannot); see _call.
        self._traced = bool(tracing.client_interceptors(aio=True))
        self._mux = (Mux(self._channels.stub, self._pipeline, max_batch_ops, self._core.timeout,
                         self._cluster_view, codec.timeout(batch_hold_s, "batch_hold_s") or HOLD_S,
                         answer_budget, batch_bytes(max_message_bytes))
                     if batching else None)

    # ---- public surface ----

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._core.pool.addresses

    @property
    def namespace(self) -> str:
        return self._core.namespace

    @property
    def revision(self) -> int:
        """The highest header revision any response carried (for min_revision=)."""
        return self._core.revision

    @property
    def batching(self) -> bool:
        return self._mux is not None

    def batching_stats(self) -> dict[str, dict[str, Any]]:
        """Per address: the batching mode in use (pipeline, batch, unary), batches and ops sent."""
        return self._mux.stats() if self._mux is not None else {}

    def session(self, session_id: str, *, ttl: Any = None, namespace: str | None = None) -> AsyncSession:
        return AsyncSession(self, SessionCore(self._core, session_id, ttl, namespace))

    def list_sessions(self, prefix: str = "", *, page_size: int = 100, namespace: str | None = None,
                      timeout: float | None = None) -> AsyncIterator[SessionInfo]:
        """`async for info in c.list_sessions(prefix)`: every match, sorted, all pages."""
        return self._iterate(self._core.list_sessions(prefix, page_size, namespace, timeout))

    def batch(self) -> Batch[Awaitable[list[Any]]]:
        return Batch(self._core, self._run, self._max_batch_ops)

    async def multi_get(self, keys: Iterable[tuple[str, str]], *, consistency: Any = None,
                        timeout: float | None = None) -> list[Record | None]:
        b = self.batch()
        for sid, key in keys:
            b.get(sid, key, consistency=consistency)
        return await b.execute(timeout=timeout)

    async def close(self) -> None:
        if self._mux is not None:
            self._mux.close()
        await self._channels.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ---- the driver ----

    def _pipeline(self, address: str) -> Any:
        return raw_pipeline(self._channels.channel(address))

    async def _cluster_view(self, address: str) -> ClusterView | None:
        """The cluster map as `address` knows it (None when it cannot tell): which shard owns
        which session, for splitting a held-back batch by shard."""
        try:
            pb = await admin_pb2_grpc.AdminStub(self._channels.channel(address)).GetClusterMap(
                admin_pb2.GetClusterMapRequest(), timeout=VIEW_TIMEOUT_S)
        except grpc.RpcError:
            return None
        return ClusterView.of(pb) if pb.shards else None

    async def _call(self, call: Call) -> Any:
        """One logical call with retries (ClientCore decides them): its response message.
        Ops that can ride in a batch go through the address's batching Conn. Every attempt
        fits in the call's one deadline (fixed here unless the caller fixed it)."""
        core = self._core
        mux = self._mux
        direct = core.direct
        field = call.batch_field if mux is not None else None
        if self._traced and field is not None and tracing.in_span():
            field = None  # a traced call (also a sync Client's: its loop runs in the caller's context)
        timeout = core.start(call)
        deadline = call.deadline
        # What is left of the deadline for the next attempt; None: no deadline, or not looked
        # up yet (a batched attempt needs only the deadline, a unary one its timeout).
        left: float | None = None
        capped = core.retry.attempt_timeout  # each attempt's own cap (None: the deadline's)
        failures = tried = 0
        last: ShardstateError | None = None
        via_router = False
        while True:
            shard = None
            if direct is not None and not via_router:
                if direct.wants_refresh() and (left is None or left > 0):
                    await self._refresh_map(deadline)
                    left = None if deadline is None else deadline - core.clock()
                shard = direct.target(call)
            address = shard or core.pool.pick()
            conn = mux.conn(address) if field is not None else None  # type: ignore[union-attr]
            if conn is not None and conn.mode == UNARY:
                conn = None
            if deadline is not None:
                if left is None and (conn is None or tried):
                    left = deadline - core.clock()
                if left is not None and left <= 0:
                    raise deadline_exceeded(timeout, tried, last, call.method)
            try:
                if conn is not None:
                    if capped is None:
                        resp = await conn.submit(field, call.request, timeout, deadline)  # type: ignore[arg-type]
                    else:  # this attempt ends at its own timeout, unless the call's comes first
                        now = core.clock()
                        end = now + capped if deadline is None else min(deadline, now + capped)
                        resp = await conn.submit(field, call.request, end - now, end)  # type: ignore[arg-type]
                else:
                    resp = await self._unary(call, address, left if capped is None else core.retry.attempt(left))
            except ShardstateError as e:
                if conn is not None and conn.mode == UNARY and isinstance(e, UnimplementedError):
                    left = None
                    continue  # the server has neither Pipeline nor Batch: unary calls from now on
                tried += 1
                last = e
                if shard is not None and direct is not None and direct.failed(shard, e):
                    via_router = True  # the rest of this call's attempts: through a router
                else:
                    exc = core.pool.explain(address, e)
                    failures += 1
                    delay = core.failed(address, exc, failures, deadline, timeout, tried, call.method)
                    if delay:
                        await asyncio.sleep(delay)
                left = None
                continue
            core.succeeded(address)
            return resp

    async def _refresh_map(self, deadline: float | None = None) -> None:
        """Direct mode: fetch the cluster map from a router, once for every caller waiting;
        each waits until its call's `deadline` at most (the fetch goes on for the others)."""
        direct = self._core.direct
        assert direct is not None
        if self._fetching is None:
            async def fetch() -> None:
                try:
                    direct.adopt(await self._cluster_view(self._core.pool.pick()))
                finally:
                    self._fetching = None

            self._fetching = asyncio.ensure_future(fetch())
        if deadline is None:
            await asyncio.shield(self._fetching)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._fetching), deadline - self._core.clock())

    async def _unary(self, call: Call, address: str, timeout: float | None) -> Any:
        """One attempt of `call` as a unary RPC, given `timeout` s (None: no deadline)."""
        try:
            return await getattr(self._channels.stub(address), call.method)(call.request, timeout=timeout)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from e
        except asyncio.CancelledError:
            self._closed_under_caller()
            raise

    def _closed_under_caller(self) -> None:
        """Raise the client's own error when close() cancelled a call or stream under a
        caller that was not cancelled itself (else the caller's CancelledError goes on)."""
        task = asyncio.current_task()
        if self._channels.closed and (task is None or not task.cancelling()):
            raise errors.CancelledError("the client was closed") from None

    async def _perform(self, instr: Any) -> Any:
        if isinstance(instr, Call):
            return await self._call(instr)
        if isinstance(instr, Sleep):
            await asyncio.sleep(instr.seconds)
            return None
        raise errors.InternalError(f"the asyncio driver cannot perform {instr!r} here")

    async def _run(self, gen: Generator[Any, Any, T]) -> T:
        value: Any = None
        exc: ShardstateError | None = None
        while True:
            try:
                instr = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            try:
                if instr.__class__ is Call:
                    value, exc = await self._call(instr), None
                else:
                    value, exc = await self._perform(instr), None
            except ShardstateError as e:
                value, exc = None, e

    async def _iterate(self, gen: Op[Any]) -> AsyncIterator[Any]:
        value: Any = None
        exc: ShardstateError | None = None
        stream: Any = None
        try:
            while True:
                try:
                    instr = gen.throw(exc) if exc is not None else gen.send(value)
                except StopIteration:
                    return
                value, exc = None, None
                try:
                    if isinstance(instr, Emit):
                        yield instr.value
                    elif isinstance(instr, OpenStream):
                        if stream is not None:
                            stream.cancel()
                        stub = self._channels.stub(instr.address)
                        stream = value = getattr(stub, instr.method)(instr.request)
                    elif isinstance(instr, NextMessage):
                        try:
                            msg = await instr.handle.read()
                        except grpc.RpcError as e:
                            raise errors.from_rpc_error(e) from e
                        except asyncio.CancelledError:
                            self._closed_under_caller()
                            raise
                        value = None if msg is grpc.aio.EOF else msg
                    else:
                        value = await self._perform(instr)
                except ShardstateError as e:
                    value, exc = None, e
        finally:
            if stream is not None:
                stream.cancel()
            gen.close()


class AsyncSession:
    """One session of an AsyncClient; the same methods as Session, awaited."""

    def __init__(self, client: AsyncClient, core: SessionCore) -> None:
        self.client = client
        self._core = core
        self._run = client._run

    def __repr__(self) -> str:
        return f"AsyncSession({self._core.session_id!r}, namespace={self._core.namespace!r})"

    @property
    def session_id(self) -> str:
        return self._core.session_id

    @property
    def namespace(self) -> str:
        return self._core.namespace

    @property
    def revision(self) -> int:
        return self._core.revision

    # ---- keys ----

    async def get(self, key: str, *, consistency: str | None = None, min_revision: int = 0,
                  timeout: float | None = None) -> Record | None:
        return await self._run(self._core.get(key, consistency, min_revision, timeout))

    # put() and update() are the hot path: they call SessionCore's pieces directly, without
    # the generator driver (the same steps as SessionCore.put / SessionCore.update).

    async def put(self, key: str, value: bytes | str, *, expect: int | None = None, ttl: Any = None,
                  timeout: float | None = None) -> int:
        core = self._core
        key, data, expected, ttl_ms, t = core.put_args(key, value, expect, ttl, timeout)
        call = core.put_call(key, data, expected, ttl_ms, t)
        old = core.cache.lookup(key)
        resp = await self.client._call(call)
        return core.put_done(resp, key, data, expected, ttl_ms, old, "put").version

    async def update(self, key: str, fn: Callable[[Record | None], bytes | str | None], *,
                     ttl: Any = None, attempts: int = 100, timeout: float | None = None) -> Record | None:
        core = self._core
        key, ttl_ms, t = core.update_args(key, fn, ttl, timeout)
        t, deadline = core.client.deadline(t)  # one deadline for the read and every CAS
        old: Any = core.cache.lookup(key)
        confirmed = old is UNKNOWN  # old came from the server in this call
        if confirmed:
            old = await self._run(core.get(key, timeout=t, deadline=deadline))
        for n in range(max(1, attempts)):
            new = fn(old)
            while new is None:
                if confirmed:
                    return old  # type: ignore[no-any-return]
                # nothing to write from the cached record: decide again from the current one
                fresh = await self._run(core.get(key, timeout=t, deadline=deadline))
                if same_record(fresh, old):
                    return fresh
                old, confirmed = fresh, True
                new = fn(old)
            data = codec.to_bytes(new)
            expected = old.version if old else 0
            try:
                resp = await self.client._call(core.put_call(key, data, expected, ttl_ms, t, deadline))
                return core.put_done(resp, key, data, expected, ttl_ms, old, "update")
            except ConflictError as e:
                old, confirmed = e.current, True
                pause = conflict_pause(n)
                if deadline is not None:
                    core.client.no_time_for(deadline, pause, t, n + 1, e, "update")
                if pause:
                    await asyncio.sleep(pause)
        raise gave_up(key, attempts, old)

    async def delete(self, key: str, *, expect: int | None = None, timeout: float | None = None) -> bool:
        return await self._run(self._core.delete(key, expect, timeout))

    async def incr(self, key: str, delta: int = 1, *, ttl: Any = None,
                   timeout: float | None = None) -> int:
        return await self._run(self._core.incr(key, delta, ttl, timeout))

    async def scan(self, prefix: str = "", *, limit: int | None = 100, start_after: str = "",
                   keys_only: bool = False, consistency: str | None = None, min_revision: int = 0,
                   timeout: float | None = None) -> list[Record]:
        return await self._run(self._core.scan(prefix, limit, start_after, keys_only, consistency,
                                               min_revision, timeout))

    async def put_json(self, key: str, obj: Any, *, expect: int | None = None, ttl: Any = None,
                       timeout: float | None = None) -> int:
        return await self._run(self._core.put_json(key, obj, expect, ttl, timeout))

    async def get_json(self, key: str, default: Any = None, *, consistency: str | None = None,
                       min_revision: int = 0, timeout: float | None = None) -> Any:
        return await self._run(self._core.get_json(key, default, consistency=consistency,
                                                   min_revision=min_revision, timeout=timeout))

    async def update_json(self, key: str, fn: Callable[[Any], Any], *, ttl: Any = None,
                          attempts: int = 100, timeout: float | None = None) -> Any:
        return await self._run(self._core.update_json(key, fn, ttl, attempts, timeout))

    # ---- logs ----

    async def append(self, stream: str, entries: Any, *, timeout: float | None = None) -> list[int]:
        return await self._run(self._core.append(stream, entries, timeout))

    async def read(self, stream: str, *, last: int = 0, from_seq: int = 0, to_seq: int = 0,
                   after_seq: int = 0, limit: int | None = None, consistency: str | None = None,
                   min_revision: int = 0, timeout: float | None = None) -> list[Entry]:
        return await self._run(self._core.read(stream, last, from_seq, to_seq, after_seq, limit,
                                               consistency, min_revision, timeout))

    async def pop(self, stream: str, *, timeout: float | None = None) -> Entry | None:
        return await self._run(self._core.pop(stream, timeout))

    async def trim(self, stream: str, *, before_seq: int = 0, keep_last: int = 0,
                   timeout: float | None = None) -> int:
        return await self._run(self._core.trim(stream, before_seq, keep_last, timeout))

    # ---- the session ----

    def txn(self) -> Txn[Awaitable[TxnResult]]:
        return Txn(self._core, self._run)

    async def touch(self, ttl: Any = None, *, timeout: float | None = None) -> int:
        return await self._run(self._core.touch(ttl, timeout))

    async def drop(self, *, timeout: float | None = None) -> bool:
        return await self._run(self._core.drop(timeout))

    async def info(self, *, consistency: str | None = None, min_revision: int = 0,
                   timeout: float | None = None) -> SessionInfo | None:
        return await self._run(self._core.info(consistency, min_revision, timeout))

    def watch(self, from_revision: int = 0, *, prefix: str = "",
              progress: bool = False) -> AsyncIterator[Change]:
        """`async for change in s.watch(...)`."""
        return self.client._iterate(self._core.watch(from_revision, prefix, progress))
