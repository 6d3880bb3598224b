"""A reference model of one shard's State API and a hypothesis state machine that compares
every answer of a real implementation with it, through a driver.

Two drivers share the machine and the model: `EngineDriver` (the storage engine in process,
with a clock the machine moves) and, in tests/test_shard_model.py, a driver speaking gRPC to
a real shard process. A driver turns a method name and a request protobuf into the reply or
the shardstate exception, restarts what it drives on the same data, and says whether the
machine may control time (`clocked`): without it no TTL is drawn.

What the model holds is what a caller can observe: live sessions (an expired session is gone
for every caller), their records (an expired key still counts in key_count and bytes until
the sweeper reclaims it), log streams, and the highest revision any answer has shown
(every new version or revision must be above it: versions never repeat).
"""

from __future__ import annotations

import asyncio
import copy
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from shardstate.common import errors
from shardstate.server.config import ShardConfig
from shardstate.server.storage.engine import Engine
from shardstate.server.storage.revision import wall_ms
from shardstate.v1 import state_pb2 as s
from shardstate.v1 import types_pb2

# ---- the alphabets: 0x00, U+00FF, U+10FFFF, names that are prefixes of each other ----

SIDS = ["a", "a\x00", "ab", "\xff", "a\xff"]
KEYS = ["k", "k\x00", "k\x00\x00", "ka", "k\xff", "\x00", "\U0010ffff"]
STREAMS = ["m", "m\x00", "ma", "\xff"]
VALUES = [b"", b"1", b"-7", b"x", b"\x00\xff", b"9223372036854775807", b"\xff"]
PREFIXES = ["", "k", "k\x00", "ka", "\x00", "\xff"]
AFTERS = ["", "k", "k\x00", "ka", "zz"]
SID_PREFIXES = ["", "a", "a\x00", "\xff"]
DELTAS = [1, -3, 5, 2**62, -(2**63)]
TTLS = [0, 0, 0, 0, 0, 1, 5, 50]
ADVANCES = [1, 4, 5, 20, 60]
SEQS = [0, 0, 1, 2, 3, 5, 8]
COUNTS = [0, 0, 1, 2, 3, 7]
RIDS = ["r", "r\x00", "r\xff"]

_DECIMAL = re.compile(rb"-?[0-9]{1,19}")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DEFAULT_PAGE, MAX_PAGE, DEFAULT_READ = 100, 1000, 1000


class Expected(Exception):
    """The model's answer is an error of this shardstate class."""

    def __init__(self, kind: type[errors.ShardstateError]) -> None:
        super().__init__(kind.__name__)
        self.kind = kind


# ---- the model ----


@dataclass
class Rec:
    value: bytes
    version: int
    create: int
    expires: int
    updated: int

    def live(self, now: int) -> bool:
        return not self.expires or self.expires > now


@dataclass
class Stream:
    entries: list[tuple[int, bytes, int, int]] = field(default_factory=list)  # seq, data, at, rev
    next_seq: int = 1

    def info(self, name: str) -> types_pb2.StreamInfo:
        e = self.entries
        return types_pb2.StreamInfo(name=name, first_seq=e[0][0] if e else 0, last_seq=e[-1][0] if e else 0,
                                    count=len(e), next_seq=self.next_seq)


@dataclass
class Sess:
    created: int
    updated: int = 0
    expires: int = 0
    keys: dict[str, Rec] = field(default_factory=dict)  # raw: expired keys until reclaimed
    streams: dict[str, Stream] = field(default_factory=dict)  # in creation order
    max_version: int = 0  # a lower bound: writes without a revision in their answer raise it

    def bytes(self) -> int:
        return (sum(len(k.encode()) + len(r.value) for k, r in self.keys.items())
                + sum(len(d) for st_ in self.streams.values() for _, d, _, _ in st_.entries))


class Model:
    def __init__(self) -> None:
        self.sessions: dict[tuple[str, str], Sess] = {}

    def live(self, ns: str, sid: str, now: int) -> Sess | None:
        sess = self.sessions.get((ns, sid))
        if sess is not None and sess.expires and sess.expires <= now:
            del self.sessions[(ns, sid)]  # hidden from every read, reclaimed by the next write
            return None
        return sess


