"""Latency and outcome bookkeeping for one benchmark run: counts, percentiles, a per-second timeline.

Every finished op lands in exactly one phase by its end time (warm-up, measured, or late), so the
measured counts always satisfy completed = successes + conflicts + errors.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

OK, CONFLICT, ERROR = 0, 1, 2
PERCENTILES = (50.0, 95.0, 99.0, 99.9)


def percentile(sorted_values: array | list[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 when there are none)."""
    n = len(sorted_values)
    if n == 0:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * n))
    return float(sorted_values[min(rank, n) - 1])


@dataclass
class Second:
    """One second of the measured window: how many ops ended in it and their latencies (s)."""

    ok: int = 0
    conflicts: int = 0
    errors: int = 0
    latencies: array = field(default_factory=lambda: array("d"))


@dataclass
class Recorder:
    """Collects outcomes as ops finish; `summary()` turns them into the report's numbers.

    Latencies are kept for the measured window only, as 8-byte doubles (a 20 s run at 20k ops/s
    is ~3 MB), so percentiles are exact rather than bucketed.
    """

    measure_start: float = 0.0
    measure_end: float = math.inf
    warmup_ops: int = 0
    warmup_errors: int = 0
    late_ops: int = 0  # finished after the window: drained, not counted
    seconds: list[Second] = field(default_factory=list)
    error_kinds: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)

    def record(self, started: float, ended: float, outcome: int, error: BaseException | None = None) -> None:
        if ended < self.measure_start:
            self.warmup_ops += 1
            if outcome == ERROR:
                self.warmup_errors += 1
            return
        if ended >= self.measure_end:
            # Finished after the window closed (workers stop starting ops at the end, then drain).
            self.late_ops += 1
            return
        idx = int(ended - self.measure_start)
        while len(self.seconds) <= idx:
            self.seconds.append(Second())
        sec = self.seconds[idx]
        if outcome == OK:
            sec.ok += 1
        elif outcome == CONFLICT:
            sec.conflicts += 1
        else:
            sec.errors += 1
            kind = type(error).__name__ if error is not None else "error"
            self.error_kinds[kind] += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(f"{kind}: {error}"[:300])
        sec.latencies.append(ended - started)

    def summary(self, window_s: float) -> dict[str, Any]:
        # Seconds in which nothing finished (a stalled server) still belong on the timeline.
        while len(self.seconds) < math.ceil(window_s):
            self.seconds.append(Second())
        ok = sum(s.ok for s in self.seconds)
        conflicts = sum(s.conflicts for s in self.seconds)
        errors = sum(s.errors for s in self.seconds)
        completed = ok + conflicts + errors
        all_lat = array("d")
        for s in self.seconds:
            all_lat.extend(s.latencies)
        lat = sorted(all_lat)
        latency_ms = {f"p{_pname(p)}": percentile(lat, p) * 1000.0 for p in PERCENTILES}
        latency_ms["max"] = (lat[-1] if lat else 0.0) * 1000.0
        latency_ms["mean"] = (sum(lat) / len(lat) if lat else 0.0) * 1000.0
        timeline = []
        for i, s in enumerate(self.seconds):
            sl = sorted(s.latencies)
            timeline.append({
                "second": i,
                "ops": s.ok + s.conflicts + s.errors,
                "successes": s.ok,
                "conflicts": s.conflicts,
                "errors": s.errors,
                "p50_ms": percentile(sl, 50) * 1000.0,
                "p99_ms": percentile(sl, 99) * 1000.0,
            })
        return {
            "window_s": window_s,
            "completed": completed,
            "successes": ok,
            "conflicts": conflicts,
            "errors": errors,
            "throughput_ops_s": completed / window_s if window_s > 0 else 0.0,
            "success_ops_s": ok / window_s if window_s > 0 else 0.0,
            "latency_ms": latency_ms,
            "error_kinds": dict(self.error_kinds),
            "error_samples": list(self.error_samples),
            "warmup_ops": self.warmup_ops,
            "warmup_errors": self.warmup_errors,
            "late_ops": self.late_ops,
            "timeline": timeline,
        }

    def live(self, now: float) -> tuple[int, int, int, float, float]:
        """(completed, conflicts, errors, ops/s over the last full second, its p99 ms) so far."""
        completed = sum(s.ok + s.conflicts + s.errors for s in self.seconds)
        conflicts = sum(s.conflicts for s in self.seconds)
        errors = sum(s.errors for s in self.seconds)
        idx = int(now - self.measure_start) - 1
        if 0 <= idx < len(self.seconds):
            s = self.seconds[idx]
            return completed, conflicts, errors, float(s.ok + s.conflicts + s.errors), \
                percentile(sorted(s.latencies), 99) * 1000.0
        return completed, conflicts, errors, 0.0, 0.0


def _pname(p: float) -> str:
    return str(int(p)) if p == int(p) else str(p).replace(".", "")
