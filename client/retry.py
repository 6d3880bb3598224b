"""Retry policy of the client library: which errors to retry, how many attempts, what backoff.

An injected policy object (as in redis-py): `Client(addrs, retry=Retry(attempts=8))`.
Attempts and backoff pauses all fit in the call's one deadline (`timeout=`, fixed when the
call starts, as a gRPC deadline or an etcd context deadline): each attempt gets what is left
of it, and the call raises `deadline_exceeded(...)` when nothing is.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shardstate.common.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    RateLimitedError,
    UnavailableError,
)


class Backoff(Protocol):
    def compute(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt (1-based)."""
        ...


@dataclass(frozen=True)
class NoBackoff:
    def compute(self, failures: int) -> float:
        return 0.0


@dataclass(frozen=True)
class ConstantBackoff:
    delay: float = 0.1

    def compute(self, failures: int) -> float:
        return self.delay


@dataclass(frozen=True)
class ExponentialBackoff:
    """base * factor**(failures-1), capped; `jitter` is the fraction taken off at random, so
    many clients failing together do not come back in lockstep."""

    base: float = 0.1
    cap: float = 2.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0 or self.factor < 1 or not 0 <= self.jitter <= 1:
            raise InvalidArgumentError(
                "ExponentialBackoff needs base >= 0, cap >= 0, factor >= 1 and 0 <= jitter <= 1"
            )

    def compute(self, failures: int) -> float:
        exp = min(max(failures - 1, 0), 64)  # bounded so factor**exp stays a float
        delay = min(self.cap, self.base * self.factor**exp)
        return delay * (1.0 - self.jitter * random.random())


def _default_retry_on() -> tuple[type[BaseException], ...]:
    # RateLimitedError: over a namespace's max_ops_per_s. Waiting it out (the backoff, ended
    # on a shared tick: on_tick, applied by ClientCore.failed) turns a throttled caller's burst
    # of refusals into a few attempts, batched with its client's other throttled callers.
    return (UnavailableError, DeadlineExceededError, RateLimitedError)


@dataclass(frozen=True)
class Retry:
    """`attempts` counts every try, the first included (1 = never retry).

    Every attempt of a call shares the call's deadline (its `timeout`, which starts when the
    call does): an attempt gets what is left of it, a backoff pause that would reach it is not
    taken, and when it leaves no time for another attempt the call raises
    DeadlineExceededError ("the call's deadline of N s passed after K attempts ..."), with the
    last attempt's error as its __cause__. So `attempts` is the most a call makes, the
    deadline the longest it takes.

    `attempt_timeout` (seconds; None: none) caps each attempt within that deadline, as gRPC's
    perAttemptRecvTimeout and the AWS SDKs' attempt timeout do: an address that hangs without
    answering (a stopped process, a dead host that sends no reset) then costs one attempt, and
    the retry goes to another address or a new stream while the call's deadline lasts. Without
    it, such an attempt waits for whatever is left of the deadline.

    Retrying is safe for every call the library makes: reads are idempotent and every
    mutation carries one request_id for all its attempts, so the shard applies it once.
    By default it retries UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED over
    `max_ops_per_s` (`RateLimitedError`); never the other limits, which do not pass by
    waiting. An explicit `batch()` gives each op's error in place and retries none."""

    attempts: int = 6
    backoff: Backoff = field(default_factory=ExponentialBackoff)
    retry_on: Sequence[type[BaseException]] = field(default_factory=_default_retry_on)
    attempt_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InvalidArgumentError(f"Retry(attempts=) must be at least 1, got {self.attempts}")
        a = self.attempt_timeout
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < math.inf):
            raise InvalidArgumentError(f"Retry(attempt_timeout=) must be a positive number of seconds or None, got {a!r}")
        object.__setattr__(self, "retry_on", tuple(self.retry_on))

    def retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, tuple(self.retry_on))

    def attempt(self, left: float | None) -> float | None:
        """The timeout of the next attempt when `left` seconds remain of the call (None: no
        deadline)."""
        cap = self.attempt_timeout
        if cap is None or (left is not None and left <= cap):
            return left
        return cap

    def delay(self, exc: BaseException, failures: int) -> float | None:
        """Seconds to wait before the next attempt after `failures` failed ones, or None
        when `exc` must reach the caller (not retryable, or attempts used up)."""
        if not self.retryable(exc) or failures >= self.attempts:
            return None
        return max(0.0, self.backoff.compute(failures))


NO_RETRY = Retry(attempts=1, backoff=NoBackoff())

# A throttled call's retry waits until the next multiple of this on the monotonic clock (the
# asyncio loop's clock): the retries of one client's throttled callers then wake together and
# leave in one batch, not one message each, which is what a refusal costs the servers and the
# client most (benchmarks/RESULTS.md, 2026-12-03, tenants).
THROTTLE_TICK_S = 0.05


def on_tick(delay: float, tick: float = THROTTLE_TICK_S) -> float:
    """`delay`, lengthened to end on the next multiple of `tick` of time.monotonic()."""
    now = time.monotonic()
    return math.ceil((now + delay) / tick) * tick - now


def deadline_exceeded(timeout: float | None, attempts: int, last: BaseException | None,
                      what: str = "", backoff: float = 0.0) -> DeadlineExceededError:
    """The error of a call whose deadline (`timeout` s after it started) left no time for an
    attempt after `attempts` ones; `last` (the last attempt's error) is its __cause__.
    `backoff` > 0: the deadline has not passed yet, but would during that pause. `what`
    names the request (or the operation) in the message."""
    n = "?" if timeout is None else f"{timeout:g}"
    if not attempts:
        msg = f"the call's deadline of {n} s passed before its first attempt"
        if what:
            msg += f" ({what})"
    else:
        tries = f"{attempts} attempt{'' if attempts == 1 else 's'}"
        if backoff > 0:
            msg = f"the call's deadline of {n} s would pass in the {backoff:.3g} s backoff after {tries}"
        else:
            msg = f"the call's deadline of {n} s passed after {tries}"
        last_text = getattr(last, "message", None) or (str(last) if last is not None else "")
        msg += f" ({what}; the last: {last_text})" if what else f" (the last: {last_text})"
    err = DeadlineExceededError(msg)
    err.__cause__ = last
    return err
