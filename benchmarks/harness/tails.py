"""Where slow operations come from: each op's latency set against the flushes and compactions
LevelDB logged in each node's data directory (its `LOG` file) during the run.

For every (node, kind) it reports the share of all ops that overlapped such an event and the
share of the slowest ops (above the `quantile` latency) that did; their ratio says how much more
likely an op is to be slow while that work runs (1 = no more than any other op). It also gives
the quantile latency of the ops that overlapped none of the events (ops that ran while LevelDB
did nothing in the background, which are not all ops minus the work's effect: an estimate).
"""

from __future__ import annotations

import bisect
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# "2026/11/30-13:18:28.989882 140204436281024 Level-0 table #7: started" (local time)
_LINE = re.compile(r"(\d{4})/(\d\d)/(\d\d)-(\d\d):(\d\d):(\d\d)\.(\d+) \S+ (.*)")
# An op overlaps an event that ended at most this long before the op started (a flush's
# after-effects: the caches it emptied) or starts at most this long after the op ended.
SLACK_S = 0.002


@dataclass(frozen=True)
class Event:
    kind: str  # "flush" (memtable to a level-0 file) or "compaction"
    start: float  # epoch seconds
    end: float


def _epoch(m: re.Match[str]) -> float:
    y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
    frac = float("0." + m.group(7))
    return time.mktime((y, mo, d, h, mi, s, 0, 0, -1)) + frac


def leveldb_events(log_text: str) -> list[Event]:
    """The flushes and compactions of a LevelDB LOG, in order; one still running at the end
    of the text is left out."""
    out: list[Event] = []
    flush: float | None = None
    compaction: float | None = None
    for line in log_text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        msg = m.group(8)
        if msg.startswith("Level-0 table #"):
            if msg.endswith(": started"):
                flush = _epoch(m)
            elif msg.endswith(" OK") and flush is not None:
                out.append(Event("flush", flush, _epoch(m)))
                flush = None
        elif msg.startswith("Compacting "):
            compaction = _epoch(m)
        elif msg.startswith("Compacted ") and compaction is not None:
            out.append(Event("compaction", compaction, _epoch(m)))
            compaction = None
    return out


def node_events(data_dir: Path, nodes: Iterable[str]) -> dict[str, list[Event]]:
    """Each node's events from DATA/<node>/LOG (a node without a LOG has none)."""
    out: dict[str, list[Event]] = {}
    for node in nodes:
        log = data_dir / node / "LOG"
        out[node] = leveldb_events(log.read_text(errors="replace")) if log.exists() else []
    return out


@dataclass
class Row:
    node: str
    kind: str
    busy_s: float  # the events' total duration inside the measured window
    share_all: float  # of all ops, the share that overlapped one of these events
    share_tail: float  # of the ops above the quantile latency, the share that did

    @property
    def enrichment(self) -> float | None:
        return self.share_tail / self.share_all if self.share_all else None


@dataclass
class Attribution:
    quantile: float
    threshold_ms: float  # the quantile latency of all ops
    ops: int
    tail_ops: int
    rows: list[Row]
    clear_share: float  # share of ops that overlapped no event at all
    clear_quantile_ms: float | None  # the quantile latency of those ops


def _overlaps(events: Sequence[Event], starts: Sequence[float], start: float, end: float) -> bool:
    """Whether [start, end] overlaps one of `events`: sorted and disjoint (one LevelDB runs its
    flushes and compactions one at a time), so only the last to start before `end` can."""
    i = bisect.bisect_right(starts, end + SLACK_S)
    return i > 0 and events[i - 1].end + SLACK_S >= start


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def attribute(ops: Sequence[tuple[float, float]], events: dict[str, list[Event]],
              quantile: float = 0.99) -> Attribution:
    """ops: (end time in epoch seconds, latency in seconds) of every measured op."""
    if not ops:
        raise ValueError("no ops to attribute")
    threshold = _quantile(sorted(lat for _, lat in ops), quantile)
    first, last = min(e - lat for e, lat in ops), max(e for e, _ in ops)
    slow = [lat > threshold for _, lat in ops]
    n_tail = sum(slow)
    rows: list[Row] = []
    touched = [False] * len(ops)
    for node in sorted(events):
        for kind in ("flush", "compaction"):
            evs = sorted((ev for ev in events[node] if ev.kind == kind), key=lambda ev: ev.start)
            if not evs:
                continue
            starts = [ev.start for ev in evs]
            hit_all = hit_tail = 0
            for i, (e, lat) in enumerate(ops):
                if _overlaps(evs, starts, e - lat, e):
                    hit_all += 1
                    hit_tail += slow[i]
                    touched[i] = True
            busy = sum(max(0.0, min(ev.end, last) - max(ev.start, first)) for ev in evs)
            rows.append(Row(node, kind, busy, hit_all / len(ops), hit_tail / n_tail if n_tail else 0.0))
    clear = sorted(lat for (_, lat), t in zip(ops, touched, strict=True) if not t)
    return Attribution(
        quantile=quantile, threshold_ms=threshold * 1000, ops=len(ops), tail_ops=n_tail, rows=rows,
        clear_share=len(clear) / len(ops),
        clear_quantile_ms=_quantile(clear, quantile) * 1000 if clear else None,
    )
