"""One metrics registry per process (and one per client): counters and gauges with labels,
named as Prometheus names them (`shardstate_` prefix, `_total` for counters, base units).

Each figure is counted once, where it happens; everything that reports it reads the registry:
Admin.Status (a node's load), the logs at shutdown, `AsyncClient.batching_stats()`, the
benchmarks, and later a Prometheus endpoint. No dependency: the client library uses it too.
Increments are plain attribute arithmetic on the event loop's thread (no locks): the servers
update their metrics from their loop only. A hot path binds its label values once
(`Counter.child`, `Histogram.child`) and then pays a dict update per event, no label handling.
Figures that are cheap to read but costly to keep current (sizes, lag) are filled by hooks
(`Registry.on_collect`) just before an exporter reads the registry.
"""

from __future__ import annotations

import bisect
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

Labels = tuple[tuple[str, str], ...]
T = TypeVar("T")


@dataclass
class Metric:
    name: str
    help: str
    kind: str  # "counter", "gauge" or "histogram"
    labelnames: tuple[str, ...] = ()
    values: dict[Labels, float] = field(default_factory=dict)
    fn: Callable[[], float] | None = None  # a gauge read when collected

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple((n, str(labels[n])) for n in self.labelnames)

    def value(self, **labels: str) -> float:
        if self.fn is not None:
            return self.fn()
        return self.values.get(self._key(labels), 0.0)

    def total(self) -> float:
        """The sum over every label set."""
        return self.fn() if self.fn is not None else sum(self.values.values())

    def samples(self) -> Iterator[tuple[Labels, float]]:
        if self.fn is not None:
            yield (), self.fn()
        else:
            yield from self.values.items()


class BoundCounter:
    """One label set of a counter, resolved once: `inc` is a dict update."""

    __slots__ = ("key", "values")

    def __init__(self, metric: Metric, key: Labels) -> None:
        self.values = metric.values
        self.key = key

    def inc(self, n: float = 1) -> None:
        v = self.values
        v[self.key] = v.get(self.key, 0.0) + n


def _child_key(m: Metric, labels: dict[str, str]) -> Labels:
    return m._key(labels) if labels or m.labelnames else ()

class Counter(Metric):
    def child(self, **labels: str) -> BoundCounter:
        return BoundCounter(self, _child_key(self, labels))

    def inc(self, n: float = 1, **labels: str) -> None:
        key = self._key(labels) if labels or self.labelnames else ()
        self.values[key] = self.values.get(key, 0.0) + n


class Gauge(Metric):
    def set(self, v: float, **labels: str) -> None:
        self.values[self._key(labels) if labels or self.labelnames else ()] = v

    def inc(self, n: float = 1, **labels: str) -> None:
        key = self._key(labels) if labels or self.labelnames else ()
        self.values[key] = self.values.get(key, 0.0) + n

    def dec(self, n: float = 1, **labels: str) -> None:
        self.inc(-n, **labels)


# Seconds: from 100 us (an in-memory read) to 10 s (a semi-sync timeout).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class HistogramCell:
    """One label set of a histogram: per-bucket counts (not cumulative) and their sum; the
    count is the buckets' total, added up when read."""

    __slots__ = ("bounds", "buckets", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, v: float, _bisect: Callable[..., int] = bisect.bisect_left) -> None:
        self.buckets[_bisect(self.bounds, v)] += 1
        self.sum += v

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it), +Inf last, as Prometheus exposes them."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            total += n
            out.append((bound, total))
        return out


class Histogram(Metric):
    """Observations in fixed buckets (`values` holds each label set's count, for `total`)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    cells: dict[Labels, HistogramCell]

    def child(self, **labels: str) -> HistogramCell:
        key = _child_key(self, labels)
        cell = self.cells.get(key)
        if cell is None:
            cell = self.cells[key] = HistogramCell(self.bounds)
        return cell

    def observe(self, v: float, **labels: str) -> None:
        self.child(**labels).observe(v)

    def samples(self) -> Iterator[tuple[Labels, float]]:
        for key, cell in self.cells.items():
            yield key, float(cell.count)

    def total(self) -> float:
        return float(sum(c.count for c in self.cells.values()))

    def value(self, **labels: str) -> float:
        cell = self.cells.get(self._key(labels))
        return float(cell.count) if cell else 0.0


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._hooks: list[Callable[[], object]] = []

    def _add(self, m: Metric) -> Metric:
        if m.name in self._metrics:
            raise ValueError(f"metric {m.name} is registered twice")
        self._metrics[m.name] = m
        return m

    def counter(self, name: str, help: str, labelnames: tuple[str, ...] = ()) -> Counter:
        if not name.endswith("_total"):
            raise ValueError(f"a counter's name ends in _total: {name}")
        c = Counter(name, help, "counter", labelnames)
        self._add(c)
        return c

    def gauge(self, name: str, help: str, labelnames: tuple[str, ...] = (),
              fn: Callable[[], float] | None = None) -> Gauge:
        g = Gauge(name, help, "gauge", labelnames, fn=fn)
        self._add(g)
        return g

    def histogram(self, name: str, help: str, labelnames: tuple[str, ...] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        h = Histogram(name, help, "histogram", labelnames)
        h.bounds = tuple(buckets)
        h.cells = {}
        self._add(h)
        return h

    def on_collect(self, hook: Callable[[], Awaitable[None] | None]) -> None:
        """Run `hook` (sync or async) before each export, to set the gauges it owns."""
        self._hooks.append(hook)

    async def refresh(self) -> None:
        """Run the collect hooks (an exporter calls this, on the event loop, then reads)."""
        for hook in self._hooks:
            r = hook()
            if inspect.isawaitable(r):
                await r

    def get(self, name: str) -> Metric:
        return self._metrics[name]

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._metrics.values())

    def snapshot(self) -> dict[str, float]:
        """name{label="v",...} -> value, for logs and tests."""
        out: dict[str, float] = {}
        for m in self:
            for labels, v in m.samples():
                tag = ",".join(f'{k}="{val}"' for k, val in labels)
                out[f"{m.name}{{{tag}}}" if tag else m.name] = v
        return out


class RateMeter:
    """Per second since the previous reading, of a counter's total (Status's load figure)."""

    def __init__(self, metric: Metric, clock: Callable[[], float] = time.monotonic) -> None:
        self.metric = metric
        self.clock = clock
        self._mark = (clock(), metric.total())

    def rate(self) -> float:
        now, total = self.clock(), self.metric.total()
        then, before = self._mark
        self._mark = (now, total)
        return (total - before) / (now - then) if now > then else 0.0


async def gauged(gauge: Gauge, stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """`stream`, with `gauge` one higher while it is open (open Watch streams)."""
    gauge.inc()
    try:
        async for item in stream:
            yield item
    finally:
        gauge.dec()