class Write:
    """One write on a copy of one session, as the engine's WriteContext does it."""

    def __init__(self, model: Model, ns: str, sid: str, now: int, rev: int) -> None:
        self.model, self.key, self.now, self.rev = model, (ns, sid), now, rev
        base = model.live(ns, sid, now)
        self.s: Sess | None = copy.deepcopy(base)
        self.wrote = False
        self.session_ttl = 0

    def sess(self) -> Sess:
        if self.s is None:
            self.s = Sess(created=self.now)
        self.wrote = True
        return self.s

    def rec(self, key: str) -> Rec | None:
        r = self.s.keys.get(key) if self.s is not None else None
        return r if r is not None and r.live(self.now) else None

    def stream(self, name: str) -> Stream | None:
        return self.s.streams.get(name) if self.s is not None else None

    def write_record(self, key: str, value: bytes, ttl: int, keep_expiry: bool = False) -> int:
        sess, now, rev = self.sess(), self.now, self.rev
        old = sess.keys.get(key)
        live = old if old is not None and old.live(now) else None
        expires = now + ttl if ttl else (live.expires if keep_expiry and live is not None else 0)
        sess.keys[key] = Rec(value, rev, live.create if live is not None else rev, expires, now)
        return rev

    def commit(self) -> None:
        if not self.wrote:
            return
        sess = self.s
        assert sess is not None
        if self.session_ttl:
            sess.expires = self.now + self.session_ttl
        sess.updated = self.now
        sess.max_version = max(sess.max_version, self.rev)
        self.model.sessions[self.key] = sess


def record_pb(key: str, r: Rec) -> types_pb2.Record:
    return types_pb2.Record(key=key, value=r.value, version=r.version, create_version=r.create,
                            expires_at_ms=r.expires, updated_at_ms=r.updated)


# The op functions: (Write, request) -> expected reply (raising Expected for an error).


def m_get(w: Write, req: Any) -> s.GetResponse:
    r = w.rec(req.key)
    return s.GetResponse(found=True, record=record_pb(req.key, r)) if r else s.GetResponse(found=False)


def m_put(w: Write, req: s.PutRequest) -> s.PutResponse:
    cur = w.rec(req.key)
    if req.HasField("expected_version") and (cur.version if cur else 0) != req.expected_version:
        resp = s.PutResponse(applied=False)
        if cur is not None:
            resp.current.CopyFrom(record_pb(req.key, cur))
        return resp
    if req.session_ttl_ms:
        w.session_ttl = req.session_ttl_ms
    return s.PutResponse(applied=True, version=w.write_record(req.key, req.value, req.ttl_ms))


def m_delete(w: Write, req: s.DeleteRequest) -> s.DeleteResponse:
    cur = w.rec(req.key)
    if req.HasField("expected_version") and (cur.version if cur else 0) != req.expected_version:
        resp = s.DeleteResponse(applied=False, existed=cur is not None)
        if cur is not None:
            resp.current.CopyFrom(record_pb(req.key, cur))
        return resp
    if cur is None:
        return s.DeleteResponse(applied=True, existed=False)
    del w.sess().keys[req.key]
    return s.DeleteResponse(applied=True, existed=True, revision=w.rev)


def m_increment(w: Write, req: s.IncrementRequest) -> s.IncrementResponse:
    cur = w.rec(req.key)
    value = 0
    if cur is not None:
        if _DECIMAL.fullmatch(cur.value) is None:
            raise Expected(errors.InvalidArgumentError)
        value = int(cur.value)
    value += req.delta
    if not INT64_MIN <= value <= INT64_MAX:
        raise Expected(errors.InvalidArgumentError)
    if req.session_ttl_ms:
        w.session_ttl = req.session_ttl_ms
    version = w.write_record(req.key, str(value).encode(), req.ttl_ms, keep_expiry=True)
    return s.IncrementResponse(value=value, version=version)


def m_append(w: Write, req: s.AppendRequest) -> s.AppendResponse:
    if not req.entries:
        raise Expected(errors.InvalidArgumentError)
    if req.session_ttl_ms:
        w.session_ttl = req.session_ttl_ms
    stream = w.sess().streams.setdefault(req.stream, Stream())
    first = stream.next_seq
    for seq, data in enumerate(req.entries, first):
        stream.entries.append((seq, data, w.now, w.rev))
    stream.next_seq = first + len(req.entries)
    return s.AppendResponse(seqs=range(first, stream.next_seq), revision=w.rev)


