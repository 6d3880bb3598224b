"""A call's `timeout` is one deadline for the whole logical call: every attempt, backoff, map
fetch and (for update, scan, read, batch) every request of the call shares it.

Real servers only: shard and router processes (stopped with SIGSTOP, killed with kill -9),
and a real gRPC server (`_Budgets`) that answers each request after DELAY and records the
time the caller's deadline left it (`context.time_remaining()`). No test asserts a duration:
they count attempts (in the error, on the server, in a backoff that records its calls) and
compare the budgets the server saw with each other and with DELAY, the least each answer took.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import signal
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from shardstate import AsyncClient, Client, DeadlineExceededError, InvalidArgumentError, Retry
from shardstate.syncbatch import SHARE_AT
from shardstate.v1 import state_pb2, state_pb2_grpc, types_pb2
from tests.procs import Proc, Procs
from tests.stubs import run, state_server, uid, wait_until

DELAY = 0.2  # each answer of _Budgets takes at least this long
TIMEOUT = 1.0  # the calls' deadline against _Budgets: room for a few answers, not many
MANY = 20  # attempts a Retry allows: far more than fit in TIMEOUT
SLACK = 0.02  # a server may see a budget a little over the timeout sent (gRPC rounds it up)
ATTEMPTS = re.compile(r"the call's deadline of ([\d.]+) s .*after (\d+) attempts?")


class CountingBackoff:
    """A Backoff that records each time the retry loop asks it for a pause."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.calls = 0
        self._lock = threading.Lock()

    def compute(self, failures: int) -> float:
        with self._lock:
            self.calls += 1
        return self.delay


def attempts_in(exc: BaseException, timeout: float) -> int:
    """K of "the call's deadline of N s ... after K attempts", checking N."""
    m = ATTEMPTS.search(str(exc))
    assert m, f"not a call-deadline error: {exc!r}"
    assert float(m.group(1)) == timeout, str(exc)
    return int(m.group(2))


def shrinking(budgets: list[float], timeout: float) -> None:
    """The budgets the server saw for successive attempts of one call: each within the call's
    timeout, each at least DELAY (the time the previous answer took, less a little slack for
    the trip) smaller than the one before; so they add up within the call's timeout."""
    assert budgets and all(b <= timeout + SLACK for b in budgets), budgets
    for before, after in itertools.pairwise(budgets):
        assert after <= before - DELAY + SLACK, budgets
    assert (len(budgets) - 1) * DELAY < timeout, budgets


