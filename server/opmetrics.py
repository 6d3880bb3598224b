"""The shard's per-op figures: ops by kind and status, their latency in the engine, CAS
conflicts, idempotent replays, Batch sizes; and the scrape-time gauges of the shard's data.

Every op counts once, as a unary call or as one op of a Batch/Pipeline message. Label values
are bound once per kind (`OpCells`): an op costs two clock reads and a bucket update,
a Put/Delete/Txn one field read more.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shardstate.common import errors
from shardstate.common.metrics import SIZE_BUCKETS, Registry

from . import leveldbstats
from .node import Node

# applied=false (Put/Delete: expected_version did not match) or succeeded=false (Txn) is a conflict
CAS_KINDS = ("put", "delete", "txn")


class OpCells:
    """One kind's figures, bound once. `failures` counts its errors: the OK count is the
    latency histogram's count less them, filled in at collect time (one update less per op)."""

    __slots__ = ("cas", "conflicts", "failures", "kind", "latency")

    def __init__(self, m: OpMetrics, kind: str) -> None:
        self.kind = kind
        self.latency = m.latency.child(op=kind)
        self.conflicts = m.conflicts.child(op=kind)
        self.failures = 0
        self.cas = kind in CAS_KINDS


class OpMetrics:
    def __init__(self, registry: Registry) -> None:
        self.ops = registry.counter("shardstate_shard_ops_total",
                                    "ops served by kind and gRPC status (a Batch's ops each count one)",
                                    ("op", "code"))
        self.latency = registry.histogram("shardstate_shard_op_duration_seconds",
                                          "time an op spends in the shard's handler and engine", ("op",))
        self.conflicts = registry.counter("shardstate_shard_cas_conflicts_total",
                                          "compare-and-swap ops (Put/Delete with expected_version, "
                                          "Txn compares) that did not apply", ("op",))
        # counted by StateService.header, which holds the reply's header anyway
        self.replays = registry.counter("shardstate_shard_idempotent_replays_total",
                                        "writes answered from the idempotency record of their request_id")
        self.batch_ops = registry.histogram("shardstate_shard_batch_ops",
                                            "ops per Batch or Pipeline message", buckets=SIZE_BUCKETS)
        self.unprocessed = registry.counter("shardstate_shard_ops_unprocessed_total",
                                            "Batch/Pipeline ops not run because their message's answer had "
                                            "reached its byte budget (max_response_bytes); the caller sends them again")
        self.watches = registry.gauge("shardstate_shard_watch_streams", "open Watch streams")
        self._cells: dict[str, OpCells] = {}
        registry.on_collect(self._fill_ok)

    def cells(self, kind: str) -> OpCells:
        c = self._cells.get(kind)
        if c is None:
            c = self._cells[kind] = OpCells(self, kind)
        return c

    def done(self, kind: str, resp: Any, t0: float) -> None:
        c = self._cells.get(kind) or self.cells(kind)
        c.latency.observe(time.perf_counter() - t0)
        if not c.cas:
            return
        # a replayed conflict counts again: the caller was told of it again
        if kind == "txn":
            if not resp.succeeded:
                c.conflicts.inc()
        elif not resp.applied:
            c.conflicts.inc()

    def failed(self, kind: str, exc: BaseException, t0: float) -> None:
        c = self.cells(kind)
        c.latency.observe(time.perf_counter() - t0)
        c.failures += 1
        self.ops.inc(op=kind, code=errors.as_shardstate_error(exc).code.name)

    def _fill_ok(self) -> None:
        for kind, c in self._cells.items():
            self.ops.values[(("op", kind), ("code", "OK"))] = float(c.latency.count - c.failures)


def data_gauges(node: Node, registry: Registry) -> None:
    """Sessions, keys, LevelDB bytes and the revision, read at scrape time (the session count
    is a scan of the metas, off the event loop, as Admin.Status does)."""
    engine = node.engine
    sessions = registry.gauge("shardstate_shard_sessions", "live sessions on this node")
    keys = registry.gauge("shardstate_shard_keys", "keys of the live sessions on this node")
    disk = registry.gauge("shardstate_shard_leveldb_bytes", "size of the LevelDB files on disk")
    registry.gauge("shardstate_shard_revision", "the node's committed (a replica: applied) revision",
                   fn=lambda: float(engine.revision()))
    registry.gauge("shardstate_shard_changelog_entries", "change-log entries retained",
                   fn=lambda: float(engine.store.change_count))
    registry.gauge("shardstate_shard_is_primary", "1 on a primary, 0 on a replica",
                   fn=lambda: 0.0 if node.is_replica else 1.0)

    async def refresh() -> None:
        n, k = await asyncio.to_thread(engine.count_sessions)
        sessions.set(n)
        keys.set(k)
        disk.set(await asyncio.to_thread(engine.disk_bytes))

    registry.on_collect(refresh)
    leveldbstats.register(engine.store.db, registry)


def sweep_counters(registry: Registry) -> Any:
    """The engine's `on_sweep` callback: sweeps run and what each reclaimed."""
    sweeps = registry.counter("shardstate_shard_expiry_sweeps_total", "expiry sweeper passes")
    reclaimed = registry.counter("shardstate_shard_expiry_reclaimed_total",
                                 "what the sweeper removed, by kind (sessions, keys, idempotency, "
                                 "changes_trimmed)", ("kind",))

    def on_sweep(done: dict[str, int]) -> None:
        sweeps.inc()
        for kind, n in done.items():
            if n:
                reclaimed.inc(n, kind=kind)

    return on_sweep