def m_trim(w: Write, req: s.TrimLogRequest) -> s.TrimLogResponse:
    cur = w.stream(req.stream)
    if cur is None:
        raise Expected(errors.NotFoundError)
    if not req.before_seq and not req.keep_last:
        raise Expected(errors.InvalidArgumentError)
    n = len(cur.entries)
    drop = n - req.keep_last if req.keep_last and n > req.keep_last else 0
    removed = max(drop, sum(1 for e in cur.entries if e[0] < req.before_seq))
    if removed:
        stream = w.sess().streams[req.stream]
        del stream.entries[:removed]
        cur = stream
    return s.TrimLogResponse(removed=removed, stream=cur.info(req.stream))


def m_pop(w: Write, req: s.PopLastRequest) -> s.PopLastResponse:
    cur = w.stream(req.stream)
    if cur is None:
        raise Expected(errors.NotFoundError)
    if not cur.entries:
        return s.PopLastResponse(found=False)
    seq, data, at, rev = w.sess().streams[req.stream].entries.pop()
    return s.PopLastResponse(found=True, entry=types_pb2.LogEntry(seq=seq, data=data, appended_at_ms=at, revision=rev))


def m_touch(w: Write, req: s.TouchRequest) -> s.TouchResponse:
    if w.s is None:
        raise Expected(errors.NotFoundError)
    sess = w.sess()
    sess.expires = w.now + req.ttl_ms if req.ttl_ms else 0
    return s.TouchResponse(expires_at_ms=sess.expires)


def _holds(result: int, sign: int) -> bool:
    C = s.Compare
    return {C.EQUAL: sign == 0, C.NOT_EQUAL: sign != 0, C.GREATER: sign > 0, C.LESS: sign < 0}[result]


def _sign(a: Any, b: Any) -> int:
    return (a > b) - (a < b)


def m_compare(w: Write, c: s.Compare) -> bool:
    target = c.WhichOneof("target")
    if target == "log_length":
        stream = w.stream(c.key)
        return _holds(c.result, _sign(len(stream.entries) if stream else 0, c.log_length))
    r = w.rec(c.key)
    if target == "version":
        return _holds(c.result, _sign(r.version if r else 0, c.version))
    if target == "value":
        return c.result == s.Compare.NOT_EQUAL if r is None else _holds(c.result, _sign(r.value, c.value))
    if c.result not in (s.Compare.EQUAL, s.Compare.NOT_EQUAL):
        raise Expected(errors.InvalidArgumentError)
    return _holds(c.result, 0 if (r is not None) == c.exists else 1)


TXN_OPS: dict[str, Callable[[Write, Any], Any]] = {
    "get": m_get, "put": m_put, "delete": m_delete, "increment": m_increment, "append": m_append,
}


def m_txn(w: Write, req: s.TxnRequest) -> s.TxnResponse:
    ok = all([m_compare(w, c) for c in req.compares])  # every compare is checked, as by the engine
    resp = s.TxnResponse(succeeded=ok)
    for op in req.success if ok else req.failure:
        kind = op.WhichOneof("op")
        assert kind is not None
        getattr(resp.results.add(), kind).CopyFrom(TXN_OPS[kind](w, getattr(op, kind)))
    if w.wrote:
        if req.session_ttl_ms:
            w.session_ttl = req.session_ttl_ms
        resp.revision = w.rev
    return resp


# ---- drivers ----


class Driver:
    """What the machine drives; `call` returns the reply or the shardstate exception raised."""

    clocked = False  # the machine may move the clock (TTL rules drawn only then)
    exact_time = False  # timestamps (updated_at, appended_at, created_at) are the driver's now()
    namespaces: tuple[str, str] = ("", "n\x00")
    plain_tokens = True  # a page token is the last key / session id returned (else opaque)
    max_restarts = 1_000

    def call(self, method: str, req: Any) -> Any:
        raise NotImplementedError

    def now(self) -> int:
        return wall_ms()

    def advance(self, ms: int) -> None:
        raise NotImplementedError

    def sweep(self) -> dict[str, int]:
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class EngineDriver(Driver):
    """The storage engine on a temporary LevelDB, its clock moved by the machine; restart =
    close + reopen of the same directory."""

    clocked = True
    exact_time = True

    def __init__(self, **cfg: Any) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="engine-model-")
        self.cfg = ShardConfig(id="s1", data_dir=str(Path(self.tmp.name) / "db"), **cfg)
        self.loop = asyncio.new_event_loop()
        self.clock = wall_ms()
        self.engine = Engine(self.cfg, clock=self.now)

    def now(self) -> int:
        return self.clock

    def advance(self, ms: int) -> None:
        self.clock += ms

    def call(self, method: str, req: Any) -> Any:
        try:
            out = getattr(self.engine, method)(req)
            return self.loop.run_until_complete(out) if asyncio.iscoroutine(out) else out
        except errors.ShardstateError as e:
            return e

    def sweep(self) -> dict[str, int]:
        return self.loop.run_until_complete(self.engine.sweep_once())

    def restart(self) -> None:
        self.loop.run_until_complete(self.engine.close())
        self.engine = Engine(self.cfg, clock=self.now)

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.close())
        self.loop.close()
        self.tmp.cleanup()


