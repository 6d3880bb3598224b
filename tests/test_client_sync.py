"""The sync Client against a real shard process (with batching on and off): every Session
method round-trips, CAS conflicts carry the current record, update() from 8 threads is
exact, batching shares messages between threads, bad input is refused before any RPC, a dead
address is skipped, retries survive kill -9 without double-applying, close() ends calls
under way.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardstate import (
    Change,
    Client,
    ClientClosedError,
    ConflictError,
    ConstantBackoff,
    DeadlineExceededError,
    Entry,
    InvalidArgumentError,
    LimitExceededError,
    Record,
    Retry,
    SessionInfo,
    UnavailableError,
)
from shardstate.syncbatch import SHARE_AT
from shardstate.v1 import state_pb2, state_pb2_grpc
from tests.procs import Procs
from tests.stubs import dead_address, state_server, uid, wait_until


class _Slow(state_pb2_grpc.StateServicer):
    """A real gRPC server whose Get answers only when released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def Get(self, request: Any, context: Any) -> Any:
        self.calls += 1
        self.release.wait(30)
        return state_pb2.GetResponse()


@contextlib.contextmanager
def slow_server() -> Iterator[tuple[_Slow, str]]:
    """A real gRPC server with only a Get that waits for `release`, and its address."""
    slow = _Slow()
    with state_server(slow) as address:
        try:
            yield slow, address
        finally:
            slow.release.set()


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    procs = Procs(Path(tmp_path_factory.mktemp("client-sync")))
    try:
        yield procs.shard("s1").address
    finally:
        procs.close()


@pytest.fixture(params=[True, False], ids=["batching", "unary"])
def client(shard: str, request: pytest.FixtureRequest) -> Iterator[Client]:
    with Client(shard, timeout=30, batching=request.param) as c:
        assert c.batching is request.param
        yield c


def test_keys_round_trip(client: Client) -> None:
    s = client.session(uid())
    assert s.get("state") is None
    v = s.put("state", b"one")
    rec = s.get("state")
    assert isinstance(rec, Record) and rec.value == b"one" and rec.version == v
    assert rec.create_version == v and rec.expires_at == 0
    v2 = s.put("state", "twö", expect=v)
    assert v2 > v and s.get("state").value == "twö".encode()
    assert s.put("fresh", b"x", expect=0) > 0
    assert s.delete("state") is True
    assert s.delete("state") is False
    assert s.get("state") is None
    assert client.revision >= v2 and s.revision >= v2


def test_put_conflict_carries_current(client: Client) -> None:
    s = client.session(uid())
    v = s.put("k", b"a")
    s.put("k", b"b")
    with pytest.raises(ConflictError) as ei:
        s.put("k", b"c", expect=v)
    cur = ei.value.current
    assert cur is not None and cur.value == b"b" and cur.version > v
    with pytest.raises(ConflictError) as ei:
        s.put("k", b"c", expect=0)
    assert ei.value.current is not None and ei.value.current.value == b"b"
    with pytest.raises(ConflictError) as ei:
        s.put("absent", b"c", expect=123)
    assert ei.value.current is None
    with pytest.raises(ConflictError) as ei:
        s.delete("k", expect=v)
    assert ei.value.current is not None and ei.value.current.value == b"b"
    assert s.delete("k", expect=cur.version) is True


def test_update_incr_and_json(client: Client) -> None:
    s = client.session(uid())
    rec = s.update("n", lambda old: b"1" if old is None else str(int(old.value) + 1))
    assert rec is not None and rec.value == b"1"
    rec = s.update("n", lambda old: str(int(old.value) + 1))
    got = s.get("n")
    assert rec is not None and rec.value == b"2" and got is not None and got.version == rec.version
    assert abs(got.updated_at - rec.updated_at) < 1000  # the client derives it from the HLC version
    # Another handle writes behind this one's back: the cached version conflicts, the retry uses
    # the current record from the conflict, and the result is still right.
    client.session(s.session_id).put("n", b"10")
    assert s.update("n", lambda old: str(int(old.value) + 1)).value == b"11"
    assert s.update("n", lambda old: None).value == b"11"  # None: no write
    assert s.incr("steps") == 1 and s.incr("steps", 5) == 6 and s.incr("steps", -2) == 4
    assert s.get("steps").value == b"4"
    s.put("text", b"not a number")
    with pytest.raises(InvalidArgumentError):
        s.incr("text")
    assert s.put_json("j", {"a": 1, "l": [1, 2]}) > 0
    assert s.get_json("j") == {"a": 1, "l": [1, 2]}
    assert s.get_json("nope", default={}) == {}
    assert s.update_json("j", lambda o: {**o, "b": 2}) == {"a": 1, "l": [1, 2], "b": 2}
    assert s.update_json("new", lambda o: (o or 0) + 1) == 1
    with pytest.raises(InvalidArgumentError, match="not JSON"):
        s.get_json("text")


