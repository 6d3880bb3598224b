"""Every client operation written once, as a generator that yields what it needs done (an
RPC, a sleep, a stream read) and receives the answer; Client and AsyncClient only drive them.

So the CAS loop, the version cache, paging, retries with one request_id and watch resumption
exist in one place for both surfaces. Drivers send results in and throw ShardstateErrors in.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from shardstate import codec
from shardstate.channels import AddressPool
from shardstate.common.errors import (
    ConflictError,
    DeadlineExceededError,
    HistoryCompactedError,
    InvalidArgumentError,
    NotFoundError,
    RateLimitedError,
    ShardstateError,
    UnavailableError,
)
from shardstate.common.records import Change, Entry, Record, SessionInfo
from shardstate.direct import DirectRoutes
from shardstate.retry import Retry, deadline_exceeded, on_tick
from shardstate.v1 import state_pb2
from shardstate.versions import UNKNOWN, VersionCache, _Unknown

T = TypeVar("T")


# ---- instructions a protocol generator yields to its driver ----


@dataclass(slots=True)
class Call:
    """One logical RPC; the driver retries it (same request, same request_id) per policy,
    every attempt within the one deadline: `timeout` seconds after the call starts. The
    driver fixes `deadline` (on ClientCore.clock) when it starts the call, unless the
    operation already set it: an operation of several requests (update, paged scan and
    read, a batch in chunks) passes its first request's deadline on to the others."""

    method: str  # State RPC name: "Put"
    request: Any
    timeout: float | None = None  # None: the client's default
    batch_field: str | None = None  # BatchOp oneof name when the op may ride in a Batch
    deadline: float | None = None  # ClientCore.clock() time; None: not fixed yet (or no timeout)


@dataclass(slots=True)
class Attempt:
    """One try of a Call at one address, with what is left of the call's deadline
    (`timeout`, seconds; None: no deadline); raises the ShardstateError it met."""

    call: Call
    address: str
    timeout: float | None = None


@dataclass(slots=True)
class Sleep:
    seconds: float


@dataclass(slots=True)
class FetchMap:
    """Direct mode: fetch the cluster map from the router at `address`, waiting `timeout` s
    at most (what is left of the call's deadline; None: the driver's own limit); answers with
    a ClusterView, or None when it could not be had."""

    address: str
    timeout: float | None = None


@dataclass(slots=True)
class OpenStream:
    """Open a server stream at an address; answers with a handle for NextMessage."""

    method: str
    request: Any
    address: str


@dataclass(slots=True)
class NextMessage:
    """The next message of an open stream, or None when the server ended it."""

    handle: Any


@dataclass(slots=True)
class Emit:
    """A value for the caller of an iterating operation (list_sessions, watch)."""

    value: Any


Instruction: TypeAlias = Call | Attempt | Sleep | FetchMap | OpenStream | NextMessage | Emit
Op: TypeAlias = Generator[Instruction, Any, T]


def resume(gen: Op[T], value: Any = None, exc: BaseException | None = None,
           timeout: float | None = None, deadline: float | None = None) -> Op[T]:
    """Continue `gen` from a result (or an error) obtained elsewhere, passing its further
    instructions through; `yield from resume(...)` returns its final value. With a
    `deadline`, its further Calls run under it (and `timeout`): they are part of a call
    that has one, a batch's."""
    while True:
        try:
            instr = gen.throw(exc) if exc is not None else gen.send(value)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        exc = None
        if deadline is not None and instr.__class__ is Call:
            instr.timeout, instr.deadline = timeout, deadline
        try:
            value = yield instr
        except ShardstateError as e:
            value, exc = None, e


# ---- what both clients share: addresses, retry policy, defaults, revision seen ----