# ---- the machine ----

# Weighted towards the first of each alphabet, so operations meet on the same session,
# key and stream often enough to build state; the others keep the 0x00 / 0xFF neighbours.
sid_i = st.sampled_from([SIDS[0]] * 4 + SIDS[1:])
key_s = st.sampled_from([KEYS[0]] * 2 + KEYS[1:])
stream_s = st.sampled_from([STREAMS[0]] * 4 + STREAMS[1:])
value_s = st.sampled_from(VALUES)
ttl_s = st.sampled_from(TTLS)
ns_i = st.sampled_from([0, 0, 0, 0, 1])
entries_s = st.sampled_from([1, 1, 1, 2, 3, 0]).flatmap(lambda n: st.lists(value_s, min_size=n, max_size=n))  # 0: INVALID_ARGUMENT
expected_s = st.one_of(st.none(), st.just(0), st.integers(0, 5))  # 0 = create only; small ones: stale
CMP = s.Compare


@st.composite
def compares(draw: Any) -> s.Compare:
    result = draw(st.sampled_from([CMP.EQUAL, CMP.EQUAL, CMP.NOT_EQUAL, CMP.GREATER, CMP.LESS]))
    target = draw(st.sampled_from(["version", "value", "exists", "log_length"]))
    if target == "log_length":
        return s.Compare(result=result, key=draw(stream_s), log_length=draw(st.sampled_from(COUNTS)))
    c = s.Compare(result=result, key=draw(key_s))
    if target == "version":
        c.version = draw(st.sampled_from([0, 1]))  # 1: below every real version
    elif target == "value":
        c.value = draw(value_s)
    else:
        c.exists = draw(st.booleans())
    return c

@st.composite
def txn_ops(draw: Any) -> s.TxnOp:
    kind = draw(st.sampled_from(["get", "put", "delete", "increment", "append"]))
    if kind == "get":
        return s.TxnOp(get=s.GetRequest(key=draw(key_s)))
    if kind == "put":
        return s.TxnOp(put=s.PutRequest(key=draw(key_s), value=draw(value_s)))
    if kind == "delete":
        return s.TxnOp(delete=s.DeleteRequest(key=draw(key_s)))
    if kind == "increment":
        return s.TxnOp(increment=s.IncrementRequest(key=draw(key_s), delta=draw(st.sampled_from(DELTAS))))
    return s.TxnOp(append=s.AppendRequest(stream=draw(stream_s), entries=draw(st.lists(value_s, min_size=1, max_size=2))))