class _Budgets(state_pb2_grpc.StateServicer):
    """Answers after DELAY, by key: "busy" UNAVAILABLE, "hold" only when released (no
    deadline of its own), any other key as absent (Get) or a lost compare-and-swap (Put).
    Scan and ListSessions answer `pages` pages of one item each. A Batch with a "busy" op
    fails whole, UNAVAILABLE; Pipeline answers each op of its batches as its key says
    (when `pipeline`; else UNIMPLEMENTED)."""

    def __init__(self, pipeline: bool = True, pages: int = 8) -> None:
        self.pipeline = pipeline
        self.pages = pages
        self.release = threading.Event()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.budgets: dict[str, list[float]] = {}  # method -> time_remaining() per request
        self.ops: dict[str, int] = {}  # BatchOp kind -> ops received in Batch/Pipeline
        self.holding = 0

    def _saw(self, method: str, context: Any) -> None:
        left = context.time_remaining()
        with self.lock:
            self.budgets.setdefault(method, []).append(left)

    def _answer(self, kind: str, req: Any) -> Any:
        """(BatchResult kwargs) for one op, after its wait."""
        if getattr(req, "key", "") == "hold":
            with self.lock:
                self.holding += 1
            self.release.wait(60)
            return {"code": 0, kind: self._ok(kind, req)}
        self.stop.wait(DELAY)
        if getattr(req, "key", "") == "busy":
            return {"code": grpc.StatusCode.UNAVAILABLE.value[0], "message": "busy"}
        return {"code": 0, kind: self._ok(kind, req)}

    def _ok(self, kind: str, req: Any) -> Any:
        if kind == "get":
            return state_pb2.GetResponse(found=False)
        if kind == "put":
            current = types_pb2.Record(key=req.key, value=b'"theirs"', version=req.expected_version + 7,
                                       create_version=1)
            return state_pb2.PutResponse(applied=False, current=current)
        raise AssertionError(kind)

    def _unary(self, kind: str, req: Any, context: Any) -> Any:
        self._saw(kind, context)
        got = self._answer(kind, req)
        if got["code"]:
            context.abort(grpc.StatusCode.UNAVAILABLE, got["message"])
        return got[kind]

    def Get(self, request: Any, context: Any) -> Any:
        return self._unary("get", request, context)

    def Put(self, request: Any, context: Any) -> Any:
        return self._unary("put", request, context)

    def _batch(self, req: state_pb2.BatchRequest) -> state_pb2.BatchResponse:
        results = []
        with self.lock:  # counted as they come, before the wait
            for op in req.ops:
                kind = str(op.WhichOneof("op"))
                self.ops[kind] = self.ops.get(kind, 0) + 1
        self.stop.wait(DELAY)
        for op in req.ops:
            kind = str(op.WhichOneof("op"))
            inner = getattr(op, kind)
            if inner.key == "busy":
                results.append(state_pb2.BatchResult(code=grpc.StatusCode.UNAVAILABLE.value[0], message="busy"))
            else:
                results.append(state_pb2.BatchResult(**{kind: self._ok(kind, inner)}))
        return state_pb2.BatchResponse(results=results)

    def Batch(self, request: Any, context: Any) -> Any:
        self._saw("batch", context)
        if any(getattr(op, str(op.WhichOneof("op"))).key == "busy" for op in request.ops):
            self.stop.wait(DELAY)
            context.abort(grpc.StatusCode.UNAVAILABLE, "busy")
        return self._batch(request)

    def Pipeline(self, request_iterator: Any, context: Any) -> Any:
        if not self.pipeline:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no Pipeline here")
        for req in request_iterator:
            yield state_pb2.PipelineResponse(id=req.id, batch=self._batch(req.batch))

    def Scan(self, request: Any, context: Any) -> Any:
        self._saw("scan", context)
        self.stop.wait(DELAY)
        n = int(request.page_token or 0) + 1
        rec = types_pb2.Record(key=f"k{n:03d}", value=b"v", version=n, create_version=n)
        return state_pb2.ScanResponse(records=[rec], next_page_token=str(n) if n < self.pages else "")

    def ListSessions(self, request: Any, context: Any) -> Any:
        self._saw("list", context)
        self.stop.wait(DELAY)
        n = int(request.page_token or 0) + 1
        info = types_pb2.SessionInfo(namespace=request.namespace or "default", session_id=f"s{n:03d}")
        return state_pb2.ListSessionsResponse(sessions=[info], next_page_token=str(n) if n < self.pages else "")


@contextlib.contextmanager
def budgets_server(**kw: Any) -> Iterator[tuple[_Budgets, str]]:
    srv = _Budgets(**kw)
    with state_server(srv, 32) as address:
        try:
            yield srv, address
        finally:
            srv.release.set()
            srv.stop.set()


def many(backoff: CountingBackoff | None = None) -> Retry:
    return Retry(attempts=MANY, backoff=backoff or CountingBackoff())


@contextlib.contextmanager
def stopped(proc: Proc) -> Iterator[None]:
    assert proc.popen is not None
    proc.popen.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.popen.send_signal(signal.SIGCONT)


# ---- every attempt of a call shares its deadline ----


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "unary"])
def test_sync_attempts_share_the_call_deadline(batching: bool) -> None:
    with budgets_server() as (srv, address), \
            Client(address, timeout=TIMEOUT, retry=many(), batching=batching) as c:
        with pytest.raises(DeadlineExceededError) as got:
            c.session(uid()).get("busy")
        k = attempts_in(got.value, TIMEOUT)
        assert k < MANY and k == len(srv.budgets["get"])
        shrinking(srv.budgets["get"], TIMEOUT)
        assert got.value.__cause__ is not None  # the last attempt's own error


