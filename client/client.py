"""The synchronous client: `Client` (addresses, retry, defaults) and its `Session` handles.

Every operation is the shared generator of shardstate.operations; this module only drives it
with blocking gRPC calls.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from shardstate.batch import Batch
from shardstate.channels import (
    CLOSED,
    AddressPool,
    SyncChannels,
    client_token,
    parse_addresses,
)
from shardstate.common import budget, errors, tls
from shardstate.common.clustermap import ClusterView
from shardstate.common.errors import ClientClosedError, ShardstateError
from shardstate.common.records import Change, Entry, Record, SessionInfo
from shardstate.common.transport import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from shardstate.operations import (
    Attempt,
    Call,
    ClientCore,
    Emit,
    FetchMap,
    NextMessage,
    Op,
    OpenStream,
    SessionCore,
    Sleep,
)
from shardstate.retry import Retry
from shardstate.txn import Txn, TxnResult
from shardstate.v1 import admin_pb2, admin_pb2_grpc

if TYPE_CHECKING:
    from shardstate.syncbatch import LoopBridge

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 10.0
VIEW_TIMEOUT_S = 5.0  # fetching the cluster map (direct mode, and splitting held-back batches)


class Client:
    """A connection to one or more routers (or shards). Thread-safe; share one per process.

    `retry`: the policy for UNAVAILABLE / DEADLINE_EXCEEDED (every mutation carries one
    request_id for all its attempts, so retries never apply twice). `timeout`: the default
    deadline of each call in seconds (None: none), overridable per call with `timeout=`. A
    deadline covers the whole call: it is fixed when the call starts, and every attempt,
    backoff pause and (direct mode) map fetch fits in it, each attempt getting what is left;
    when nothing is, the call raises DeadlineExceededError ("the call's deadline of N s passed
    after K attempts", the last attempt's error as __cause__). `update()`/`update_json()`,
    a paged `scan()`/`read()` and `batch().execute()` are one call each: their requests
    share one deadline. `list_sessions()` gives each page request its own. `token`: sent as
    `authorization: Bearer TOKEN` with every call, direct ones included (default:
    SHARDSTATE_TOKEN; none when unset).

    TLS: `ca_file` (PEM of the CA to trust; without it the system's roots), and for direct
    mode, whose shards require a client certificate, `cert_file` and `key_file`; or any
    `credentials=` of your own. The files are read once, here.

    `batching` (default on): a call made while several others of this client are under way
    (from other threads; syncbatch.SHARE_AT) goes through one AsyncClient on a private
    event-loop thread (shardstate.syncbatch), so calls made at the same moment share a
    Pipeline message, as AsyncClient's do; `max_batch_ops` caps a message. Other calls are
    plain blocking calls. `batching=False`: every call is a plain blocking call."""

    def __init__(
        self,
        addresses: str | Iterable[str] = "127.0.0.1:7400",
        *,
        namespace: str = "default",
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: Retry | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        options: Sequence[tuple[str, Any]] = (),
        version_cache: int = 256,
        direct: bool = False,
        token: str | None = None,
        batching: bool = True,
        max_batch_ops: int = 1000,
    ) -> None:
        credentials = tls.client_credentials(credentials, ca_file, cert_file, key_file, direct)
        pool = AddressPool(parse_addresses(addresses), tls=credentials is not None)
        opts = channel_options(max_message_bytes, options)
        self._bridge: LoopBridge | None = None
        if batching:
            from shardstate.aio import AsyncClient
            from shardstate.syncbatch import LoopBridge

            inner = AsyncClient(pool.addresses, namespace=namespace, timeout=timeout, retry=retry,
                                max_batch_ops=max_batch_ops, max_message_bytes=max_message_bytes,
                                credentials=credentials, options=options, version_cache=version_cache,
                                direct=direct, token=token)
            self._core = inner._core  # one core: the loop's calls and this thread's generators
            self._bridge = LoopBridge(inner)
        else:
            self._core = ClientCore(pool, retry or Retry(), namespace, timeout, version_cache, direct,
                                    max_response_bytes=budget.for_channel(opts))
        self._channels = SyncChannels(opts, credentials, client_token(token))

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

    def session(self, session_id: str, *, ttl: Any = None, namespace: str | None = None) -> Session:
        """A handle on one session. `ttl` (seconds): sent with every mutation, so the session
        expires that long after its last write."""
        return Session(self, SessionCore(self._core, session_id, ttl, namespace))

    def list_sessions(self, prefix: str = "", *, page_size: int = 100, namespace: str | None = None,
                      timeout: float | None = None) -> Iterator[SessionInfo]:
        """Every session of the namespace whose id starts with `prefix`, sorted, all pages."""
        return self._iterate(self._core.list_sessions(prefix, page_size, namespace, timeout))

    def batch(self) -> Batch[list[Any]]:
        return Batch(self._core, self._run)

    def multi_get(self, keys: Iterable[tuple[str, str]], *, consistency: Any = None,
                  timeout: float | None = None) -> list[Record | None]:
        """[(session_id, key), ...] -> [Record | None, ...] in one Batch call."""
        b = self.batch()
        for sid, key in keys:
            b.get(sid, key, consistency=consistency)
        return b.execute(timeout=timeout)

    @property
    def batching(self) -> bool:
        return self._bridge is not None

    def batching_stats(self) -> dict[str, dict[str, Any]]:
        """Per address: the batching mode in use (pipeline, batch, unary), batches and ops sent."""
        return self._bridge.client.batching_stats() if self._bridge is not None else {}

    def close(self) -> None:
        if self._bridge is not None:
            self._bridge.close()
        self._channels.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- the driver ----

    def _perform(self, instr: Any) -> Any:
        if isinstance(instr, Call):
            if self._bridge is not None:  # a call inside a span goes alone there too (aio._call)
                return self._bridge.perform(instr, self._alone)
            return self._alone(instr)
        if isinstance(instr, Attempt):
            call = instr.call
            method = getattr(self._channels.stub(instr.address), call.method)
            try:
                return method(call.request, timeout=instr.timeout)
            except grpc.RpcError as e:
                if self._channels.closed:  # close() cut it off
                    raise ClientClosedError(CLOSED) from e
                raise self._core.pool.explain(instr.address, errors.from_rpc_error(e)) from e
        if isinstance(instr, Sleep):
            time.sleep(instr.seconds)
            return None
        if isinstance(instr, FetchMap):
            timeout = VIEW_TIMEOUT_S if instr.timeout is None else min(VIEW_TIMEOUT_S, instr.timeout)
            try:
                pb = admin_pb2_grpc.AdminStub(self._channels.channel(instr.address)).GetClusterMap(
                    admin_pb2.GetClusterMapRequest(), timeout=timeout)
            except grpc.RpcError:
                return None
            return ClusterView.of(pb) if pb.shards else None
        raise errors.InternalError(f"the sync driver cannot perform {instr!r} here")

    def _alone(self, call: Call) -> Any:
        """One logical call as blocking unary attempts (ClientCore.retrying)."""
        return self._run(self._core.retrying(call))

    def _run(self, gen: Generator[Any, Any, T]) -> T:
        value: Any = None
        exc: ShardstateError | None = None
        while True:
            try:
                instr = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            try:
                value, exc = self._perform(instr), None
            except ShardstateError as e:
                value, exc = None, e

    def _iterate(self, gen: Op[Any]) -> Iterator[Any]:
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
                            value = next(instr.handle)
                        except StopIteration:
                            value = None
                        except grpc.RpcError as e:
                            raise errors.from_rpc_error(e) from e
                    else:
                        value = self._perform(instr)
                except ShardstateError as e:
                    value, exc = None, e
        finally:
            if stream is not None:
                stream.cancel()
            gen.close()


class Session:
    """One session of a Client. Remembers the last record it saw per key, so `update()` by a
    single writer is one compare-and-swap."""

    def __init__(self, client: Client, core: SessionCore) -> None:
        self.client = client
        self._core = core
        self._run = client._run

    def __repr__(self) -> str:
        return f"Session({self._core.session_id!r}, namespace={self._core.namespace!r})"

    @property
    def session_id(self) -> str:
        return self._core.session_id

    @property
    def namespace(self) -> str:
        return self._core.namespace

    @property
    def revision(self) -> int:
        """The highest revision this handle's responses carried (for min_revision=)."""
        return self._core.revision

    # ---- keys ----

    def get(self, key: str, *, consistency: str | None = None, min_revision: int = 0,
            timeout: float | None = None) -> Record | None:
        return self._run(self._core.get(key, consistency, min_revision, timeout))

    def put(self, key: str, value: bytes | str, *, expect: int | None = None, ttl: Any = None,
            timeout: float | None = None) -> int:
        """Write; returns the new version. `expect=v`: only if the version is v (0: only if
        absent), else ConflictError(current=...). `ttl` (seconds): the key's own TTL."""
        return self._run(self._core.put(key, value, expect, ttl, timeout))

    def update(self, key: str, fn: Callable[[Record | None], bytes | str | None], *, ttl: Any = None,
               attempts: int = 100, timeout: float | None = None) -> Record | None:
        """Compare-and-swap loop: `fn(old Record or None)` -> new value (None: no write).
        Returns the record written (or the current one when fn returned None); its updated_at
        and expires_at come from the version's HLC time, within a few ms of the server's."""
        return self._run(self._core.update(key, fn, ttl, attempts, timeout))

    def delete(self, key: str, *, expect: int | None = None, timeout: float | None = None) -> bool:
        """Returns whether the key existed; `expect=v` makes it a compare-and-delete."""
        return self._run(self._core.delete(key, expect, timeout))

    def incr(self, key: str, delta: int = 1, *, ttl: Any = None, timeout: float | None = None) -> int:
        return self._run(self._core.incr(key, delta, ttl, timeout))

    def scan(self, prefix: str = "", *, limit: int | None = 100, start_after: str = "",
             keys_only: bool = False, consistency: str | None = None, min_revision: int = 0,
             timeout: float | None = None) -> list[Record]:
        return self._run(self._core.scan(prefix, limit, start_after, keys_only, consistency,
                                         min_revision, timeout))

    def put_json(self, key: str, obj: Any, *, expect: int | None = None, ttl: Any = None,
                 timeout: float | None = None) -> int:
        return self._run(self._core.put_json(key, obj, expect, ttl, timeout))

    def get_json(self, key: str, default: Any = None, *, consistency: str | None = None,
                 min_revision: int = 0, timeout: float | None = None) -> Any:
        return self._run(self._core.get_json(key, default, consistency=consistency,
                                             min_revision=min_revision, timeout=timeout))

    def update_json(self, key: str, fn: Callable[[Any], Any], *, ttl: Any = None,
                    attempts: int = 100, timeout: float | None = None) -> Any:
        return self._run(self._core.update_json(key, fn, ttl, attempts, timeout))

    # ---- logs ----

    def append(self, stream: str, entries: Any, *, timeout: float | None = None) -> list[int]:
        """Append one entry or a list of them; returns their seqs."""
        return self._run(self._core.append(stream, entries, timeout))

    def read(self, stream: str, *, last: int = 0, from_seq: int = 0, to_seq: int = 0,
             after_seq: int = 0, limit: int | None = None, consistency: str | None = None,
             min_revision: int = 0, timeout: float | None = None) -> list[Entry]:
        return self._run(self._core.read(stream, last, from_seq, to_seq, after_seq, limit,
                                         consistency, min_revision, timeout))

    def pop(self, stream: str, *, timeout: float | None = None) -> Entry | None:
        return self._run(self._core.pop(stream, timeout))

    def trim(self, stream: str, *, before_seq: int = 0, keep_last: int = 0,
             timeout: float | None = None) -> int:
        return self._run(self._core.trim(stream, before_seq, keep_last, timeout))

    # ---- the session ----

    def txn(self) -> Txn[TxnResult]:
        return Txn(self._core, self._run)

    def touch(self, ttl: Any = None, *, timeout: float | None = None) -> int:
        return self._run(self._core.touch(ttl, timeout))

    def drop(self, *, timeout: float | None = None) -> bool:
        return self._run(self._core.drop(timeout))

    def info(self, *, consistency: str | None = None, min_revision: int = 0,
             timeout: float | None = None) -> SessionInfo | None:
        return self._run(self._core.info(consistency, min_revision, timeout))

    def watch(self, from_revision: int = 0, *, prefix: str = "", progress: bool = False) -> Iterator[Change]:
        return self.client._iterate(self._core.watch(from_revision, prefix, progress))