class ModelMachine(RuleBasedStateMachine):
    """Random sequences of every State operation, each answer compared with the model.
    Subclasses (or `machine(driver_factory)`) say which driver."""

    make_driver: Callable[[], Driver]

    def __init__(self) -> None:
        super().__init__()
        self.d = type(self).make_driver()
        self.model = Model()
        self.last_rev = 0  # the highest revision any answer showed
        self.seen: dict[tuple[str, str, str], list[int]] = {}  # versions handed out per key
        self.max_seen: dict[tuple[str, str], int] = {}  # max_version GetSession showed per session
        self.restarts = 0
        self.replies: dict[tuple[str, str, str], tuple[str, Any, Any]] = {}  # request_id -> (method, first answer, request)

    def teardown(self) -> None:
        self.d.close()

    # ---- helpers ----

    def ns(self, i: int) -> str:
        return self.d.namespaces[i]

    def ttl(self, ms: int) -> int:
        return ms if self.d.clocked else 0

    def version_of(self, resp: Any) -> int:
        """The revision a write's reply names (0: it names none)."""
        for f in ("version", "revision"):
            if hasattr(resp, f) and getattr(resp, f):
                return int(getattr(resp, f))
        return 0

    def write(self, method: str, ns: str, sid: str, req: Any, fn: Callable[[Write, Any], Any]) -> Any:
        """Call the driver, run the model's write at the revision the reply names, compare."""
        now = self.d.now()
        got = self.d.call(method, req)
        rev = 0 if isinstance(got, Exception) else self.version_of(got)
        w = Write(self.model, ns, sid, now, rev)
        try:
            want = fn(w, req)
        except Expected as e:
            assert isinstance(got, e.kind), f"{method} {req}: want {e.kind.__name__}, got {got!r}"
            return None
        assert not isinstance(got, Exception), f"{method} {req}: unexpected {got!r}"
        if w.wrote and rev:
            assert rev > self.last_rev, f"{method}: revision {rev} not above {self.last_rev}"
            self.last_rev = rev
        elif not w.wrote:
            assert rev == 0, f"{method} {req}: wrote nothing, answered revision {rev}"
        w.commit()
        self.compare(method, req, got, want)
        return got

    def compare(self, what: Any, req: Any, got: Any, want: Any) -> None:
        g, w = self.clean(got), self.clean(want)
        assert g == w, f"{what} {req!r}:\n got {g}\nwant {w}"

    def compare_page(self, what: str, req: Any, got: Any, want: Any) -> None:
        """A Scan / ListSessions page: a next_page_token exactly when more follow; equal to
        the model's (the last one returned) where the driver's tokens are plain."""
        if not self.d.plain_tokens:
            assert bool(got.next_page_token) == bool(want.next_page_token), (what, req, got, want)
            want = self.clean(want)
            want.next_page_token = got.next_page_token
        self.compare(what, req, got, want)

    def clean(self, msg: Any) -> Any:
        """A copy without header (and, unless the driver's time is exact, without timestamps)."""
        out = type(msg)()
        out.CopyFrom(msg)
        _strip(out, times=not self.d.exact_time)
        return out

    def session_pb(self, ns: str, sid: str, sess: Sess, got: types_pb2.SessionInfo) -> types_pb2.SessionInfo:
        """The model's SessionInfo; max_version taken from `got` once checked against the model."""
        key = (ns, sid)
        assert got.max_version >= sess.max_version, (key, got.max_version, sess.max_version)
        assert got.max_version >= self.max_seen.get(key, 0)  # never goes back
        self.max_seen[key] = got.max_version
        return types_pb2.SessionInfo(
            namespace=ns or "default", session_id=sid, created_at_ms=sess.created,
            updated_at_ms=sess.updated, expires_at_ms=sess.expires, key_count=len(sess.keys),
            bytes=sess.bytes(), streams=[x.info(n) for n, x in sess.streams.items()],
            max_version=got.max_version, shard_id=got.shard_id,
        )

    # ---- key operations ----

    @rule(n=ns_i, sid=sid_i, key=key_s, value=value_s, ttl=ttl_s, sttl=ttl_s, expected=expected_s)
    def put(self, n: int, sid: str, key: str, value: bytes, ttl: int, sttl: int, expected: int | None) -> None:
        ns = self.ns(n)
        if expected not in (None, 0):
            # A stale or the current version: pick from the versions this key had.
            seen = self.seen.get((ns, sid, key), [])
            expected = seen[-1 - (expected % len(seen))] if seen else expected
        req = s.PutRequest(namespace=ns, session_id=sid, key=key, value=value, ttl_ms=self.ttl(ttl),
                           session_ttl_ms=self.ttl(sttl))
        if expected is not None:
            req.expected_version = expected
        got = self.write("put", ns, sid, req, m_put)
        if got is not None and got.applied:
            self.seen.setdefault((ns, sid, key), []).append(got.version)

    @rule(n=ns_i, sid=sid_i, key=key_s, expected=expected_s)
    def delete(self, n: int, sid: str, key: str, expected: int | None) -> None:
        ns = self.ns(n)
        req = s.DeleteRequest(namespace=ns, session_id=sid, key=key)
        if expected is not None:
            seen = self.seen.get((ns, sid, key), [])
            req.expected_version = seen[-1 - (expected % len(seen))] if seen and expected else expected
        self.write("delete", ns, sid, req, m_delete)

    @rule(n=ns_i, sid=sid_i, key=key_s, delta=st.sampled_from(DELTAS), ttl=ttl_s)
    def increment(self, n: int, sid: str, key: str, delta: int, ttl: int) -> None:
        ns = self.ns(n)
        req = s.IncrementRequest(namespace=ns, session_id=sid, key=key, delta=delta, ttl_ms=self.ttl(ttl))
        got = self.write("increment", ns, sid, req, m_increment)
        if got is not None:
            self.seen.setdefault((ns, sid, key), []).append(got.version)

    @rule(n=ns_i, sid=sid_i, key=key_s)
    def get(self, n: int, sid: str, key: str) -> None:
        ns = self.ns(n)
        req = s.GetRequest(namespace=ns, session_id=sid, key=key)
        self.compare("get", req, self.d.call("get", req), m_get(Write(self.model, ns, sid, self.d.now(), 0), req))

    @rule(n=ns_i, sid=sid_i, prefix=st.sampled_from(PREFIXES), after=st.sampled_from(AFTERS),
          limit=st.sampled_from([0, 1, 2, 3]), keys_only=st.booleans(), paged=st.booleans())
    def scan(self, n: int, sid: str, prefix: str, after: str, limit: int, keys_only: bool, paged: bool) -> None:
        """One page, or (paged) every page through next_page_token."""
        ns = self.ns(n)
        now = self.d.now()
        sess = self.model.live(ns, sid, now)
        live = sorted(k for k, r in (sess.keys.items() if sess else ()) if r.live(now))
        want_keys = [k for k in live if k.startswith(prefix) and k > after]
        page = limit or DEFAULT_PAGE
        got_keys: list[str] = []
        token = ""
        while True:
            req = s.ScanRequest(namespace=ns, session_id=sid, prefix=prefix, start_after=after, limit=limit,
                                keys_only=keys_only, page_token=token)
            got = self.d.call("scan", req)
            assert not isinstance(got, Exception), got
            rest = want_keys[len(got_keys):]
            expect = rest[:page]
            assert sess is not None or not got.records
            want = s.ScanResponse(
                records=[record_pb(k, sess.keys[k]) for k in expect] if sess else [],
                next_page_token=expect[-1] if len(rest) > page else "")
            if keys_only:
                for r in want.records:
                    r.value = b""
            self.compare_page("scan", req, got, want)
            got_keys += expect
            token = got.next_page_token
            if not token or not paged:
                return

    @rule(n=ns_i, sid=sid_i, rid=st.sampled_from(RIDS), method=st.sampled_from(["put", "increment", "append"]),
          key=key_s, value=value_s, retry=st.booleans())
    def with_request_id(self, n: int, sid: str, rid: str, method: str, key: str, value: bytes,
                        retry: bool) -> None:
        """A write with a request_id: applied once; a retry (the same request again, `retry`)
        gets the first answer back with header.replayed (after restarts and DeleteSession too);
        another kind of op, or the same kind with other arguments, is refused."""
        ns = self.ns(n)
        first = self.replies.get((ns, sid, rid))
        req: Any
        if retry and first is not None:
            method, req = first[0], first[2]
        elif method == "put":
            req = s.PutRequest(namespace=ns, session_id=sid, key=key, value=value, request_id=rid)
        elif method == "increment":
            req = s.IncrementRequest(namespace=ns, session_id=sid, key=key, delta=1, request_id=rid)
        else:
            req = s.AppendRequest(namespace=ns, session_id=sid, stream=key, entries=[value], request_id=rid)
        if first is None:
            fn = {"put": m_put, "increment": m_increment, "append": m_append}[method]
            got = self.write(method, ns, sid, req, fn)
            if got is not None:
                assert not got.header.replayed
                self.replies[(ns, sid, rid)] = (method, got, req)
                if method != "append":
                    self.seen.setdefault((ns, sid, key), []).append(got.version)
            return
        got = self.d.call(method, req)
        if first[0] != method or req.SerializeToString() != first[2].SerializeToString():
            assert isinstance(got, errors.InvalidArgumentError), f"{method} {req}: {got!r}"
            return
        assert not isinstance(got, Exception) and got.header.replayed, f"{method} {req}: {got!r}"
        self.compare(method, req, got, first[1])

    # ---- logs ----

    @rule(n=ns_i, sid=sid_i, stream=stream_s, entries=entries_s, sttl=ttl_s)
    def append(self, n: int, sid: str, stream: str, entries: list[bytes], sttl: int) -> None:
        ns = self.ns(n)
        req = s.AppendRequest(namespace=ns, session_id=sid, stream=stream, entries=entries,
                              session_ttl_ms=self.ttl(sttl))
        self.write("append", ns, sid, req, m_append)

    # Appends drawn twice as often as other operations: the log rules need entries to act on.
    @rule(n=ns_i, sid=sid_i, stream=stream_s, entries=entries_s, sttl=ttl_s)
    def append_more(self, n: int, sid: str, stream: str, entries: list[bytes], sttl: int) -> None:
        self.append(n, sid, stream, entries, sttl)

    @rule(n=ns_i, sid=sid_i, stream=stream_s, form=st.sampled_from(["last", "from_last", "after", "range", "any"]),
          from_seq=st.sampled_from(SEQS), to_seq=st.sampled_from(SEQS), after=st.sampled_from(SEQS),
          last=st.sampled_from(COUNTS[2:]), limit=st.sampled_from(COUNTS))
    def read_log(self, n: int, sid: str, stream: str, form: str, from_seq: int, to_seq: int, after: int,
                 last: int, limit: int) -> None:
        """Every range form: the newest N (of everything, or from a seq), after a seq, from-to,
        and any mix of them; limit 0 is the default page."""
        if form != "any":
            keep = {"last": ("last",), "from_last": ("from_seq", "last"), "after": ("after", "limit"),
                    "range": ("from_seq", "to_seq", "limit")}[form]
            from_seq, to_seq, after, last, limit = (
                v if name in keep else 0 for name, v in
                (("from_seq", from_seq), ("to_seq", to_seq), ("after", after), ("last", last), ("limit", limit)))
        ns = self.ns(n)
        req = s.ReadLogRequest(namespace=ns, session_id=sid, stream=stream, from_seq=from_seq, to_seq=to_seq,
                               after_seq=after, last=last, limit=limit)
        got = self.d.call("read_log", req)
        sess = self.model.live(ns, sid, self.d.now())
        cur = sess.streams.get(stream) if sess else None
        if cur is None:
            assert isinstance(got, errors.NotFoundError), f"read_log {req}: {got!r}"
            return
        info = cur.info(stream)
        lo = after + 1 if after else max(from_seq, info.first_seq)
        hi = min(to_seq, info.last_seq) if to_seq else info.last_seq
        cand = [e for e in cur.entries if lo <= e[0] <= hi]
        if last:
            cand = cand[-last:]
        page = limit or DEFAULT_READ
        want = s.ReadLogResponse(stream=info, more=len(cand) > page, entries=[
            types_pb2.LogEntry(seq=q, data=d, appended_at_ms=at, revision=rv) for q, d, at, rv in cand[:page]])
        self.compare("read_log", req, got, want)

    @rule(n=ns_i, sid=sid_i, stream=stream_s, before=st.sampled_from(SEQS), keep=st.sampled_from(COUNTS))
    def trim(self, n: int, sid: str, stream: str, before: int, keep: int) -> None:
        ns = self.ns(n)
        req = s.TrimLogRequest(namespace=ns, session_id=sid, stream=stream, before_seq=before, keep_last=keep)
        self.write("trim_log", ns, sid, req, m_trim)

    @rule(n=ns_i, sid=sid_i, stream=stream_s)
    def pop_last(self, n: int, sid: str, stream: str) -> None:
        ns = self.ns(n)
        self.write("pop_last", ns, sid, s.PopLastRequest(namespace=ns, session_id=sid, stream=stream), m_pop)

    # ---- txn ----

    @rule(n=ns_i, sid=sid_i, compares=st.lists(compares(), max_size=2), success=st.lists(txn_ops(), max_size=3),
          failure=st.lists(txn_ops(), max_size=2), sttl=ttl_s)
    def txn(self, n: int, sid: str, compares: list[s.Compare], success: list[s.TxnOp], failure: list[s.TxnOp],
            sttl: int) -> None:
        ns = self.ns(n)
        req = s.TxnRequest(namespace=ns, session_id=sid, compares=compares, success=success, failure=failure,
                           session_ttl_ms=self.ttl(sttl))
        got = self.write("txn", ns, sid, req, m_txn)
        if got is not None and got.revision:
            for op in req.success if got.succeeded else req.failure:
                kind = op.WhichOneof("op")
                if kind in ("put", "increment"):
                    self.seen.setdefault((ns, sid, getattr(op, kind).key), []).append(got.revision)

    # ---- sessions ----

    @rule(n=ns_i, sid=sid_i, ttl=st.sampled_from([0, 0, 5, 50]))
    def touch(self, n: int, sid: str, ttl: int) -> None:
        ns = self.ns(n)
        self.write("touch", ns, sid, s.TouchRequest(namespace=ns, session_id=sid, ttl_ms=self.ttl(ttl)), m_touch)

    @rule(n=ns_i, sid=sid_i)
    def delete_session(self, n: int, sid: str) -> None:
        ns = self.ns(n)
        req = s.DeleteSessionRequest(namespace=ns, session_id=sid)
        got = self.d.call("delete_session", req)
        sess = self.model.live(ns, sid, self.d.now())
        want = s.DeleteSessionResponse(existed=False)
        if sess is not None:
            want = s.DeleteSessionResponse(existed=True, keys_deleted=len(sess.keys), log_entries_deleted=sum(
                len(x.entries) for x in sess.streams.values()))
            del self.model.sessions[(ns, sid)]
        self.compare("delete_session", req, got, want)

    @rule(n=ns_i, sid=sid_i)
    def get_session(self, n: int, sid: str) -> None:
        ns = self.ns(n)
        req = s.GetSessionRequest(namespace=ns, session_id=sid)
        got = self.d.call("get_session", req)
        sess = self.model.live(ns, sid, self.d.now())
        if sess is None:
            assert isinstance(got, errors.NotFoundError), f"get_session {req}: {got!r}"
            return
        assert not isinstance(got, Exception), got
        self.compare("get_session", req, got, s.GetSessionResponse(session=self.session_pb(ns, sid, sess, got.session)))

    @rule(n=ns_i, prefix=st.sampled_from(SID_PREFIXES), limit=st.sampled_from([0, 1, 2]), paged=st.booleans())
    def list_sessions(self, n: int, prefix: str, limit: int, paged: bool) -> None:
        ns = self.ns(n)
        now = self.d.now()
        ids = sorted(sid for (ns_, sid) in list(self.model.sessions)
                     if ns_ == ns and sid.startswith(prefix) and self.model.live(ns, sid, now) is not None)
        page = limit or DEFAULT_PAGE
        done = 0
        token = ""
        while True:
            req = s.ListSessionsRequest(namespace=ns, prefix=prefix, limit=limit, page_token=token)
            got = self.d.call("list_sessions", req)
            assert not isinstance(got, Exception), got
            rest = ids[done:]
            expect = rest[:page]
            assert [x.session_id for x in got.sessions] == expect, (req, got, ids)
            want = s.ListSessionsResponse(
                sessions=[self.session_pb(ns, sid, self.model.sessions[(ns, sid)], g)
                          for sid, g in zip(expect, got.sessions, strict=True)],
                next_page_token=expect[-1] if len(rest) > page else "")
            self.compare_page("list_sessions", req, got, want)
            done += len(expect)
            token = got.next_page_token
            if not token or not paged:
                return

    # ---- time, the sweeper, restarts ----

    @precondition(lambda self: self.d.clocked)
    @rule(ms=st.sampled_from(ADVANCES))
    def advance_clock(self, ms: int) -> None:
        self.d.advance(ms)

    @precondition(lambda self: self.d.clocked)
    @rule()
    def sweep(self) -> None:
        """The sweeper reclaims what reads already hide: nothing a caller sees changes but the
        counts of expired keys."""
        now = self.d.now()
        for key in list(self.model.sessions):
            self.model.live(*key, now)
        dead = 0
        for sess in self.model.sessions.values():
            gone = [k for k, r in sess.keys.items() if not r.live(now)]
            for k in gone:
                del sess.keys[k]
            if gone:
                sess.updated = now  # a reclaim is a write of the session
            dead += len(gone)
        done = self.d.sweep()
        assert done["keys"] == dead, (done, dead)

    @precondition(lambda self: self.restarts < self.d.max_restarts)
    @rule()
    def restart(self) -> None:
        self.restarts += 1
        self.d.restart()


def _strip(msg: Any, times: bool) -> None:
    """Clear every header (and, with `times`, every updated_at_ms / appended_at_ms /
    created_at_ms) in msg, recursively."""
    for fd, value in msg.ListFields():
        if fd.name == "header" or (times and fd.name in ("updated_at_ms", "appended_at_ms", "created_at_ms")):
            msg.ClearField(fd.name)
        elif fd.message_type is not None:
            for v in [value] if isinstance(value, Message) else value:
                _strip(v, times)


def machine(make_driver: Callable[[], Driver], name: str) -> type[ModelMachine]:
    """The state machine class driving what make_driver() returns (one per example)."""
    return type(name, (ModelMachine,), {"make_driver": staticmethod(make_driver)})