def test_update_writing_nothing_decides_from_the_stored_record(client: Client) -> None:
    """fn returning None ("nothing to write") for the cached record is checked against the
    stored one: another writer's change makes update() ask fn again and write."""
    s = client.session(uid())
    other = client.session(s.session_id)  # its own version cache
    mark = s.update("phase", lambda old: b"done")
    assert mark is not None and mark.value == b"done"
    other.put("phase", b"reset")  # behind s's back: s's cache still says "done"
    seen: list[bytes | None] = []

    def finish(old: Record | None) -> bytes | None:
        seen.append(old.value if old else None)
        return None if old is not None and old.value == b"done" else b"done"

    rec = s.update("phase", finish)
    assert seen == [b"done", b"reset"]  # asked again, from the stored record
    stored = s.get("phase")
    assert rec is not None and stored is not None
    assert (rec.value, rec.version) == (stored.value, stored.version) == (b"done", stored.version)
    assert rec.version > mark.version
    # Nothing changed since: None stands, nothing is written, the stored record is returned.
    again = s.update("phase", finish)
    assert again is not None and again.version == rec.version and s.get("phase").version == rec.version


def test_scan(client: Client) -> None:
    s = client.session(uid())
    for i in range(25):
        s.put(f"k{i:02d}", str(i))
    s.put("other", b"x")
    got = s.scan(prefix="k", limit=10)
    assert [r.key for r in got] == [f"k{i:02d}" for i in range(10)]
    assert len(s.scan(prefix="k", limit=None)) == 25
    assert [r.key for r in s.scan(prefix="k", start_after="k20")] == ["k21", "k22", "k23", "k24"]
    keys = s.scan(keys_only=True, limit=None)
    assert len(keys) == 26 and all(r.value == b"" for r in keys)
    assert s.scan(prefix="k0", consistency="eventual", min_revision=1)[0].value == b"0"


def test_logs(client: Client) -> None:
    s = client.session(uid())
    assert s.read("messages") == [] and s.pop("messages") is None and s.trim("messages", keep_last=1) == 0
    assert s.append("messages", [b"a", b"b"]) == [1, 2]
    assert s.append("messages", "c") == [3]
    assert [e.data for e in s.read("messages")] == [b"a", b"b", b"c"]
    assert [e.seq for e in s.read("messages", last=2)] == [2, 3]
    assert [e.seq for e in s.read("messages", after_seq=1, limit=1)] == [2]
    assert [e.seq for e in s.read("messages", from_seq=2, to_seq=2)] == [2]
    popped = s.pop("messages")
    assert isinstance(popped, Entry) and popped.seq == 3 and popped.data == b"c"
    assert s.append("messages", b"d") == [4]  # seqs never repeat
    assert s.trim("messages", before_seq=2) == 1
    assert [e.seq for e in s.read("messages")] == [2, 4]
    # A read longer than one server page follows the pages.
    s.append("big", [str(i) for i in range(1000)])
    s.append("big", [str(i) for i in range(1000, 1500)])
    assert [int(e.data) for e in s.read("big")] == list(range(1500))
    assert s.pop("big").data == b"1499"


def test_session_ttl_touch_info_drop(client: Client) -> None:
    sid = uid()
    s = client.session(sid, ttl=3600)
    assert s.info() is None
    s.put("k", b"v")
    s.append("log", b"x")
    info = s.info()
    assert isinstance(info, SessionInfo) and info.session_id == sid and info.key_count == 1
    assert info.expires_at > 0 and info.streams["log"][2] == 1
    before = info.expires_at
    at = s.touch(ttl=7200)
    assert at > before and s.info().expires_at == at
    assert s.touch(ttl=0) == 0 and s.info().expires_at == 0
    assert s.touch() > 0  # the handle's ttl
    assert s.drop() is True
    assert s.get("k") is None and s.info() is None and s.read("log") == []
    assert s.drop() is False


def test_session_ttl_expires_the_session(client: Client) -> None:
    s = client.session(uid(), ttl=0.5)
    s.put("k", b"v")
    deadline = time.monotonic() + 30
    while s.get("k") is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert s.get("k") is None


