"""Plain gRPC stubs to a test's shard process, and small helpers the shard tests share.

No client library: tests speak the wire contract (shardstate.v1) over grpc.insecure_channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from shardstate.common import errors
from shardstate.v1 import admin_pb2, admin_pb2_grpc, state_pb2, state_pb2_grpc, types_pb2
from tests.procs import Proc, Procs

__all__ = [
    "Conn",
    "WriteLoad",
    "admin_pb2",
    "expect_error",
    "shard_fixture",
    "state_pb2",
    "types_pb2",
    "uid",
]

CALL_TIMEOUT_S = 30.0  # generous: the machine is shared; tests never assert durations


class Conn:
    """A channel plus State and Admin stubs to one process; `reopen()` after a restart."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.channel: grpc.Channel = grpc.insecure_channel(proc.address)
        self.state = state_pb2_grpc.StateStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    def reopen(self) -> Conn:
        self.close()
        self.__init__(self.proc)  # type: ignore[misc]
        return self

    def close(self) -> None:
        self.channel.close()

    # ---- shorthands for the calls nearly every test makes ----

    def put(
        self, sid: str, key: str, value: bytes, ns: str = "", **kw: Any
    ) -> state_pb2.PutResponse:
        req = state_pb2.PutRequest(namespace=ns, session_id=sid, key=key, value=value, **kw)
        return self.state.Put(req, timeout=CALL_TIMEOUT_S)

    def get(self, sid: str, key: str, ns: str = "") -> state_pb2.GetResponse:
        req = state_pb2.GetRequest(namespace=ns, session_id=sid, key=key)
        return self.state.Get(req, timeout=CALL_TIMEOUT_S)

    def append(
        self, sid: str, stream: str, *entries: bytes, ns: str = "", **kw: Any
    ) -> state_pb2.AppendResponse:
        req = state_pb2.AppendRequest(
            namespace=ns, session_id=sid, stream=stream, entries=list(entries), **kw
        )
        return self.state.Append(req, timeout=CALL_TIMEOUT_S)

    def read_log(self, sid: str, stream: str, ns: str = "", **kw: Any) -> state_pb2.ReadLogResponse:
        req = state_pb2.ReadLogRequest(namespace=ns, session_id=sid, stream=stream, **kw)
        return self.state.ReadLog(req, timeout=CALL_TIMEOUT_S)

    def get_session(self, sid: str, ns: str = "") -> state_pb2.GetSessionResponse:
        req = state_pb2.GetSessionRequest(namespace=ns, session_id=sid)
        return self.state.GetSession(req, timeout=CALL_TIMEOUT_S)

    def node_status(self) -> admin_pb2.NodeStatus:
        resp = self.admin.Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT_S)
        assert len(resp.nodes) >= 1, resp
        return resp.nodes[0]


R = TypeVar("R")


def run(coro: Coroutine[Any, Any, R]) -> R:
    """Run an async test body on a fresh event loop, bounded (a hung test fails, never waits)."""
    return asyncio.run(asyncio.wait_for(coro, 240))


def dead_address() -> str:
    """An address nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def uid(prefix: str = "t") -> str:
    """A session id no other test uses (tests of one module share a shard)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def expect_error(
    code: grpc.StatusCode, fn: Callable[..., Any], *args: Any, **kw: Any
) -> errors.ShardstateError:
    """Call fn, require a gRPC error with `code`, return it as the shardstate exception."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    err = info.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"  # type: ignore[attr-defined]
    return errors.from_rpc_error(err)  # type: ignore[arg-type]


def wait_until(cond: Callable[[], Any], timeout: float = 30.0, every: float = 0.1) -> Any:
    """Poll cond until it returns something truthy; fail (not assert a time) after a generous bound."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {cond}")
        time.sleep(every)


def sleep_until_ms(epoch_ms: int, margin_ms: int = 50) -> None:
    """Sleep until wall clock passes epoch_ms (an expires_at_ms the server gave) plus a margin."""
    delay = (epoch_ms + margin_ms) / 1000 - time.time()
    if delay > 0:
        time.sleep(delay)