def test_sync_call_through_the_loop_shares_the_call_deadline() -> None:
    """A call made while SHARE_AT others are under way goes through the batching loop (its
    Pipeline stream); its attempts there keep the call's one deadline too."""
    with budgets_server() as (srv, address), \
            Client(address, timeout=TIMEOUT, retry=many()) as c:
        holders = [threading.Thread(target=lambda: c.session(uid()).get("hold", timeout=60))
                   for _ in range(SHARE_AT)]
        for t in holders:
            t.start()
        try:
            wait_until(lambda: srv.holding >= SHARE_AT)
            with pytest.raises(DeadlineExceededError) as got:
                c.session(uid()).get("busy")
        finally:
            srv.release.set()
            for t in holders:
                t.join(60)
        assert c.batching_stats()[address]["mode"] == "pipeline"  # it went through the loop
        k = attempts_in(got.value, TIMEOUT)
        assert k < MANY and k == srv.ops["get"]
        assert (k - 1) * DELAY < TIMEOUT


@pytest.mark.parametrize("batching", [True, False], ids=["pipeline", "unary"])
def test_async_attempts_share_the_call_deadline(batching: bool) -> None:
    async def main() -> None:
        with budgets_server() as (srv, address):
            async with AsyncClient(address, timeout=TIMEOUT, retry=many(), batching=batching) as c:
                with pytest.raises(DeadlineExceededError) as got:
                    await c.session(uid()).get("busy")
                k = attempts_in(got.value, TIMEOUT)
                assert k < MANY
                if batching:  # every attempt rode the Pipeline stream, as a retried op
                    assert k == srv.ops["get"] and "get" not in srv.budgets
                    assert (k - 1) * DELAY < TIMEOUT
                else:
                    assert k == len(srv.budgets["get"])
                    shrinking(srv.budgets["get"], TIMEOUT)

    run(main())


def test_per_call_timeout_and_no_deadline() -> None:
    """A call's own timeout= is its deadline; timeout=None on the client means none: every
    attempt the Retry allows is made."""
    with budgets_server() as (srv, address):
        with Client(address, timeout=30, retry=many(), batching=False) as c:
            with pytest.raises(DeadlineExceededError) as got:
                c.session(uid()).get("busy", timeout=0.5)
            assert attempts_in(got.value, 0.5) == len(srv.budgets["get"]) < MANY
        srv.budgets.clear()
        backoff = CountingBackoff(0.0)
        retry = Retry(attempts=4, backoff=backoff)
        with Client(address, timeout=None, retry=retry, batching=False) as c:
            with pytest.raises(Exception, match="busy") as unavailable:
                c.session(uid()).get("busy")
            assert not isinstance(unavailable.value, DeadlineExceededError)
            assert len(srv.budgets["get"]) == 4 and backoff.calls == 3
            assert all(b > 1e9 for b in srv.budgets["get"])  # no deadline was sent


# ---- calls of several requests: one deadline for all of them ----


@pytest.mark.parametrize("mode", ["sync", "async-unary", "async-pipeline"])
def test_update_is_one_call_under_its_deadline(mode: str) -> None:
    """update(): the read and every compare-and-swap share the call's deadline; a CAS that
    keeps losing ends in DeadlineExceededError, not in a fresh timeout per request."""
    def fn(old: Any) -> bytes:
        return b"mine"

    with budgets_server() as (srv, address):
        if mode == "sync":
            with Client(address, timeout=30, retry=many(), batching=False) as c, \
                    pytest.raises(DeadlineExceededError) as got:
                c.session(uid()).update("k", fn, attempts=MANY, timeout=TIMEOUT)
        else:
            async def main() -> Any:
                async with AsyncClient(address, timeout=30, retry=many(), batching=mode == "async-pipeline") as c:
                    with pytest.raises(DeadlineExceededError) as got:
                        await c.session(uid()).update("k", fn, attempts=MANY, timeout=TIMEOUT)
                    return got

            got = run(main())
    assert attempts_in(got.value, TIMEOUT) < MANY
    if mode == "async-pipeline":  # every request rode the Pipeline stream
        assert srv.ops["get"] == 1 and srv.ops["put"] < MANY and not srv.budgets
        assert srv.ops["put"] * DELAY < TIMEOUT
    else:
        assert len(srv.budgets["get"]) == 1
        shrinking(srv.budgets["get"] + srv.budgets["put"], TIMEOUT)  # in the order they were sent