def test_txn(client: Client) -> None:
    s = client.session(uid())
    v = s.put("state", b"a")
    r = (s.txn().if_version("state", v).if_missing("lock").put("state", b"b").incr("steps")
         .append("log", [b"x", b"y"]).get("state").otherwise().get("state").commit())
    assert r.succeeded and r.revision > v
    assert r.results[0] > v and r.results[1] == 1 and r.results[2] == [1, 2]
    assert r.results[3].value == b"b"
    r2 = s.txn().if_version("state", v).put("state", b"c").otherwise().get("state").commit()
    assert not r2.succeeded and r2.results[0].value == b"b"
    assert s.txn().if_value("state", "b").if_log_length("log", 2).delete("state").commit().results == [True]
    assert s.get("state") is None
    assert s.txn().if_exists("state").put("x", b"1").commit().succeeded is False
    # update() after a txn touched the key does not trust the stale cache.
    s.put("n", b"1")
    s.txn().incr("n", 5).commit()
    assert s.update("n", lambda old: str(int(old.value) + 1)).value == b"7"


def test_watch(client: Client) -> None:
    s = client.session(uid())
    v = s.put("a", b"1")
    s.put("a", b"2")
    s.append("log", [b"x"])
    s.delete("a")
    changes: list[Change] = []
    for ch in s.watch(from_revision=v):
        changes.append(ch)
        if len(changes) == 4:
            break
    assert [c.type for c in changes] == ["put", "put", "append", "delete"]
    assert changes[0].revision == v and changes[1].value == b"2" and changes[2].entries[0].data == b"x"
    assert changes[3].key == "a"
    # Progress messages arrive while idle.
    for ch in s.watch(progress=True):
        assert ch.type == "progress" and ch.revision > 0
        break


def test_list_sessions_pages_and_batch(client: Client) -> None:
    prefix = uid("ls") + "-"
    ids = [f"{prefix}{i:02d}" for i in range(23)]
    b = client.batch()
    for sid in ids:
        b.put(sid, "k", sid)
    assert len(b.execute()) == 23
    got = list(client.list_sessions(prefix, page_size=5))
    assert [i.session_id for i in got] == ids
    assert all(isinstance(i, SessionInfo) and i.key_count == 1 for i in got)
    assert list(client.list_sessions(uid("nothing"))) == []
    recs = client.multi_get([(ids[3], "k"), (ids[0], "missing"), (ids[7], "k")])
    assert [r.value if r else None for r in recs] == [ids[3].encode(), None, ids[7].encode()]
    b = client.batch()
    b.incr(ids[0], "n").put(ids[1], "k", "x", expect=1).get(ids[2], "k").append(ids[3], "log", ["a", "b"])
    b.read(ids[3], "log").read(ids[4], "none").touch(ids[5], 60).info(ids[6]).delete(ids[7], "k")
    out = b.execute(raise_on_error=False)
    assert out[0] == 1 and isinstance(out[1], ConflictError) and out[1].current.value == ids[1].encode()
    assert out[2].value == ids[2].encode() and out[3] == [1, 2] and [e.data for e in out[4]] == [b"a", b"b"]
    assert out[5] == [] and out[6] > 0 and out[7].session_id == ids[6] and out[8] is True
    b = client.batch()
    b.put(ids[1], "k", "x", expect=1)
    with pytest.raises(ConflictError):
        b.execute()