class ClientCore:
    def __init__(self, pool: AddressPool, retry: Retry, namespace: str, timeout: float | None,
                 cache_size: int, direct: bool = False, max_response_bytes: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        # Deadlines are times of this clock. The batching Conns compare them with the event
        # loop's time, which is time.monotonic() on asyncio's loops.
        self.clock = clock
        self.direct = DirectRoutes() if direct else None  # direct mode's routing (client/direct.py)
        self.retry = retry
        self.namespace = codec.namespace(namespace)
        self.timeout = codec.timeout(timeout)
        self.cache_size = cache_size
        self.revision = 0
        # What a Batch asks its answer to stay within (BatchRequest.max_response_bytes;
        # budget.for_channel: a quarter of what the channels receive; 0: the server's).
        self.max_response_bytes = max_response_bytes

    def seen(self, resp: Any) -> None:
        """Note the revision of a response (every op that receives one calls this, or
        SessionCore.saw with its header revision)."""
        rev = codec.revision_of(resp)
        if isinstance(resp, state_pb2.BatchResponse):
            for r in resp.results:
                kind = r.WhichOneof("result")
                if kind:
                    rev = max(rev, codec.revision_of(getattr(r, kind)))
        if rev > self.revision:
            self.revision = rev

    def deadline(self, timeout: float | None) -> tuple[float | None, float | None]:
        """The timeout of a call (None: the client's default) and its deadline, fixed now:
        for an operation whose requests all share it (Call.deadline)."""
        if timeout is None:
            timeout = self.timeout
        return timeout, (None if timeout is None else self.clock() + timeout)

    def start(self, call: Call) -> float | None:
        """A call starting: its timeout (None: the client's default), and its deadline fixed
        now unless the operation fixed it already (Call.deadline)."""
        timeout = self.timeout if call.timeout is None else call.timeout
        if call.deadline is None and timeout is not None:
            call.deadline = self.clock() + timeout
        return timeout

    def retrying(self, call: Call) -> Op[Any]:
        """Attempts of one call: round-robin addresses; after UNAVAILABLE the address is
        skipped for a while and the next attempt goes to another one at once. In direct mode
        a session call goes to its shard's primary first (client/direct.py). Every attempt,
        pause and map fetch fits in the call's one deadline; each attempt gets what is left."""
        timeout = self.start(call)
        deadline = call.deadline
        # what is left of the deadline for the next attempt
        left = None if deadline is None else deadline - self.clock()
        failures = tried = 0
        last: ShardstateError | None = None
        via_router = False
        direct = self.direct
        while True:
            shard = None
            if direct is not None and not via_router:
                if direct.wants_refresh() and (left is None or left > 0):
                    direct.adopt((yield FetchMap(self.pool.pick(), left)))
                    if deadline is not None:
                        left = deadline - self.clock()
                shard = direct.target(call)
            if left is not None and left <= 0:
                raise deadline_exceeded(timeout, tried, last, call.method)
            address = shard or self.pool.pick()
            try:
                resp = yield Attempt(call, address, self.retry.attempt(left))
            except ShardstateError as exc:
                tried += 1
                last = exc
                if shard is not None and direct is not None and direct.failed(shard, exc):
                    via_router = True  # the rest of this call's attempts: through a router
                else:
                    failures += 1
                    delay = self.failed(address, exc, failures, deadline, timeout, tried, call.method)
                    if delay:
                        yield Sleep(delay)
                if deadline is not None:
                    left = deadline - self.clock()
                continue
            self.succeeded(address)
            return resp

    def failed(self, address: str, exc: ShardstateError, failures: int,
               deadline: float | None = None, timeout: float | None = None, tried: int = 0,
               what: str = "") -> float:
        """After the `failures`-th failed attempt of a call (at `address`; `tried` attempts in
        all, direct-mode ones that fell back to a router included): the seconds to wait
        before the next attempt, or `exc` raised when the call gives up, or
        DeadlineExceededError when the call's `deadline` leaves no time for another attempt
        (an attempt that timed out at it says so too)."""
        unavailable = isinstance(exc, UnavailableError)
        if unavailable:
            self.pool.mark_down(address)
        delay = self.retry.delay(exc, failures)
        if delay is None:
            if (deadline is not None and isinstance(exc, DeadlineExceededError)
                    and self.clock() >= deadline):
                raise deadline_exceeded(timeout, tried or failures, exc, what)
            raise exc
        if unavailable and self.pool.other_up(address):
            delay = 0.0  # another address can take the retry at once
        elif isinstance(exc, RateLimitedError):
            delay = on_tick(delay)  # the throttled callers' retries wake together: one batch
        if deadline is not None:
            self.no_time_for(deadline, delay, timeout, tried or failures, exc, what)
        return delay

    def no_time_for(self, deadline: float, pause: float, timeout: float | None, attempts: int,
                    last: BaseException, what: str) -> None:
        """Raise DeadlineExceededError when `deadline` leaves no time for an attempt after
        a pause of `pause` s (a pause that would reach it is not taken)."""
        left = deadline - self.clock()
        if left <= pause:
            raise deadline_exceeded(timeout, attempts, last, what, pause if left > 0 else 0.0)

    def succeeded(self, address: str) -> None:
        self.pool.mark_up(address)

    # ---- client-level operations ----

    def list_sessions(self, prefix: str, page_size: int, namespace: str | None,
                      timeout: float | None) -> Op[None]:
        """Each page is a call of its own: `timeout` is its deadline, not the iteration's
        (the caller may take any time between pages)."""
        ns = codec.namespace(namespace) if namespace is not None else self.namespace
        prefix = codec.prefix(prefix)
        size = codec.count(page_size, "page_size") or 100
        token = ""
        while True:
            req = state_pb2.ListSessionsRequest(namespace=ns, prefix=prefix, limit=size, page_token=token)
            resp = yield Call("ListSessions", req, codec.timeout(timeout))
            self.seen(resp)
            for s in resp.sessions:
                yield Emit(SessionInfo.from_pb(s))
            token = resp.next_page_token
            if not token:
                return

    def batch(self, ops: Sequence[tuple[Op[Any], Call]], raise_on_error: bool,
              timeout: float | None, max_ops: int = 1000) -> Op[list[Any]]:
        """Run started single-call operations (each with the Call it yielded first) as unary
        Batch calls of up to max_ops, decoding each result with the operation's own code.
        Ops the server answers unprocessed (the answer reached max_response_bytes; not run)
        go again in the next call, as boto3 re-sends UnprocessedKeys, until every op has its
        answer. Failed ops give their exception in place, or the first one is raised. One
        deadline (`timeout`) covers every Batch call and whatever further requests the ops make."""
        out: list[Any] = [None] * len(ops)
        t = codec.timeout(timeout)
        deadline: list[float | None] = [None]  # fixed by the driver when the first Batch call starts
        for start in range(0, len(ops), max_ops):
            todo = list(range(start, min(start + max_ops, len(ops))))
            while todo:
                todo = yield from self._batch_call(ops, todo, out, t, deadline)
        if raise_on_error:
            for v in out:
                if isinstance(v, ShardstateError):
                    raise v
        return out

    def _batch_call(self, ops: Sequence[tuple[Op[Any], Call]], todo: list[int], out: list[Any],
                    timeout: float | None, deadline: list[float | None]) -> Op[list[int]]:
        """One Batch call of the ops at `todo`, their outcomes into `out`; returns the ops
        answered unprocessed, to send again (none when the server ran none of them: a server
        runs a batch's first op whatever its budget, so that is their error). `deadline[0]`:
        the batch's deadline, fixed by its first call and kept by the later ones."""
        req = state_pb2.BatchRequest(
            ops=[state_pb2.BatchOp(**{str(ops[i][1].batch_field): ops[i][1].request}) for i in todo],
            max_response_bytes=self.max_response_bytes,
        )
        batch_call = Call("Batch", req, timeout, None, deadline[0])
        resp = yield batch_call
        deadline[0] = batch_call.deadline
        self.seen(resp)
        if len(resp.results) != len(todo):
            raise ShardstateError(f"batch of {len(todo)} ops got {len(resp.results)} results")
        again = [i for i, result in zip(todo, resp.results, strict=True) if result.unprocessed]
        if len(again) == len(todo):
            again = []
        skip = set(again)
        for i, result in zip(todo, resp.results, strict=True):
            if i in skip:
                continue
            gen, call = ops[i]
            try:
                assert call.batch_field is not None
                try:
                    value, exc = codec.batch_response(result, call.batch_field), None
                except ShardstateError as e:
                    value, exc = None, e
                out[i] = yield from resume(gen, value, exc, timeout, deadline[0])
            except ShardstateError as e:
                out[i] = e
        return again


# ---- one session's operations ----


def conflict_pause(n: int) -> float:
    """Seconds to wait after the n-th (0-based) conflicting attempt of an update: none at
    first; under heavy contention a little, at random, to spread the writers out."""
    return random.random() * 0.001 * min(n, 20) if n >= 2 else 0.0


def same_record(a: Record | None, b: Record | None) -> bool:
    """Whether two reads of a key found the same write (versions never repeat for a key)."""
    return a.version == b.version if a is not None and b is not None else a is b


def gave_up(key: str, attempts: int, old: Record | None) -> ConflictError:
    return ConflictError(f"update of key {key!r} gave up after {attempts} conflicting attempts", current=old)


UpdateFn = Callable[[Record | None], Any]


class SessionCore:
    """The operations of one session handle; the version cache lives here."""

    def __init__(self, client: ClientCore, session_id: str, ttl: Any = None,
                 namespace: str | None = None) -> None:
        self.client = client
        self.session_id = codec.session_id(session_id)
        self.namespace = codec.namespace(namespace) if namespace is not None else client.namespace
        self.ttl_ms = codec.ms(ttl, "ttl")
        self.cache = VersionCache(client.cache_size)
        self.revision = 0

    def _ids(self) -> dict[str, str]:
        return {"namespace": self.namespace, "session_id": self.session_id}

    def _rpc(self, method: str, request: Any, timeout: Any, batch_field: str | None = None,
             deadline: float | None = None) -> Op[Any]:
        return self._page(Call(method, request, codec.timeout(timeout), batch_field, deadline))

    def _page(self, call: Call) -> Op[Any]:
        """One request; in an operation of several (the pages of scan and read) the first
        one's deadline, fixed when it starts, is the next ones' (Call.deadline)."""
        resp = yield call
        self.saw(resp.header.revision)
        return resp

    def saw(self, rev: int) -> None:
        """Note a response's header revision, for this handle and its client."""
        if rev > self.revision:
            self.revision = rev
            if rev > self.client.revision:
                self.client.revision = rev

    # ---- keys ----

    def get(self, key: str, consistency: Any = None, min_revision: int = 0,
            timeout: Any = None, deadline: float | None = None) -> Op[Record | None]:
        key = codec.key(key)
        req = state_pb2.GetRequest(
            **self._ids(), key=key, consistency=codec.consistency(consistency),
            min_revision=codec.count(min_revision, "min_revision"),
        )
        resp = yield from self._rpc("Get", req, timeout, "get", deadline)
        rec = codec.record(resp.record) if resp.found else None
        if rec is not None:
            self.cache.remember_if_newer(key, rec, rec.version)
        else:
            self.cache.remember(key, None)
        return rec

    def put(self, key: str, value: Any, expect: int | None = None, ttl: Any = None,
            timeout: Any = None) -> Op[int]:
        args = self.put_args(key, value, expect, ttl, timeout)
        rec = yield from self._put(*args, "put")
        return rec.version

    def put_args(self, key: str, value: Any, expect: int | None, ttl: Any,
                 timeout: Any) -> tuple[str, bytes, int | None, int, float | None]:
        """put()'s arguments validated: key, data, expected version, ttl_ms, timeout."""
        key = codec.key(key)
        data = codec.to_bytes(value)
        ttl_ms = codec.ms(ttl, "ttl")
        expected = None if expect is None else codec.version(expect)
        return key, data, expected, ttl_ms, codec.timeout(timeout)

    def _put(self, key: str, data: bytes, expected: int | None, ttl_ms: int, timeout: float | None,
             what: str, old: Any = UNKNOWN, deadline: float | None = None) -> Op[Record]:
        call = self.put_call(key, data, expected, ttl_ms, timeout, deadline)
        if old is UNKNOWN:
            old = self.cache.lookup(key)
        resp = yield call
        return self.put_done(resp, key, data, expected, ttl_ms, old, what)

    def put_call(self, key: str, data: bytes, expected: int | None, ttl_ms: int,
                 timeout: float | None, deadline: float | None = None) -> Call:
        """The Call of one (compare-and-)swap, from validated arguments."""
        # field by field, zeros left out: half the cost of PutRequest(**fields) on upb
        req = state_pb2.PutRequest()
        req.namespace = self.namespace
        req.session_id = self.session_id
        req.key = key
        req.value = data
        if expected is not None:
            req.expected_version = expected
        if ttl_ms:
            req.ttl_ms = ttl_ms
        req.request_id = codec.new_request_id()
        if self.ttl_ms:
            req.session_ttl_ms = self.ttl_ms
        return Call("Put", req, timeout, "put", deadline)

    def put_done(self, resp: state_pb2.PutResponse, key: str, data: bytes, expected: int | None,
                 ttl_ms: int, old: Any, what: str) -> Record:
        """The record a Put's answer left behind (remembered), or ConflictError when it was
        not applied. `old`: the cached record when the call was made."""
        self.saw(resp.header.revision)
        cache = self.cache
        if not resp.applied:
            current = codec.record(resp.current)
            cache.remember(key, current)
            raise codec.conflict(what, key, expected or 0, current)
        version = resp.version
        if expected == 0:
            create = version
        elif expected and isinstance(old, Record) and old.version == expected:
            create = old.create_version
        else:
            create = 0  # not known whether this write created the key
        rec = codec.written(key, data, version, create, ttl_ms)
        cache.remember_if_newer(key, rec, version)
        return rec

    def delete(self, key: str, expect: int | None = None, timeout: Any = None) -> Op[bool]:
        key = codec.key(key)
        expected = None if expect is None else codec.version(expect)
        req = state_pb2.DeleteRequest(
            **self._ids(), key=key, expected_version=expected, request_id=codec.new_request_id()
        )
        resp = yield from self._rpc("Delete", req, timeout, "delete")
        if not resp.applied:
            current = codec.record(resp.current)
            self.cache.remember(key, current)
            raise codec.conflict("delete", key, expected or 0, current)
        self.cache.remember(key, None)
        return bool(resp.existed)

    def incr(self, key: str, delta: int = 1, ttl: Any = None, timeout: Any = None) -> Op[int]:
        key = codec.key(key)
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise InvalidArgumentError(f"delta must be an int, got {type(delta).__name__}")
        ttl_ms = codec.ms(ttl, "ttl")
        req = state_pb2.IncrementRequest(
            **self._ids(), key=key, delta=delta, request_id=codec.new_request_id(),
            ttl_ms=ttl_ms, session_ttl_ms=self.ttl_ms,
        )
        old = self.cache.lookup(key)
        resp = yield from self._rpc("Increment", req, timeout, "increment")
        create = old.create_version if isinstance(old, Record) else 0
        rec = codec.written(key, str(resp.value).encode(), resp.version, create, ttl_ms)
        self.cache.remember_if_newer(key, rec, rec.version)
        return int(resp.value)

    def update(self, key: str, fn: UpdateFn, ttl: Any = None, attempts: int = 100,
               timeout: Any = None) -> Op[Record | None]:
        """Read-modify-write with compare-and-swap, retried on conflict. `fn(old)` gets the
        current Record (or None) and returns the new value (bytes or str), or None to write
        nothing. Starts from the cached record when there is one: a single writer pays one
        CAS; a conflict answers with the current record, so a retry needs no read. When fn
        returns None for the cached record, the current one is read and fn asked again if it
        changed, so "nothing to write" is decided from what is stored. It is one
        call: its read and every CAS share one deadline (`timeout`), fixed here.
        (AsyncSession.update runs this same loop with awaits, for speed.)"""
        key, ttl_ms, timeout = self.update_args(key, fn, ttl, timeout)
        timeout, deadline = self.client.deadline(timeout)
        cached = self.cache.lookup(key)
        old: Record | None
        confirmed = isinstance(cached, _Unknown)  # old came from the server in this call
        if confirmed:
            old = yield from self.get(key, timeout=timeout, deadline=deadline)
        else:
            old = cached  # type: ignore[assignment]
        for n in range(max(1, attempts)):
            new = fn(old)
            while new is None:
                if confirmed:
                    return old
                # fn chose to write nothing from the cached record, which another writer may
                # have replaced since: decide again from the current one.
                fresh = yield from self.get(key, timeout=timeout, deadline=deadline)
                if same_record(fresh, old):
                    return fresh
                old, confirmed = fresh, True
                new = fn(old)
            try:
                return (yield from self._put(key, codec.to_bytes(new), old.version if old else 0, ttl_ms,
                                             timeout, "update", old, deadline))
            except ConflictError as e:
                old, confirmed = e.current, True
                pause = conflict_pause(n)
                if deadline is not None:
                    self.client.no_time_for(deadline, pause, timeout, n + 1, e, "update")
                if pause:
                    yield Sleep(pause)
        raise gave_up(key, attempts, old)

    def update_args(self, key: str, fn: Any, ttl: Any, timeout: Any) -> tuple[str, int, float | None]:
        """update()'s arguments validated: key, ttl_ms, timeout."""
        key = codec.key(key)
        if not callable(fn):
            raise InvalidArgumentError(f"update() needs a function old -> new value, got {type(fn).__name__}")
        return (key, codec.ms(ttl, "ttl") if ttl is not None else 0,
                codec.timeout(timeout) if timeout is not None else None)

    def scan(self, prefix: str = "", limit: int | None = 100, start_after: str = "",
             keys_only: bool = False, consistency: Any = None, min_revision: int = 0,
             timeout: Any = None) -> Op[list[Record]]:
        """Keys of the session in order, up to `limit` (None: all), following pages, all
        within the call's one deadline."""
        want = None if limit is None else codec.count(limit, "limit")
        base: dict[str, Any] = dict(
            **self._ids(), prefix=codec.prefix(prefix), start_after=codec.prefix(start_after, "start_after"),
            keys_only=bool(keys_only), consistency=codec.consistency(consistency),
            min_revision=codec.count(min_revision, "min_revision"),
        )
        out: list[Record] = []
        token = ""
        t = codec.timeout(timeout)
        deadline: float | None = None  # the first page's, for every page
        while want is None or len(out) < want:
            page = 1000 if want is None else min(1000, want - len(out))
            req = state_pb2.ScanRequest(**base, limit=page, page_token=token)
            call = Call("Scan", req, t, "scan", deadline)
            resp = yield from self._page(call)
            deadline = call.deadline
            out.extend(Record.from_pb(r) for r in resp.records)
            token = resp.next_page_token
            if not token or not resp.records:
                break
        return out

    def put_json(self, key: str, obj: Any, expect: int | None = None, ttl: Any = None,
                 timeout: Any = None) -> Op[int]:
        return (yield from self.put(key, codec.json_bytes(obj), expect, ttl, timeout))

    def get_json(self, key: str, default: Any = None, **kw: Any) -> Op[Any]:
        rec = yield from self.get(key, **kw)
        return default if rec is None else codec.json_value(rec.value, rec.key)

    def update_json(self, key: str, fn: Callable[[Any], Any], ttl: Any = None,
                    attempts: int = 100, timeout: Any = None) -> Op[Any]:
        """update() on JSON: `fn(old object or None)` -> new object (None: write nothing).
        Returns the object stored at the end."""
        if not callable(fn):
            raise InvalidArgumentError(f"update_json() needs a function old -> new object, got {type(fn).__name__}")

        def step(old: Record | None) -> bytes | None:
            new = fn(None if old is None else codec.json_value(old.value, old.key))
            return None if new is None else codec.json_bytes(new)

        rec = yield from self.update(key, step, ttl=ttl, attempts=attempts, timeout=timeout)
        return None if rec is None else codec.json_value(rec.value, rec.key)

    # ---- logs ----

    def append(self, stream: str, values: Any, timeout: Any = None) -> Op[list[int]]:
        req = state_pb2.AppendRequest(
            **self._ids(), stream=codec.stream(stream), entries=codec.entries(values),
            request_id=codec.new_request_id(), session_ttl_ms=self.ttl_ms,
        )
        resp = yield from self._rpc("Append", req, timeout, "append")
        return list(resp.seqs)

    def read(self, stream: str, last: int = 0, from_seq: int = 0, to_seq: int = 0,
             after_seq: int = 0, limit: int | None = None, consistency: Any = None,
             min_revision: int = 0, timeout: Any = None) -> Op[list[Entry]]:
        """Entries oldest first. `last=N`: the newest N. Without `limit`, every page of the
        range is read (for `last=N` too: a server page holds the oldest of the newest N, the
        next pages the rest), all within the call's one deadline. A stream that does not
        exist reads as []."""
        newest = codec.count(last, "last")
        base: dict[str, Any] = dict(
            **self._ids(), stream=codec.stream(stream), from_seq=codec.count(from_seq, "from_seq"),
            to_seq=codec.count(to_seq, "to_seq"), last=newest,
            consistency=codec.consistency(consistency),
            min_revision=codec.count(min_revision, "min_revision"),
        )
        after = codec.count(after_seq, "after_seq")
        page_limit = codec.count(limit, "limit") if limit is not None else 0
        out: list[Entry] = []
        t = codec.timeout(timeout)
        deadline: float | None = None  # the first page's, for every page
        while True:
            req = state_pb2.ReadLogRequest(**base, after_seq=after, limit=page_limit)
            call = Call("ReadLog", req, t, "read_log", deadline)
            try:
                resp = yield from self._page(call)
            except NotFoundError:
                return out
            deadline = call.deadline
            out.extend(codec.entry_list(resp.entries))
            if limit is not None or not resp.more or not resp.entries:
                return out[-newest:] if newest else out  # appends between pages overshoot
            after = out[-1].seq

    def pop(self, stream: str, timeout: Any = None) -> Op[Entry | None]:
        req = state_pb2.PopLastRequest(**self._ids(), stream=codec.stream(stream),
                                       request_id=codec.new_request_id())
        try:
            resp = yield from self._rpc("PopLast", req, timeout)
        except NotFoundError:
            return None
        return Entry.from_pb(resp.entry) if resp.found else None

    def trim(self, stream: str, before_seq: int = 0, keep_last: int = 0,
             timeout: Any = None) -> Op[int]:
        if not before_seq and not keep_last:
            raise InvalidArgumentError("trim() needs before_seq= or keep_last=")
        req = state_pb2.TrimLogRequest(
            **self._ids(), stream=codec.stream(stream), before_seq=codec.count(before_seq, "before_seq"),
            keep_last=codec.count(keep_last, "keep_last"), request_id=codec.new_request_id(),
        )
        try:
            resp = yield from self._rpc("TrimLog", req, timeout)
        except NotFoundError:
            return 0
        return int(resp.removed)

    # ---- the session ----

    def touch(self, ttl: Any = None, timeout: Any = None) -> Op[int]:
        """Set the session TTL from now (None: the handle's ttl; 0 removes it); returns
        expires_at in ms since the epoch (0 = never)."""
        if ttl is None and not self.ttl_ms:
            raise InvalidArgumentError("touch() needs ttl= (seconds; 0 removes the TTL) or a session ttl")
        ttl_ms = self.ttl_ms if ttl is None else codec.ms(ttl, "ttl")
        req = state_pb2.TouchRequest(**self._ids(), ttl_ms=ttl_ms, request_id=codec.new_request_id())
        resp = yield from self._rpc("Touch", req, timeout, "touch")
        return int(resp.expires_at_ms)

    def drop(self, timeout: Any = None) -> Op[bool]:
        req = state_pb2.DeleteSessionRequest(**self._ids(), request_id=codec.new_request_id())
        self.cache.clear()
        resp = yield from self._rpc("DeleteSession", req, timeout)
        self.cache.clear()
        return bool(resp.existed)

    def info(self, consistency: Any = None, min_revision: int = 0,
             timeout: Any = None) -> Op[SessionInfo | None]:
        req = state_pb2.GetSessionRequest(
            **self._ids(), consistency=codec.consistency(consistency),
            min_revision=codec.count(min_revision, "min_revision"),
        )
        try:
            resp = yield from self._rpc("GetSession", req, timeout, "get_session")
        except NotFoundError:
            return None
        return SessionInfo.from_pb(resp.session)

    def txn(self, request: state_pb2.TxnRequest, touched: set[str],
            timeout: Any = None) -> Op[tuple[bool, list[Any], int]]:
        request.namespace, request.session_id = self.namespace, self.session_id
        request.request_id = codec.new_request_id()
        request.session_ttl_ms = self.ttl_ms
        for k in touched:  # whichever branch runs, these may change
            self.cache.forget(k)
        resp = yield from self._rpc("Txn", request, timeout, "txn")
        return bool(resp.succeeded), [codec.txn_result(r) for r in resp.results], int(resp.revision)

    # ---- watch ----

    def watch(self, from_revision: int = 0, prefix: str = "", progress: bool = False) -> Op[None]:
        """Changes from `from_revision` on (0: from now), resumed after UNAVAILABLE from the
        last revision seen; HistoryCompactedError reaches the caller."""
        pool, policy = self.client.pool, self.client.retry
        next_rev = codec.count(from_revision, "from_revision")
        prefix = codec.prefix(prefix)
        failures = 0
        while True:
            address = pool.pick()
            req = state_pb2.WatchRequest(**self._ids(), from_revision=next_rev, prefix=prefix)
            exc: ShardstateError
            try:
                handle = yield OpenStream("Watch", req, address)
                while True:
                    msg = yield NextMessage(handle)
                    if msg is None:
                        break
                    failures = 0
                    top = 0
                    for ev in msg.events:
                        yield Emit(Change.from_pb(ev))
                        top = max(top, ev.revision)
                    if msg.progress_revision:
                        top = max(top, msg.progress_revision)
                        if progress and not msg.events:
                            yield Emit(Change("progress", msg.progress_revision))
                    if top and top + 1 > next_rev:
                        next_rev = top + 1
                exc = UnavailableError("watch stream ended by the server")
            except HistoryCompactedError:
                raise
            except ShardstateError as e:
                exc = e
            if isinstance(exc, UnavailableError):
                pool.mark_down(address)
            failures += 1
            delay = policy.delay(exc, failures)
            if delay is None:
                raise exc
            if delay > 0 and not pool.other_up(address):
                yield Sleep(delay)