def test_update_json_is_one_call_under_its_deadline() -> None:
    with budgets_server(pipeline=False) as (srv, address), \
            Client(address, timeout=30, retry=many(), batching=False) as c:
        with pytest.raises(DeadlineExceededError):
            c.session(uid()).update_json("k", lambda old: {"n": 1}, attempts=MANY, timeout=TIMEOUT)
        shrinking(srv.budgets["get"] + srv.budgets["put"], TIMEOUT)


def test_scan_pages_share_the_call_deadline() -> None:
    with budgets_server(pages=MANY) as (srv, address), \
            Client(address, timeout=30, retry=many(), batching=False) as c:
        with pytest.raises(DeadlineExceededError):
            c.session(uid()).scan(limit=None, timeout=TIMEOUT)
        assert len(srv.budgets["scan"]) < MANY
        shrinking(srv.budgets["scan"], TIMEOUT)


def test_batch_execute_is_one_call_under_its_deadline() -> None:
    """execute(timeout=): its retries (sync) and its chunks of max_batch_ops (async) share
    the deadline."""
    with budgets_server() as (srv, address):
        with Client(address, timeout=30, retry=many(), batching=False) as c:
            b = c.batch()
            b.get(uid(), "busy")
            with pytest.raises(DeadlineExceededError) as got:
                b.execute(timeout=TIMEOUT)
            assert attempts_in(got.value, TIMEOUT) == len(srv.budgets["batch"]) < MANY
            shrinking(srv.budgets["batch"], TIMEOUT)
        srv.budgets.clear()

        async def main() -> None:
            async with AsyncClient(address, timeout=30, retry=many(), max_batch_ops=1) as c:
                b = c.batch()
                for _ in range(MANY):
                    b.get(uid(), "k")
                with pytest.raises(DeadlineExceededError):
                    await b.execute(timeout=TIMEOUT)

        run(main())
        assert len(srv.budgets["batch"]) < MANY
        shrinking(srv.budgets["batch"], TIMEOUT)


def test_list_sessions_timeout_bounds_each_page() -> None:
    """list_sessions() is an iterator: its timeout is each page request's deadline (retries
    included), so pages that together take longer than it are all read."""
    pages = 3
    with budgets_server(pages=pages) as (srv, address), \
            Client(address, timeout=30, retry=many(), batching=False) as c:
        timeout = DELAY * 2.5  # more than one answer takes, less than all of them
        got = [info.session_id for info in c.list_sessions(timeout=timeout)]
        assert got == [f"s{n:03d}" for n in range(1, pages + 1)]
        assert pages * DELAY > timeout and all(b <= timeout + SLACK for b in srv.budgets["list"])


# ---- real processes: a stopped (SIGSTOP) shard, a stopped router ----


