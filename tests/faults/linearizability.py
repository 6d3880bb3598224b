"""A history checker for a versioned register (one per key): reads return a version, CAS
writes name the version they expect and, when applied, the version they wrote.

Pure logic, no I/O. An operation has invoke/complete times (time.monotonic) and an outcome:
"ok" (it happened), "fail" (a CAS that did not apply: it saw `read` as the current version) or
"unknown" (an error: a write may or may not have applied; its complete time is unbounded).

Violations found (each a `Violation.kind`):
- "stale_read": a read (or a failed CAS's observed version) that started after a write
  completed returns a version below that write's;
- "read_regress": a read that started after another read completed returns a lower version
  (e.g. the first one saw a write that was later lost);
- "future_read": a read returns a version whose write started only after the read completed;
- "unwritten_read": a read returns a version no write could have produced;
- "double_cas": two applied CAS on one key from the same expected version;
- "stale_cas": a CAS applied from a version that a write completed before the CAS started had
  already replaced;
- "version_order": of two completed writes to a key in real-time order (one completed before
  the other started), the later wrote a version not above the earlier's.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
READ, CAS, WRITE = "read", "cas", "write"  # WRITE: an unconditional put (e.g. the initial one)


@dataclass(frozen=True)
class Op:
    client: int
    kind: str  # READ, CAS or WRITE
    key: str
    invoke: float
    complete: float  # for UNKNOWN: when the caller gave up (the op may take effect later)
    outcome: str  # OK, FAIL or UNKNOWN
    read: int = 0  # READ: the version returned (0 = absent); failed CAS: the current version
    expected: int = 0  # CAS: the version it expected (0 = absent)
    written: int = 0  # applied CAS / WRITE: the version it wrote

    @property
    def writes(self) -> bool:
        return self.kind in (CAS, WRITE) and self.outcome == OK

    @property
    def observes(self) -> bool:
        return (self.kind == READ and self.outcome == OK) or (self.kind == CAS and self.outcome == FAIL)


@dataclass(frozen=True)
class Violation:
    kind: str
    key: str
    detail: str


def check(history: Iterable[Op]) -> list[Violation]:
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    out: list[Violation] = []
    for key, ops in sorted(by_key.items()):
        out.extend(_check_key(key, ops))
    return out


def _check_key(key: str, ops: list[Op]) -> list[Violation]:
    out: list[Violation] = []
    writes = sorted((o for o in ops if o.writes), key=lambda o: o.complete)
    done_at = [wr.complete for wr in writes]
    top: list[int] = []  # highest version written by a write completed at or before done_at[i]
    for wr in writes:
        top.append(max(top[-1] if top else 0, wr.written))
    by_version = {wr.written: wr for wr in writes}
    unknown = [o for o in ops if o.kind in (CAS, WRITE) and o.outcome == UNKNOWN]

    def floor(t: float) -> tuple[int, Op | None]:
        """The highest version of a write completed before time t, and that write."""
        i = bisect.bisect_left(done_at, t)
        if i == 0:
            return 0, None
        v = top[i - 1]
        return v, by_version.get(v)

    for o in ops:
        if o.observes:
            v, w = floor(o.invoke)
            if o.read < v:
                out.append(Violation("stale_read", key, f"{o} returned version {o.read} after {w} completed"))
            src = by_version.get(o.read)
            if src is not None and src.invoke > o.complete:
                out.append(Violation("future_read", key, f"{o} returned the version of {src}, which started later"))
            if o.read and src is None and not any(u.invoke < o.complete for u in unknown):
                out.append(Violation("unwritten_read", key, f"{o} returned version {o.read}, which no write produced"))
        if o.kind == CAS and o.outcome == OK:
            v, w = floor(o.invoke)
            if o.expected < v:
                out.append(Violation("stale_cas", key, f"{o} applied from version {o.expected} after {w} completed"))

    observed = sorted((o for o in ops if o.observes), key=lambda o: o.complete)
    seen_at = [o.complete for o in observed]
    best: list[Op] = []  # the read with the highest version among those completed by seen_at[i]
    for o in observed:
        best.append(o if not best or o.read > best[-1].read else best[-1])
    for o in observed:
        i = bisect.bisect_left(seen_at, o.invoke)
        if i and best[i - 1].read > o.read:
            out.append(Violation("read_regress", key, f"{o} returned version {o.read} after {best[i - 1]} returned a later one"))

    seen: dict[int, Op] = {}
    for o in sorted((o for o in ops if o.kind == CAS and o.outcome == OK), key=lambda o: o.invoke):
        if o.expected in seen:
            out.append(Violation("double_cas", key, f"{seen[o.expected]} and {o} both applied from version {o.expected}"))
        else:
            seen[o.expected] = o

    by_invoke = sorted(writes, key=lambda o: o.invoke)
    for later in by_invoke:
        v, w = floor(later.invoke)
        if w is not None and later.written <= v:
            out.append(Violation("version_order", key, f"{later} wrote version {later.written}, not above {w}"))
    return out