def test_update_from_8_threads_is_exact(client: Client) -> None:
    sid = uid()
    errors: list[BaseException] = []

    def worker(shared_handle: bool) -> None:
        s = handle if shared_handle else client.session(sid)
        try:
            for _ in range(50):
                s.update("counter", lambda old: str(int(old.value) + 1 if old else 1))
        except BaseException as e:  # surfaced below
            errors.append(e)

    handle = client.session(sid)
    threads = [threading.Thread(target=worker, args=(i % 2 == 0,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors
    assert client.session(sid).get("counter").value == b"400"


def test_batching_threads_share_pipeline_messages(shard: str) -> None:
    # 16 threads, a session each: every update lands once, and the calls that met on the
    # loop went out together (fewer messages than ops; one thread alone could not do that).
    with Client(shard, timeout=30) as c:
        errors: list[BaseException] = []
        barrier = threading.Barrier(16)

        def worker(i: int) -> None:
            s = c.session(f"{uid()}-{i}")
            try:
                barrier.wait(30)
                for _ in range(30):
                    s.update("n", lambda old: str(int(old.value) + 1 if old else 1))
                assert s.get("n").value == b"30"
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert not errors
        (stats,) = c.batching_stats().values()
        assert stats["mode"] == "pipeline"
        assert stats["ops"] > 0 and stats["batches"] < stats["ops"]


def test_batching_one_thread_alone_makes_plain_calls(shard: str) -> None:
    with Client(shard, timeout=30) as c:
        s = c.session(uid())
        for i in range(20):
            assert s.incr("n") == i + 1
        assert s.get("n").value == b"20"
        assert c.batching and c.batching_stats() == {}  # nothing went through the loop
        assert not [t for t in threading.enumerate() if t.name == "shardstate-client-loop"
                    and t.is_alive()], "a loop thread started for a client that never shared"


def test_batching_update_fn_may_call_the_client(client: Client) -> None:
    # update()'s function runs in the caller's thread, not on the client's loop: it may
    # make calls of its own (on the loop they would wait for the loop forever).
    s, audit = client.session(uid()), client.session(uid())

    def fn(old: Record | None) -> bytes:
        n = audit.incr("calls")
        return b"%d" % n

    assert s.update("k", fn).value == b"1"
    assert s.update("k", fn).value == b"2"
    assert audit.get("calls").value == b"2"


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "unary"])
def test_close_ends_calls_under_way(batching: bool) -> None:
    with slow_server() as (slow, address):
        c = Client(address, retry=Retry(attempts=1), timeout=60, batching=batching)
        got: list[BaseException] = []

        def waiter() -> None:
            try:
                c.session(uid()).get("k")
            except BaseException as e:  # surfaced below
                got.append(e)

        # With batching, the call made while SHARE_AT are under way goes through the loop.
        threads = [threading.Thread(target=waiter) for _ in range(SHARE_AT + 1)]
        for n, t in enumerate(threads, 1):
            t.start()
            wait_until(lambda n=n: slow.calls >= n)
        c.close()
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        assert len(got) == len(threads) and all(isinstance(e, ClientClosedError) for e in got), got
        with pytest.raises(ClientClosedError, match="closed"):
            c.session(uid()).get("k")
        c.close()  # twice is fine


def test_batching_client_refuses_use_after_fork(shard: str) -> None:
    with Client(shard, timeout=30) as c:
        c.session(uid()).put("k", b"v")
        ctx = multiprocessing.get_context("fork")
        q: Any = ctx.Queue()

        def child() -> None:
            try:
                c.session(uid()).get("k")
                q.put("no error")
            except ClientClosedError as e:
                q.put(str(e))

        p = ctx.Process(target=child)
        p.start()
        msg = q.get(timeout=60)
        p.join(60)
        assert "before a fork" in msg and "make a Client in each process" in msg
        assert c.session(uid()).put("k", b"still works") > 0  # the parent's client is fine


def test_bad_input_is_refused_before_any_rpc() -> None:
    # Nothing listens here; a validation error must come before any attempt to connect.
    with Client(dead_address(), retry=Retry(attempts=1), timeout=5) as c:
        with pytest.raises(InvalidArgumentError, match="session_id must not be empty"):
            c.session("")
        with pytest.raises(InvalidArgumentError, match="session_id is 257 bytes"):
            c.session("x" * 257)
        s = c.session("ok")
        with pytest.raises(InvalidArgumentError, match="value must be bytes or str, got int"):
            s.put("k", 42)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="value must be bytes or str, got dict"):
            s.put("k", {"a": 1})  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="key must not be empty"):
            s.get("")
        with pytest.raises(InvalidArgumentError, match="entries must not be empty"):
            s.append("log", [])
        with pytest.raises(InvalidArgumentError, match="stream must not be empty"):
            s.read("")
        with pytest.raises(InvalidArgumentError, match="consistency"):
            s.get("k", consistency="sometimes")
        with pytest.raises(InvalidArgumentError, match="delta must be an int"):
            s.incr("k", 1.5)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="not JSON-serializable"):
            s.put_json("k", {1, 2})
        with pytest.raises(InvalidArgumentError, match="ttl must not be negative"):
            c.session("x", ttl=-1)
        with pytest.raises(InvalidArgumentError, match="needs a function"):
            s.update("k", b"not callable")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="host:port"):
        Client("localhost")


def test_server_side_limits_surface_as_typed_errors(client: Client) -> None:
    s = client.session(uid())
    with pytest.raises(LimitExceededError) as ei:
        s.put("big", b"x" * (1024 * 1024 + 1))
    assert ei.value.limit == "max_value_bytes"