@pytest.mark.parametrize("mode", ["sync", "sync-batching", "async-pipeline", "async-unary"])
def test_a_stopped_shard_costs_one_deadline_not_one_per_attempt(procs: Procs, mode: str) -> None:
    """Against a shard stopped with SIGSTOP the first attempt uses up the deadline: the call
    raises DeadlineExceededError after it, and the backoff is not even asked for a pause."""
    shard = procs.shard("s1")
    backoff = CountingBackoff()
    sid = uid()
    if mode.startswith("sync"):
        with Client(shard.address, timeout=0.5, retry=many(backoff), batching=mode == "sync-batching") as c:
            c.session(sid).put("k", b"v", timeout=30)
            with stopped(shard), pytest.raises(DeadlineExceededError) as got:
                c.session(sid).get("k")
            assert c.session(sid).get("k", timeout=30).value == b"v"
    else:
        async def main() -> Any:
            async with AsyncClient(shard.address, timeout=0.5, retry=many(backoff),
                                   batching=mode == "async-pipeline") as c:
                await c.session(sid).put("k", b"v", timeout=30)
                with stopped(shard), pytest.raises(DeadlineExceededError) as got:
                    await c.session(sid).get("k")
                assert (await c.session(sid).get("k", timeout=30)).value == b"v"
                return got

        got = run(main())
    assert attempts_in(got.value, 0.5) == 1
    assert backoff.calls <= 1


def _direct_setup(procs: Procs) -> tuple[Proc, Proc]:
    shard = procs.shard("s1")
    return shard, procs.router([shard.address])


@pytest.mark.parametrize("surface", ["sync", "async"])
def test_direct_mode_shares_the_deadline_with_the_stopped_primary(procs: Procs, surface: str) -> None:
    shard, router = _direct_setup(procs)
    backoff = CountingBackoff()
    sid = uid()
    if surface == "sync":
        with Client(router.address, direct=True, timeout=0.5, retry=many(backoff)) as c:
            c.session(sid).put("k", b"v", timeout=30)
            with stopped(shard), pytest.raises(DeadlineExceededError) as got:
                c.session(sid).get("k")
            assert c._core.direct is not None and c._core.direct.fallbacks == 0
    else:
        async def main() -> Any:
            async with AsyncClient(router.address, direct=True, timeout=0.5, retry=many(backoff)) as c:
                await c.session(sid).put("k", b"v", timeout=30)
                with stopped(shard), pytest.raises(DeadlineExceededError) as got:
                    await c.session(sid).get("k")
                return got

        got = run(main())
    assert attempts_in(got.value, 0.5) == 1 and backoff.calls <= 1


@pytest.mark.parametrize("surface", ["sync", "async"])
def test_direct_mode_router_fallback_and_map_fetch_share_the_deadline(procs: Procs, surface: str) -> None:
    """The primary is gone (kill -9) and the router stopped: the direct attempt fails
    UNAVAILABLE, the call goes on through the router, which uses up what is left. The next
    call fetches the map again first (it is stale now): that fetch spends the call's deadline
    (not a fetch timeout of its own), and the call ends before any attempt."""
    shard, router = _direct_setup(procs)
    backoff = CountingBackoff()
    sid = uid()
    if surface == "sync":
        with Client(router.address, direct=True, timeout=0.5, retry=many(backoff)) as c:
            c.session(sid).put("k", b"v", timeout=30)
            shard.kill()
            with stopped(router):
                with pytest.raises(DeadlineExceededError) as got:
                    c.session(sid).get("k")
                with pytest.raises(DeadlineExceededError) as then:
                    c.session(sid).get("k")
            assert c._core.direct is not None and c._core.direct.fallbacks == 1
    else:
        async def main() -> Any:
            async with AsyncClient(router.address, direct=True, timeout=0.5, retry=many(backoff)) as c:
                await c.session(sid).put("k", b"v", timeout=30)
                shard.kill()
                with stopped(router):
                    with pytest.raises(DeadlineExceededError) as got:
                        await c.session(sid).get("k")
                    with pytest.raises(DeadlineExceededError) as then:
                        await c.session(sid).get("k")
                assert c._core.direct is not None and c._core.direct.fallbacks == 1
                return got, then

        got, then = run(main())
    assert attempts_in(got.value, 0.5) == 2  # the direct one and the router's
    assert "before its first attempt" in str(then.value)
    assert backoff.calls <= 2


