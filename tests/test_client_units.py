"""Unit tests for the client library's pure logic: retry policy and backoff, validation and
decoding (codec), the address pool, the version cache, the txn/batch builders, and the
operation generators driven by hand with server answers (no network).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest

from shardstate import ConflictError, Record, codec
from shardstate.batch import Batch
from shardstate.channels import AddressPool, parse_addresses
from shardstate.common import errors
from shardstate.common.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from shardstate.operations import (
    Attempt,
    Call,
    ClientCore,
    Emit,
    FetchMap,
    SessionCore,
    Sleep,
    resume,
)
from shardstate.retry import (
    THROTTLE_TICK_S,
    ConstantBackoff,
    ExponentialBackoff,
    NoBackoff,
    Retry,
    deadline_exceeded,
    on_tick,
)
from shardstate.txn import Txn
from shardstate.v1 import state_pb2, types_pb2
from shardstate.versions import UNKNOWN, VersionCache

# ---- retry and backoff ----


def test_exponential_backoff_grows_caps_and_jitters() -> None:
    b = ExponentialBackoff(base=0.1, cap=1.0, factor=2.0, jitter=0.0)
    assert [b.compute(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert b.compute(10_000) == 1.0  # no overflow
    j = ExponentialBackoff(base=1.0, cap=10.0, jitter=0.5)
    samples = [j.compute(1) for _ in range(200)]
    assert all(0.5 <= s <= 1.0 for s in samples)
    assert len(set(samples)) > 1


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(InvalidArgumentError):
        ExponentialBackoff(base=-1)
    with pytest.raises(InvalidArgumentError):
        ExponentialBackoff(jitter=2)
    with pytest.raises(InvalidArgumentError, match="attempts"):
        Retry(attempts=0)


def test_retry_policy_decides_by_error_kind_and_attempts() -> None:
    r = Retry(attempts=3, backoff=ConstantBackoff(0.25))
    assert r.delay(UnavailableError("x"), 1) == 0.25
    assert r.delay(DeadlineExceededError("x"), 2) == 0.25
    assert r.delay(UnavailableError("x"), 3) is None  # 3 attempts made: give up
    assert r.delay(InvalidArgumentError("x"), 1) is None
    assert r.delay(ConflictError("x"), 1) is None
    only = Retry(attempts=5, backoff=NoBackoff(), retry_on=(NotFoundError,))
    assert only.delay(NotFoundError("x"), 1) == 0.0
    assert only.delay(UnavailableError("x"), 1) is None


def test_only_the_ops_per_s_limit_is_retried_and_its_retries_wake_on_a_shared_tick() -> None:
    r = Retry(attempts=3, backoff=ConstantBackoff(0.25))
    rate = errors.from_status(8, "over", [types_pb2.LimitExceeded(limit="max_ops_per_s", value=5, actual=6)])
    size = errors.from_status(8, "big", [types_pb2.LimitExceeded(limit="max_value_bytes", value=5, actual=6)])
    assert isinstance(rate, errors.RateLimitedError) and isinstance(rate, errors.LimitExceededError)
    assert type(size) is errors.LimitExceededError
    assert r.delay(rate, 1) == 0.25 and r.delay(rate, 3) is None
    assert r.delay(size, 1) is None  # a size limit does not pass by waiting
    for delay in (0.0, 0.01, 0.05, 0.3):
        wait = on_tick(delay)
        end = time.monotonic() + wait
        assert delay - 1e-3 <= wait <= delay + THROTTLE_TICK_S + 1e-3
        assert abs(end / THROTTLE_TICK_S - round(end / THROTTLE_TICK_S)) < 0.02  # ends on a tick


# ---- codec ----


def test_values_bytes_or_str_only() -> None:
    assert codec.to_bytes(b"a") == b"a"
    assert codec.to_bytes("é") == "é".encode()
    assert codec.to_bytes(bytearray(b"x")) == b"x"
    for bad in (1, 1.5, None, {"a": 1}, [b"a"]):
        with pytest.raises(InvalidArgumentError, match="value must be bytes or str, got"):
            codec.to_bytes(bad)


def test_names_validated_with_clear_messages() -> None:
    with pytest.raises(InvalidArgumentError, match="session_id must not be empty"):
        codec.session_id("")
    with pytest.raises(InvalidArgumentError, match="session_id must be a str, got int"):
        codec.session_id(42)
    with pytest.raises(InvalidArgumentError, match="session_id is 257 bytes, over the limit of 256"):
        codec.session_id("x" * 257)
    assert codec.session_id("é" * 128) == "é" * 128  # 256 bytes
    with pytest.raises(InvalidArgumentError, match="key is 1025 bytes"):
        codec.key("k" * 1025)
    with pytest.raises(InvalidArgumentError, match="stream must not be empty"):
        codec.stream("")
    assert codec.namespace("") == "default" and codec.namespace(None) == "default"


def test_text_that_is_not_utf8_is_invalid_argument_naming_the_field() -> None:
    # A lone surrogate passes for a str but cannot be sent: refused before any RPC, as
    # InvalidArgumentError, not as a UnicodeEncodeError from deep inside protobuf.
    bad = "a\ud800"
    for check, what in ((codec.session_id, "session_id"), (codec.key, "key"), (codec.stream, "stream"),
                        (codec.namespace, "namespace"), (codec.prefix, "prefix"), (codec.to_bytes, "value")):
        with pytest.raises(InvalidArgumentError, match=f"{what} is not valid UTF-8"):
            check(bad)
    with pytest.raises(InvalidArgumentError, match=r"entries\[0\] is not valid UTF-8"):
        codec.entries([bad])
    with pytest.raises(InvalidArgumentError, match="key is not valid UTF-8"):
        _drive(_core().put(bad, b"v"), [])
    with pytest.raises(InvalidArgumentError, match="value is not valid UTF-8"):
        _drive(_core().put("k", bad), [])
    with pytest.raises(InvalidArgumentError, match="session_id is not valid UTF-8"):
        SessionCore(_core().client, bad)


def test_entries_ttl_timeout_consistency() -> None:
    assert codec.entries(b"a") == [b"a"]
    assert codec.entries("a") == [b"a"]
    assert codec.entries([b"a", "b"]) == [b"a", b"b"]
    with pytest.raises(InvalidArgumentError, match="entries must not be empty"):
        codec.entries([])
    with pytest.raises(InvalidArgumentError, match=r"entries\[1\] must be bytes or str, got int"):
        codec.entries([b"a", 2])
    assert codec.ms(1.5) == 1500 and codec.ms(timedelta(minutes=1)) == 60_000
    assert codec.ms(None) == 0 and codec.ms(0.0001) == 1
    with pytest.raises(InvalidArgumentError, match="ttl must not be negative"):
        codec.ms(-1)
    with pytest.raises(InvalidArgumentError, match="ttl must be seconds"):
        codec.ms("10")
    with pytest.raises(InvalidArgumentError, match="timeout must be a positive"):
        codec.timeout(0)
    assert codec.consistency("EVENTUAL") == types_pb2.EVENTUAL
    assert codec.consistency(None) == types_pb2.CONSISTENCY_UNSPECIFIED
    with pytest.raises(InvalidArgumentError, match="consistency must be 'strong' or 'eventual'"):
        codec.consistency("linearizable")


def test_batch_result_errors_keep_typed_details() -> None:
    r = state_pb2.BatchResult(code=9, message="moved", wrong_shard=types_pb2.WrongShard(epoch=3, owner="s2"))
    exc = codec.batch_error(r)
    assert isinstance(exc, errors.WrongShardError) and exc.detail.owner == "s2"
    r = state_pb2.BatchResult(code=14, message="down")
    with pytest.raises(UnavailableError, match="down"):
        codec.batch_response(r, "get")
    ok = state_pb2.BatchResult(get=state_pb2.GetResponse(found=True))
    assert codec.batch_response(ok, "get").found


def test_written_record_uses_the_hlc_time() -> None:
    ver = (1_700_000_000_000 << 20) + 5
    rec = codec.written("k", b"v", ver, 7, 1000)
    assert rec.updated_at == 1_700_000_000_000 and rec.expires_at == 1_700_000_001_000
    assert rec.create_version == 7 and rec.version == ver


def test_addresses_parsed() -> None:
    assert parse_addresses("a:1, b:2,a:1") == ("a:1", "b:2")
    assert parse_addresses(["a:1"]) == ("a:1",)
    for bad in ("", "nohost", [], ["a:"]):
        with pytest.raises(InvalidArgumentError):
            parse_addresses(bad)


# ---- address pool ----


def test_pool_round_robins_and_skips_down_addresses() -> None:
    pool = AddressPool(["a:1", "b:2", "c:3"], down_for=60)
    assert {pool.pick() for _ in range(6)} == {"a:1", "b:2", "c:3"}
    pool.mark_down("b:2")
    assert "b:2" not in {pool.pick() for _ in range(10)}
    assert pool.other_up("a:1") and pool.other_up("b:2")
    pool.mark_down("a:1")
    pool.mark_down("c:3")
    assert not pool.other_up("b:2")
    assert pool.pick() == "b:2"  # all down: the one marked first comes back first
    pool.mark_up("c:3")
    assert pool.pick() == "c:3"


def test_pool_down_mark_expires() -> None:
    pool = AddressPool(["a:1", "b:2"], down_for=0.05)
    pool.mark_down("a:1")
    assert not pool.is_up("a:1")
    time.sleep(0.1)
    assert pool.is_up("a:1")


# ---- version cache ----


def test_version_cache_lru_absent_and_newer_only() -> None:
    c = VersionCache(size=2, max_value_bytes=4)
    assert c.lookup("a") is UNKNOWN
    c.remember("a", None)
    assert c.lookup("a") is None  # known absent
    c.remember("b", Record("b", b"1", 5))
    c.remember("c", Record("c", b"1", 6))
    assert c.lookup("a") is UNKNOWN and len(c) == 2  # evicted
    c.remember_if_newer("b", Record("b", b"0", 4), 4)
    assert c.lookup("b") == Record("b", b"1", 5)  # an older answer does not win
    c.remember("b", Record("b", b"too big", 9))
    assert c.lookup("b") is UNKNOWN
    c.clear()
    assert len(c) == 0


# ---- operation generators driven by hand ----


def _core(**kw: Any) -> SessionCore:
    client = ClientCore(AddressPool(["a:1"]), Retry(attempts=3, backoff=ConstantBackoff(0.5)), "", 5.0, 16)
    return SessionCore(client, "s", **kw)


def _drive(gen: Any, answers: list[Any]) -> tuple[Any, list[Any]]:
    """Run an operation, answering each Call from `answers` (an exception is thrown in)."""
    seen: list[Any] = []
    value: Any = None
    exc: BaseException | None = None
    while True:
        try:
            instr = gen.throw(exc) if exc is not None else gen.send(value)
        except StopIteration as stop:
            return stop.value, seen
        seen.append(instr)
        value, exc = None, None
        if isinstance(instr, Sleep):
            continue
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            exc = answer
        else:
            value = answer


def _pb_rec(key: str, value: bytes, version: int) -> types_pb2.Record:
    return types_pb2.Record(key=key, value=value, version=version, create_version=1)


def test_update_single_writer_is_one_cas_after_the_first() -> None:
    s = _core()
    rec, calls = _drive(s.update("n", lambda old: b"1" if old is None else str(int(old.value) + 1)),
                        [state_pb2.GetResponse(found=False),
                         state_pb2.PutResponse(applied=True, version=10)])
    assert [c.method for c in calls] == ["Get", "Put"]
    assert calls[1].request.HasField("expected_version") and calls[1].request.expected_version == 0
    assert rec.value == b"1" and rec.version == 10
    rec, calls = _drive(s.update("n", lambda old: str(int(old.value) + 1)),
                        [state_pb2.PutResponse(applied=True, version=11)])
    assert [c.method for c in calls] == ["Put"]  # no read: the handle remembered version 10
    assert calls[0].request.expected_version == 10 and rec.value == b"2"


def test_update_conflict_retries_with_the_current_record_without_reading() -> None:
    s = _core()
    _drive(s.put("n", b"1"), [state_pb2.PutResponse(applied=True, version=10)])
    rec, calls = _drive(s.update("n", lambda old: str(int(old.value) + 1)), [
        state_pb2.PutResponse(applied=False, current=_pb_rec("n", b"5", 20)),
        state_pb2.PutResponse(applied=True, version=21),
    ])
    assert [c.method for c in calls] == ["Put", "Put"]
    assert calls[0].request.expected_version == 10 and calls[0].request.value == b"2"
    assert calls[1].request.expected_version == 20 and calls[1].request.value == b"6"
    assert calls[0].request.request_id != calls[1].request.request_id  # two logical writes
    assert rec.version == 21 and rec.create_version == 1


def test_update_gives_up_with_conflict_error_and_none_means_no_write() -> None:
    s = _core()
    answers = [state_pb2.GetResponse(found=False)] + [
        state_pb2.PutResponse(applied=False, current=_pb_rec("n", b"x", v)) for v in range(1, 4)
    ]
    with pytest.raises(ConflictError, match="gave up after 3") as ei:
        _drive(s.update("n", lambda old: b"y", attempts=3), answers)
    assert ei.value.current is not None and ei.value.current.version == 3
    # None for the cached record: the stored one is read; unchanged, it is the answer
    rec, calls = _drive(s.update("n", lambda old: None),
                        [state_pb2.GetResponse(found=True, record=_pb_rec("n", b"x", 3))])
    assert [c.method for c in calls] == ["Get"] and rec is not None and rec.version == 3
    # changed behind the cache's back: fn is asked again from the stored record
    asked: list[int] = []
    rec, calls = _drive(s.update("n", lambda old: asked.append(old.version) or (None if old.version == 3 else b"z")),
                        [state_pb2.GetResponse(found=True, record=_pb_rec("n", b"w", 5)),
                         state_pb2.PutResponse(applied=True, version=6)])
    assert asked == [3, 5] and [c.method for c in calls] == ["Get", "Put"]
    assert calls[1].request.expected_version == 5 and rec.value == b"z" and rec.version == 6


def test_put_conflict_carries_current_and_refreshes_the_cache() -> None:
    s = _core()
    with pytest.raises(ConflictError) as ei:
        _drive(s.put("k", b"v", expect=3), [state_pb2.PutResponse(applied=False, current=_pb_rec("k", b"cur", 9))])
    assert ei.value.current == Record("k", b"cur", 9, 1)
    assert s.cache.lookup("k") == Record("k", b"cur", 9, 1)
    with pytest.raises(ConflictError, match="does not exist") as ei:
        _drive(s.put("k", b"v", expect=3), [state_pb2.PutResponse(applied=False)])
    assert ei.value.current is None and s.cache.lookup("k") is None


def test_session_ttl_goes_with_every_mutation() -> None:
    s = _core(ttl=60)
    _, calls = _drive(s.put("k", "v"), [state_pb2.PutResponse(applied=True, version=1)])
    assert calls[0].request.session_ttl_ms == 60_000 and calls[0].request.request_id
    _, calls = _drive(s.append("log", "x"), [state_pb2.AppendResponse(seqs=[1])])
    assert calls[0].request.session_ttl_ms == 60_000
    _, calls = _drive(s.incr("n"), [state_pb2.IncrementResponse(value=1, version=2)])
    assert calls[0].request.session_ttl_ms == 60_000
    _, calls = _drive(s.touch(), [state_pb2.TouchResponse(expires_at_ms=5)])
    assert calls[0].request.ttl_ms == 60_000
    with pytest.raises(InvalidArgumentError, match="touch"):
        _drive(_core().touch(), [])


def test_not_found_reads_as_empty() -> None:
    s = _core()
    assert _drive(s.read("nope"), [NotFoundError("no stream")])[0] == []
    assert _drive(s.pop("nope"), [NotFoundError("no stream")])[0] is None
    assert _drive(s.info(), [NotFoundError("no session")])[0] is None
    assert _drive(s.pop("log"), [state_pb2.PopLastResponse(found=False)])[0] is None


def test_read_follows_pages_unless_limited() -> None:
    s = _core()
    page1 = state_pb2.ReadLogResponse(entries=[types_pb2.LogEntry(seq=1), types_pb2.LogEntry(seq=2)], more=True)
    page2 = state_pb2.ReadLogResponse(entries=[types_pb2.LogEntry(seq=3)], more=False)
    got, calls = _drive(s.read("log"), [page1, page2])
    assert [e.seq for e in got] == [1, 2, 3] and calls[1].request.after_seq == 2
    got, calls = _drive(s.read("log", limit=2), [page1])
    assert [e.seq for e in got] == [1, 2] and len(calls) == 1


def test_scan_stops_at_limit_across_pages() -> None:
    s = _core()
    recs = [_pb_rec(f"k{i}", b"", i + 1) for i in range(3)]
    got, calls = _drive(s.scan(limit=1500), [
        state_pb2.ScanResponse(records=recs[:2], next_page_token="k1"),
        state_pb2.ScanResponse(records=recs[2:], next_page_token=""),
    ])
    assert [r.key for r in got] == ["k0", "k1", "k2"]
    assert calls[0].request.limit == 1000 and calls[1].request.page_token == "k1"


def test_retrying_reuses_the_request_and_switches_address() -> None:
    client = ClientCore(AddressPool(["a:1", "b:2"]), Retry(attempts=4, backoff=ConstantBackoff(0.5)), "", 5.0, 16)
    call = Call("Increment", state_pb2.IncrementRequest(key="n", request_id="r1"))
    resp, seen = _drive(client.retrying(call), [
        UnavailableError("a is down"), DeadlineExceededError("slow"),
        state_pb2.IncrementResponse(value=1),
    ])
    attempts = [i for i in seen if isinstance(i, Attempt)]
    assert all(a.call is call for a in attempts) and len(attempts) == 3
    assert attempts[0].address != attempts[1].address  # UNAVAILABLE moves on at once
    assert not isinstance(seen[1], Sleep)
    assert any(isinstance(i, Sleep) and i.seconds == 0.5 for i in seen)  # deadline: backoff
    assert resp.value == 1
    with pytest.raises(InvalidArgumentError):
        _drive(client.retrying(call), [InvalidArgumentError("bad")])
    with pytest.raises(UnavailableError):
        _drive(client.retrying(call), [UnavailableError("x")] * 4)


# ---- one deadline per call (a clock of the test's own: no waiting, no durations) ----


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _deadline_core(clock: FakeClock, timeout: float | None = 5.0, backoff: float = 0.5,
                   attempts: int = 10) -> ClientCore:
    return ClientCore(AddressPool(["a:1"]), Retry(attempts=attempts, backoff=ConstantBackoff(backoff)), "",
                      timeout, 16, clock=clock)


def _fail_attempts(gen: Any, clock: FakeClock, took: float, error: Any) -> tuple[BaseException, list[Any]]:
    """Drive a retrying generator whose every attempt takes `took` s (or its whole timeout,
    when that is shorter: it times out) and fails with error(); sleeps pass on the clock."""
    seen: list[Any] = []
    exc: BaseException | None = None
    while True:
        try:
            instr = gen.throw(exc) if exc is not None else next(gen)
        except BaseException as e:  # the call's outcome
            return e, seen
        exc = None
        seen.append(instr)
        if isinstance(instr, Sleep):
            clock.now += instr.seconds
            continue
        assert isinstance(instr, Attempt)
        clock.now += took if instr.timeout is None else min(took, instr.timeout)
        exc = error()


def test_each_attempt_gets_what_is_left_of_the_calls_deadline() -> None:
    clock = FakeClock()
    core = _deadline_core(clock)
    call = Call("Increment", state_pb2.IncrementRequest(key="n", request_id="r1"))
    start = clock.now
    got, seen = _fail_attempts(core.retrying(call), clock, 1.0, lambda: DeadlineExceededError("slow"))
    attempts = [i.timeout for i in seen if isinstance(i, Attempt)]
    assert attempts == [5.0, 3.5, 2.0, 0.5]  # 1 s each, 0.5 s backoff between: what is left
    assert call.deadline == start + 5.0  # fixed when the call started
    ends = start
    for i in seen:  # no pause runs past the deadline
        ends += i.seconds if isinstance(i, Sleep) else min(1.0, i.timeout)
        assert ends <= start + 5.0
    assert isinstance(got, DeadlineExceededError)
    assert str(got) == "the call's deadline of 5 s passed after 4 attempts (Increment; the last: slow)"
    assert isinstance(got.__cause__, DeadlineExceededError) and got.__cause__.message == "slow"


def test_a_backoff_that_would_reach_the_deadline_is_not_taken() -> None:
    clock = FakeClock()
    core = _deadline_core(clock, backoff=3.0)
    call = Call("Get", state_pb2.GetRequest(key="k"))
    got, seen = _fail_attempts(core.retrying(call), clock, 2.5, lambda: UnavailableError("down"))
    assert not any(isinstance(i, Sleep) for i in seen) and len(seen) == 1
    assert isinstance(got, DeadlineExceededError)
    assert str(got).startswith("the call's deadline of 5 s would pass in the 3 s backoff after 1 attempt (Get")
    assert isinstance(got.__cause__, UnavailableError)


def test_without_a_timeout_a_call_makes_every_attempt_it_may() -> None:
    clock = FakeClock()
    core = _deadline_core(clock, timeout=None, attempts=4)
    call = Call("Get", state_pb2.GetRequest(key="k"))
    got, seen = _fail_attempts(core.retrying(call), clock, 100.0, lambda: UnavailableError("down"))
    assert [i.timeout for i in seen if isinstance(i, Attempt)] == [None] * 4
    assert isinstance(got, UnavailableError) and call.deadline is None
    # a call's own timeout overrides the client's none
    call = Call("Get", state_pb2.GetRequest(key="k"), timeout=2.0)
    got, seen = _fail_attempts(core.retrying(call), clock, 1.5, lambda: UnavailableError("down"))
    assert [i.timeout for i in seen if isinstance(i, Attempt)] == [2.0] and isinstance(got, DeadlineExceededError)


def test_a_deadline_fixed_before_the_call_is_kept() -> None:
    clock = FakeClock()
    core = _deadline_core(clock)
    call = Call("Get", state_pb2.GetRequest(key="k"), 5.0, "get", clock.now + 1.25)
    got, seen = _fail_attempts(core.retrying(call), clock, 1.0, lambda: UnavailableError("down"))
    assert [i.timeout for i in seen if isinstance(i, Attempt)] == [1.25]
    assert isinstance(got, DeadlineExceededError)
    late = Call("Get", state_pb2.GetRequest(key="k"), 5.0, "get", clock.now - 1)
    got, seen = _fail_attempts(core.retrying(late), clock, 1.0, lambda: UnavailableError("down"))
    assert seen == [] and str(got) == "the call's deadline of 5 s passed before its first attempt (Get)"


def test_direct_mode_map_fetch_waits_what_is_left() -> None:
    clock = FakeClock()
    core = ClientCore(AddressPool(["r:1"]), Retry(attempts=5, backoff=ConstantBackoff(0.1)), "", 2.0, 16,
                      direct=True, clock=clock)
    call = Call("Get", state_pb2.GetRequest(session_id="s", key="k"))
    gen = core.retrying(call)
    fetch = next(gen)
    assert isinstance(fetch, FetchMap) and fetch.timeout == 2.0
    clock.now += 2.0  # the fetch used it all
    with pytest.raises(DeadlineExceededError, match="before its first attempt"):
        gen.send(None)


def test_update_read_and_every_cas_share_one_deadline() -> None:
    clock = FakeClock()
    s = SessionCore(_deadline_core(clock), "s")
    gen = s.update("k", lambda old: b"mine", timeout=3.0)
    start = clock.now
    calls: list[Call] = []
    answer: Any = None
    got: BaseException | None = None
    while True:
        try:
            instr = gen.send(answer)
        except BaseException as e:
            got = e
            break
        if isinstance(instr, Sleep):
            answer = None
            continue
        calls.append(instr)
        clock.now += 1.0
        if instr.method == "Get":
            answer = state_pb2.GetResponse(found=False)
        else:
            answer = state_pb2.PutResponse(applied=False, current=_pb_rec("k", b"theirs", len(calls)))
    assert [c.method for c in calls] == ["Get", "Put", "Put"]
    assert {c.deadline for c in calls} == {start + 3.0} and {c.timeout for c in calls} == {3.0}
    assert isinstance(got, DeadlineExceededError)
    assert str(got).startswith("the call's deadline of 3 s passed after 2 attempts (update; the last: ")
    assert isinstance(got.__cause__, ConflictError)


def test_pages_and_batch_chunks_share_the_first_requests_deadline() -> None:
    s = _core()
    gen = s.scan(limit=None)
    first = next(gen)
    assert first.deadline is None  # fixed by the driver when it starts the call ...
    first.deadline = 42.0
    second = gen.send(state_pb2.ScanResponse(records=[_pb_rec("a", b"", 1)], next_page_token="a"))
    assert second.deadline == 42.0  # ... and kept for the next pages
    gen = s.read("log")
    first = next(gen)
    first.deadline = 43.0
    page = state_pb2.ReadLogResponse(entries=[types_pb2.LogEntry(seq=1)], more=True)
    assert gen.send(page).deadline == 43.0
    # a batch: every chunk, and the further requests of its ops (a read's next page)
    b = Batch(s.client, lambda op: op, max_ops=1)
    b.read("s", "log").get("s", "k")
    gen = b.execute(timeout=7.0)
    chunk = next(gen)
    assert chunk.method == "Batch" and chunk.timeout == 7.0 and chunk.deadline is None
    chunk.deadline = 44.0
    result = state_pb2.BatchResult(read_log=page)
    follow = gen.send(state_pb2.BatchResponse(results=[result]))
    assert follow.method == "ReadLog" and (follow.timeout, follow.deadline) == (7.0, 44.0)
    chunk2 = gen.send(state_pb2.ReadLogResponse(entries=[types_pb2.LogEntry(seq=2)]))
    assert chunk2.method == "Batch" and chunk2.deadline == 44.0


def test_list_sessions_pages_each_have_their_own_deadline() -> None:
    client = _core().client
    gen = client.list_sessions("", 1, None, 2.0)
    first = next(gen)
    first.deadline = 45.0
    resp = state_pb2.ListSessionsResponse(sessions=[types_pb2.SessionInfo(session_id="a")], next_page_token="a")
    assert isinstance(gen.send(resp), Emit)
    second = next(gen)
    assert second.method == "ListSessions" and second.timeout == 2.0 and second.deadline is None


def test_deadline_error_messages() -> None:
    last = UnavailableError("down")
    e = deadline_exceeded(0.5, 1, last, "Get")
    assert str(e) == "the call's deadline of 0.5 s passed after 1 attempt (Get; the last: down)"
    assert e.__cause__ is last and isinstance(e, DeadlineExceededError) and e.retryable
    assert str(deadline_exceeded(10.0, 3, last)) == "the call's deadline of 10 s passed after 3 attempts (the last: down)"
    assert str(deadline_exceeded(2.0, 0, None, "Put")) == "the call's deadline of 2 s passed before its first attempt (Put)"
    assert "would pass in the 0.25 s backoff after 2 attempts" in str(deadline_exceeded(1.0, 2, last, "", 0.25))


def test_resume_passes_further_instructions_through() -> None:
    s = _core()
    gen = s.read("log")
    first = next(gen)
    page1 = state_pb2.ReadLogResponse(entries=[types_pb2.LogEntry(seq=1)], more=True)
    page2 = state_pb2.ReadLogResponse(entries=[types_pb2.LogEntry(seq=2)], more=False)
    got, seen = _drive(resume(gen, page1), [page2])
    assert first.method == "ReadLog" and [e.seq for e in got] == [1, 2] and len(seen) == 1


# ---- builders ----


def test_txn_builder_makes_compares_and_branches() -> None:
    captured: list[Any] = []
    core = _core()
    t: Txn[Any] = Txn(core, captured.append)
    t.if_version("a", 5).if_value("b", "x", "!=").if_exists("c").if_missing("d").if_log_length("log", 3, ">")
    t.put("a", b"1", ttl=2).delete("b").incr("n", 2).append("log", [b"e"]).get("a")
    t.otherwise().get("a")
    t.commit()
    with pytest.raises(InvalidArgumentError, match="already committed"):
        t.commit()
    res, calls = _drive(captured[0], [state_pb2.TxnResponse(
        succeeded=False, results=[state_pb2.TxnOpResult(get=state_pb2.GetResponse(found=True, record=_pb_rec("a", b"0", 4)))])])
    req = calls[0].request
    assert [c.WhichOneof("target") for c in req.compares] == ["version", "value", "exists", "exists", "log_length"]
    assert req.compares[1].result == state_pb2.Compare.NOT_EQUAL
    assert [o.WhichOneof("op") for o in req.success] == ["put", "delete", "increment", "append", "get"]
    assert req.success[0].put.ttl_ms == 2000 and not req.success[0].put.session_id
    assert [o.WhichOneof("op") for o in req.failure] == ["get"]
    assert req.session_id == "s" and req.request_id
    assert not res.succeeded and not res and res[0].value == b"0" and res.revision == 0
    assert captured and calls[0].method == "Txn"
    with pytest.raises(InvalidArgumentError, match="compare op"):
        Txn(core, captured.append).if_version("a", 1, "~")
    with pytest.raises(InvalidArgumentError, match="value must be bytes or str"):
        Txn(core, captured.append).put("a", 5)


def test_batch_builder_validates_on_add() -> None:
    client = ClientCore(AddressPool(["a:1"]), Retry(), "", 5.0, 16)
    b: Batch[Any] = Batch(client, lambda op: op)
    b.get("s1", "k").put("s2", "k", "v", expect=0).incr("s3", "n").append("s1", "log", "x")
    assert len(b) == 4
    with pytest.raises(InvalidArgumentError, match="session_id must not be empty"):
        b.get("", "k")
    with pytest.raises(InvalidArgumentError, match="value must be bytes or str"):
        b.put("s1", "k", 3)
    op = b.execute(raise_on_error=False)
    results = [
        state_pb2.BatchResult(get=state_pb2.GetResponse(found=True, record=_pb_rec("k", b"v", 3))),
        state_pb2.BatchResult(put=state_pb2.PutResponse(applied=False, current=_pb_rec("k", b"w", 4))),
        state_pb2.BatchResult(code=14, message="shard s3 down"),
        state_pb2.BatchResult(append=state_pb2.AppendResponse(seqs=[7])),
    ]
    out, calls = _drive(op, [state_pb2.BatchResponse(results=results)])
    assert calls[0].method == "Batch" and len(calls[0].request.ops) == 4
    assert out[0].value == b"v"
    assert isinstance(out[1], ConflictError) and out[1].current.version == 4
    assert isinstance(out[2], UnavailableError)
    assert out[3] == [7]


def test_field_head_frames_length_delimited_fields() -> None:
    from shardstate.common.protowire import field_head
    from shardstate.v1 import state_pb2

    assert field_head(1, 5) == b"\x0a\x05"
    assert field_head(2, 300) == b"\x12\xac\x02"
    assert field_head(2, 300) == b"\x12\xac\x02"  # remembered, same bytes
    assert field_head(1, 20_000) == b"\x0a\xa0\x9c\x01"  # beyond the memo, still right
    ops = [state_pb2.BatchOp(get=state_pb2.GetRequest(session_id="s", key="k" * n)).SerializeToString()
           for n in (1, 200, 17_000)]
    body = b"".join(field_head(1, len(o)) + o for o in ops)
    parsed = state_pb2.BatchRequest.FromString(body)
    assert [op.get.key for op in parsed.ops] == ["k", "k" * 200, "k" * 17_000]


def test_grpcs_own_internal_error_for_a_broken_connection_is_unavailable() -> None:
    import grpc

    from shardstate.common import errors

    broke = errors.from_status(grpc.StatusCode.INTERNAL, "Internal error from Core")
    assert isinstance(broke, errors.UnavailableError) and "connection broke" in broke.message
    # A node's own INTERNAL stays what it is.
    assert type(errors.from_status(grpc.StatusCode.INTERNAL, "internal error: KeyError: 'x'")) is errors.InternalError
