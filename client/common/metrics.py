"""One metrics registry per process (and one per client): counters and gauges with labels,
named as Prometheus names them (`shardstate_` prefix, `_total` for counters, base units).

Each figure is counted once, where it happens; everything that reports it reads the registry:
Admin.Status (a node's load), the logs at shutdown, `AsyncClient.batching_stats()`, the
benchmarks, and later a Prometheus endpoint. No dependency: the client library uses it too.
Increments are plain attribute arithmetic on the event loop's thread (no locks): the servers
update their metrics from their loop only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]


@dataclass
class Metric:
    name: str
    help: str
    kind: str  # "counter" or "gauge"
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


class Counter(Metric):
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


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

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