def shard_fixture(shard_id: str = "s1", *args: str, scope: str = "module") -> Any:
    """A pytest fixture yielding a Conn to one shard started with `args`, shared by `scope`."""

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def _fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Conn]:
        tmp: Path = tmp_path_factory.mktemp(f"shard-{shard_id}")
        procs = Procs(tmp)
        try:
            conn = Conn(procs.shard(shard_id, *args))
            yield conn
            conn.close()
        finally:
            procs.close()

    return _fixture


class WriteLoad:
    """Threads writing to a shard until told to stop or until their first error, recording
    every acknowledged write so a test can check it after a crash or a shutdown.

    Thread i puts unique keys `t{i}/k{j}`, overwrites `t{i}/last`, appends to stream `t{i}`
    every third step, and (if batch_puts) writes batches of fresh keys `t{i}/b{j}/{n}`.
    Sessions are shared by several threads so per-session serialization is exercised too.
    """

    def __init__(
        self, address: str, threads: int = 6, sessions: int = 3, batch_puts: int = 0
    ) -> None:
        self.address = address
        self.n = threads
        self.sessions = [uid("load") for _ in range(sessions)]
        self.batch_puts = batch_puts
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[tuple[str, str], tuple[bytes, int]] = {}  # (sid, key) -> (value, version)
        self.last: dict[
            int, tuple[bytes, int, bytes]
        ] = {}  # thread -> (acked value, version, next value)
        self.seqs: dict[tuple[str, str], dict[int, bytes]] = {}  # (sid, stream) -> seq -> data
        self.errors: list[grpc.RpcError] = []
        self.unacked: list[tuple[str, str, str, list[bytes]]] = []  # writes that got an error
        self.unexpected: list[BaseException] = []
        self.ack_count = 0
        self.acks_after_mark = 0  # acknowledgements received after mark() (e.g. after SIGTERM)
        self._marked = False
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def start(self) -> WriteLoad:
        for t in self._threads:
            t.start()
        return self

    def mark(self) -> None:
        with self.lock:
            self._marked = True

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)

    def busy(self, acks: int = 100) -> bool:
        """True once `acks` writes were acknowledged, or a thread stopped on an error."""
        return self.ack_count >= acks or bool(self.errors or self.unexpected)

    def all_stopped(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def _ack(self, n: int = 1) -> None:
        self.ack_count += n
        if self._marked:
            self.acks_after_mark += n

    def _run(self, i: int) -> None:
        sid = self.sessions[i % len(self.sessions)]
        ch = grpc.insecure_channel(self.address)
        stub = state_pb2_grpc.StateStub(ch)
        stream = f"t{i}"
        # the write on the wire when the thread stopped: (kind, sid, key or stream, values)
        pending: tuple[str, str, str, list[bytes]] | None = None
        try:
            j = 0
            while not self.stop.is_set():
                key, value = f"t{i}/k{j}", f"v{i}-{j}".encode()
                pending = ("put", sid, key, [value])
                p = stub.Put(
                    state_pb2.PutRequest(session_id=sid, key=key, value=value),
                    timeout=CALL_TIMEOUT_S,
                )
                with self.lock:
                    self.acked[(sid, key)] = (value, p.version)
                    self._ack()
                prev = self.last.get(i)
                nxt = f"last-{j}".encode()
                with self.lock:
                    self.last[i] = (prev[0], prev[1], nxt) if prev else (b"", 0, nxt)
                pending = ("put", sid, f"t{i}/last", [nxt])
                p = stub.Put(
                    state_pb2.PutRequest(session_id=sid, key=f"t{i}/last", value=nxt),
                    timeout=CALL_TIMEOUT_S,
                )
                with self.lock:
                    self.last[i] = (nxt, p.version, b"")
                    self._ack()
                if j % 3 == 0:
                    data = f"e{j}".encode()
                    pending = ("append", sid, stream, [data])
                    a = stub.Append(
                        state_pb2.AppendRequest(session_id=sid, stream=stream, entries=[data]),
                        timeout=CALL_TIMEOUT_S,
                    )
                    with self.lock:
                        self.seqs.setdefault((sid, stream), {})[a.seqs[0]] = data
                        self._ack()
                if self.batch_puts:
                    bkeys = [f"t{i}/b{j}/{n}" for n in range(self.batch_puts)]
                    ops = [
                        state_pb2.BatchOp(
                            put=state_pb2.PutRequest(session_id=sid, key=k, value=b"b")
                        )
                        for k in bkeys
                    ]
                    pending = ("batch", sid, "", [k.encode() for k in bkeys])
                    b = stub.Batch(state_pb2.BatchRequest(ops=ops), timeout=CALL_TIMEOUT_S)
                    with self.lock:
                        for k, r in zip(bkeys, b.results, strict=True):
                            if r.code == 0:
                                self.acked[(sid, k)] = (b"b", r.put.version)
                        self._ack()
                pending = None
                j += 1
        except grpc.RpcError as e:
            with self.lock:
                self.errors.append(e)
                if pending is not None:
                    self.unacked.append(pending)
        except BaseException as e:
            with self.lock:
                self.unexpected.append(e)
        finally:
            ch.close()

    def verify_unacked_absent(self, conn: Conn) -> int:
        """After a graceful shutdown: the writes that got an error were refused, not applied
        (applied <=> acknowledged). Returns how many refused writes were checked."""
        for kind, sid, name, values in self.unacked:
            if kind == "put":
                g = conn.get(sid, name)
                assert not (g.found and g.record.value == values[0]), (
                    f"refused put applied: {sid}/{name}"
                )
            elif kind == "append":
                data = [e.data for e in conn.read_log(sid, name, limit=1000).entries]
                assert values[0] not in data, f"refused append applied: {sid}/{name} {values[0]!r}"
            else:
                ops = [
                    state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=sid, key=k.decode()))
                    for k in values
                ]
                resp = conn.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=CALL_TIMEOUT_S)
                landed = [k for k, r in zip(values, resp.results, strict=True) if r.get.found]
                assert not landed, f"refused batch applied {len(landed)} of {len(values)} puts"
        return len(self.unacked)

    def max_version(self) -> int:
        versions = [v for _, v in self.acked.values()] + [v for _, v, _ in self.last.values()]
        return max(versions, default=0)

    def acknowledged(self) -> int:
        """How many acknowledged writes `verify()` checks."""
        lasts = sum(1 for _, version, _ in self.last.values() if version)
        return len(self.acked) + lasts + sum(len(v) for v in self.seqs.values())

    def verify(self, conn: Conn) -> int:
        """Every acknowledged write is readable with its version; returns how many were checked."""
        checked = 0
        # Batch reads keep this quick even with thousands of acknowledged keys
        items = sorted(self.acked.items())
        for start in range(0, len(items), 500):
            chunk = items[start : start + 500]
            ops = [
                state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=s, key=k))
                for (s, k), _ in chunk
            ]
            resp = conn.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=CALL_TIMEOUT_S)
            for ((s, k), (value, version)), r in zip(chunk, resp.results, strict=True):
                assert r.code == 0, (s, k, r.code, r.message)
                assert r.get.found, f"acknowledged write lost: {s}/{k} v{version}"
                assert (r.get.record.value, r.get.record.version) == (value, version), (s, k)
                checked += 1
        for i, (value, version, inflight) in self.last.items():
            sid = self.sessions[i % len(self.sessions)]
            g = conn.get(sid, f"t{i}/last")
            if version == 0:  # the first overwrite never came back; it may or may not be there
                assert not g.found or g.record.value == inflight
                continue
            assert g.found, f"acknowledged overwrite lost: t{i}/last"
            if g.record.value == value:
                assert g.record.version == version
            else:  # only the one write in flight at the crash may have landed unacknowledged
                assert inflight and g.record.value == inflight, (g.record.value, value, inflight)
                assert g.record.version > version
            checked += 1
        for (sid, stream), want in self.seqs.items():
            got = {e.seq: e.data for e in conn.read_log(sid, stream, limit=1000).entries}
            for seq, data in want.items():
                assert got.get(seq) == data, f"acknowledged append lost: {sid}/{stream}#{seq}"
                checked += 1
        return checked


@contextlib.contextmanager
def state_server(servicer: Any, workers: int = 16) -> Iterator[str]:
    """A real gRPC server on 127.0.0.1:0 serving `servicer` as the State service (a test's
    own behaviour: slow, silent, recording); yields its address, stopped afterwards."""
    server = grpc.server(ThreadPoolExecutor(workers))
    state_pb2_grpc.add_StateServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)
