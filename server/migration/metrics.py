"""Migration progress for Prometheus, as the target shard sees each pair it pulls: sessions
to copy and copied, bytes copied, how far its tail of the source's change log is behind, and
the pair's phase. Filled at scrape time from the pullers' `status()`, which MigrationStatus
also answers; a finished pair leaves no series."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from shardstate.common.metrics import Registry
from shardstate.v1 import replication_pb2

PHASES = ("copying", "tailing", "caught_up")


def register(registry: Registry, pairs: Callable[[], Iterable[replication_pb2.PairStatus]]) -> None:
    total = registry.gauge("shardstate_migration_sessions", "sessions this shard is to copy from a source",
                           ("source",))
    copied = registry.gauge("shardstate_migration_sessions_copied", "sessions copied from a source so far",
                            ("source",))
    size = registry.gauge("shardstate_migration_copied_bytes", "bytes copied from a source so far", ("source",))
    lag = registry.gauge("shardstate_migration_lag_revisions",
                         "source revision less the revision this shard has applied through", ("source",))
    phase = registry.gauge("shardstate_migration_phase", "1 for the phase each pair is in", ("source", "phase"))

    def refresh() -> None:
        for g in (total, copied, size, lag, phase):
            g.values.clear()
        for p in pairs():
            total.set(p.sessions_total, source=p.source)
            copied.set(p.sessions_copied, source=p.source)
            size.set(p.bytes, source=p.source)
            lag.set(max(0, p.source_revision - p.position), source=p.source)
            for name in PHASES:
                phase.set(1.0 if p.phase == name else 0.0, source=p.source, phase=name)

    registry.on_collect(refresh)