def test_many_async_callers_each_keep_their_deadline(procs: Procs) -> None:
    """Concurrent pipelined callers against a stopped shard: each ends after one attempt."""
    shard = procs.shard("s1")
    backoff = CountingBackoff()

    async def main() -> list[BaseException]:
        async with AsyncClient(shard.address, timeout=0.5, retry=many(backoff)) as c:
            await c.session(uid()).put("k", b"v", timeout=30)
            with stopped(shard):
                return await asyncio.gather(*(c.session(uid()).get("k") for _ in range(8)),
                                            return_exceptions=True)

    got = run(main())
    assert all(isinstance(e, DeadlineExceededError) for e in got), got
    assert all(attempts_in(e, 0.5) == 1 for e in got)


@pytest.mark.parametrize("mode", ["sync", "sync-batching", "async-pipeline", "async-unary"])
def test_attempt_timeout_moves_on_from_a_stopped_router(procs: Procs, mode: str) -> None:
    """Two routers, one stopped (SIGSTOP: connected, never answering). With
    Retry(attempt_timeout=) an attempt on the stopped one ends at its cap and the retry goes
    to the other router, so every call succeeds within its deadline; without it, the call to
    the stopped router waits its whole deadline and fails."""
    shard = procs.shard("s1")
    routers = [procs.router([shard.address]), procs.router([shard.address])]
    addresses = [r.address for r in routers]
    calls = 4  # round-robin: at least one goes to the stopped router first
    # Each client its own connections: grpc shares them between channels by default, and a
    # connection the other client saw fail would fail at once instead of hanging.
    own = [("grpc.use_local_subchannel_pool", 1)]
    # Both routers connected first: a new connection to a stopped process fails at once
    # (UNAVAILABLE, then the other router); only an open one hangs.
    warm = 2
    sid = uid()

    def capped(backoff: CountingBackoff) -> Retry:
        return Retry(attempts=MANY, backoff=backoff, attempt_timeout=0.5)

    if mode.startswith("sync"):
        batching = mode == "sync-batching"
        backoff = CountingBackoff()
        with Client(addresses, timeout=30, retry=capped(backoff), batching=batching, options=own) as c:
            c.session(sid).put("k", b"v")
            for _ in range(warm):
                c.session(sid).get("k")
            with stopped(routers[0]):
                got = [c.session(sid).get("k").value for _ in range(calls)]
        plain = CountingBackoff()
        with Client(addresses, timeout=1.0, retry=many(plain), batching=batching, options=own) as c:
            for _ in range(warm):
                c.session(sid).get("k")
            with stopped(routers[0]), pytest.raises(DeadlineExceededError) as failed:
                for _ in range(calls):
                    c.session(sid).get("k")
    else:
        batching = mode == "async-pipeline"
        backoff = CountingBackoff()

        async def main() -> tuple[list[bytes], Any]:
            async with AsyncClient(addresses, timeout=30, retry=capped(backoff), batching=batching, options=own) as c:
                await c.session(sid).put("k", b"v")
                for _ in range(warm):
                    await c.session(sid).get("k")
                with stopped(routers[0]):
                    values = [(await c.session(sid).get("k")).value for _ in range(calls)]
            async with AsyncClient(addresses, timeout=1.0, retry=many(CountingBackoff()), batching=batching, options=own) as c:
                for _ in range(warm):
                    await c.session(sid).get("k")
                with stopped(routers[0]), pytest.raises(DeadlineExceededError) as exc:
                    for _ in range(calls):
                        await c.session(sid).get("k")
            return values, exc

        got, failed = run(main())
    assert got == [b"v"] * calls
    assert backoff.calls >= 1  # an attempt on the stopped router timed out and was retried
    assert attempts_in(failed.value, 1.0) == 1


def test_attempt_timeout_is_checked() -> None:
    for bad in (0, -1, float("inf"), "1", True):
        with pytest.raises(InvalidArgumentError, match="attempt_timeout"):
            Retry(attempt_timeout=bad)  # type: ignore[arg-type]
    r = Retry(attempt_timeout=2)
    assert (r.attempt(None), r.attempt(5.0), r.attempt(1.5)) == (2, 2, 1.5)
    assert Retry().attempt(3.0) == 3.0 and Retry().attempt(None) is None