def test_dead_address_beside_a_live_one(shard: str) -> None:
    dead = dead_address()
    with Client([dead, shard], retry=Retry(attempts=3, backoff=ConstantBackoff(0.05)), timeout=30) as c:
        s = c.session(uid())
        for i in range(20):
            s.put(f"k{i}", b"v")
            assert s.incr("n") == i + 1
        assert len(s.scan(limit=None)) == 21
    with (Client([dead], retry=Retry(attempts=2, backoff=ConstantBackoff(0.01)), timeout=5) as c,
          pytest.raises(UnavailableError)):
        c.session("x").get("k")


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "unary"])
def test_retries_survive_kill_9_without_double_applying(procs: Procs, batching: bool) -> None:
    shard = procs.shard("s1")
    retry = Retry(attempts=400, backoff=ConstantBackoff(0.1), attempt_timeout=10)  # within each call's 30 s
    acked: list[int] = []
    counts: list[int] = []
    failures: list[BaseException] = []
    piped: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        with Client(shard.address, retry=retry, timeout=30, batching=batching) as c:
            s = c.session("crashy")
            # Batching: other threads' calls overlap the writer's, so the calls made while
            # SHARE_AT others are under way ride the loop's Pipeline stream (with fewer
            # under way a call is a plain one).
            side = [threading.Thread(target=reader, args=(c,)) for _ in range(SHARE_AT if batching else 0)]
            for r in side:
                r.start()
            try:
                while not stop.is_set():
                    acked.extend(s.append("log", [f"e{len(acked)}"]))
                    counts.append(s.incr("n"))
            except BaseException as e:
                failures.append(e)
            finally:
                for r in side:
                    r.join(120)
                if batching:
                    piped.append(sum(st["ops"] for st in c.batching_stats().values()))

    def reader(c: Client) -> None:
        other = c.session("reader")
        try:
            while not stop.is_set():
                other.get("k")
        except BaseException as e:
            failures.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(2):
            deadline = time.monotonic() + 60
            start = len(acked)
            while len(acked) < start + 50 and time.monotonic() < deadline and t.is_alive():
                time.sleep(0.02)
            shard.kill()
            time.sleep(0.3)
            shard.start()
        start = len(acked)
        deadline = time.monotonic() + 60
        while len(acked) < start + 50 and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.02)
    finally:
        stop.set()
        t.join(120)
    assert not failures, f"{failures!r}; shard alive={shard.alive()}; log:\n{shard.log_tail()}"
    assert len(acked) >= 150  # the writer went on through both crashes
    if batching:
        assert piped and piped[0] > 0
    with Client(shard.address, timeout=30) as c:
        s = c.session("crashy")
        entries = s.read("log")
        # Every acknowledged append is there exactly once, and nothing else: each call was
        # acknowledged (no error surfaced), and its retries replayed instead of re-applying.
        assert [e.seq for e in entries] == acked == list(range(1, len(acked) + 1))
        assert [e.data for e in entries] == [f"e{i}".encode() for i in range(len(acked))]
        assert counts == list(range(1, len(counts) + 1))
        assert s.get("n").value == str(len(counts)).encode()


def test_namespaces_are_apart(shard: str) -> None:
    sid = uid()
    with Client(shard, namespace="tenant-a", timeout=30) as a, Client(shard, timeout=30) as d:
        a.session(sid).put("k", b"a")
        d.session(sid).put("k", b"default")
        d.session(sid, namespace="tenant-b").put("k", b"b")
        assert a.session(sid).get("k").value == b"a"
        assert d.session(sid).get("k").value == b"default"
        assert a.session(sid, namespace="tenant-b").get("k").value == b"b"
        assert [i.namespace for i in a.list_sessions(sid)] == ["tenant-a"]
        assert [i.namespace for i in d.list_sessions(sid, namespace="tenant-b")] == ["tenant-b"]


def test_per_call_deadline() -> None:
    with slow_server() as (slow, address):
        with Client(address, retry=Retry(attempts=1), timeout=30) as c:
            s = c.session(uid())
            with pytest.raises(DeadlineExceededError):
                s.get("k", timeout=0.2)
        with Client(address, retry=Retry(attempts=1), timeout=0.2) as c:
            with pytest.raises(DeadlineExceededError):
                c.session(uid()).get("k")  # the client's default deadline
            slow.release.set()
            assert c.session(uid()).get("k", timeout=30) is None
