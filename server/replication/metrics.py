"""Replication's Prometheus figures: lag per replica (revisions and seconds, as the primary
sees each follower and as a replica sees itself), connected followers, semi-sync ack waits.

The lag gauges are filled at scrape time from the figures Admin.Status reports.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from shardstate.common import errors
from shardstate.common.metrics import Registry

from ..node import Node
from .follower import Follower
from .leader import Leader


class ReplicationMetrics:
    def __init__(self, registry: Registry, node: Node, leader: Leader,
                 follower: Callable[[], Follower | None]) -> None:
        self.node = node
        self.leader = leader
        self.follower = follower
        self.lag_revisions = registry.gauge(
            "shardstate_replication_lag_revisions", "writes a replica is behind its primary", ("replica",))
        self.lag_seconds = registry.gauge(
            "shardstate_replication_lag_seconds", "age of the oldest write a replica has not applied", ("replica",))
        self.connected = registry.gauge(
            "shardstate_replication_replica_connected", "1 while the replica's Follow stream is open", ("replica",))
        self.ack_wait = registry.histogram(
            "shardstate_replication_ack_wait_seconds",
            "semi-sync: how long a write waited for --min-replica-acks acknowledgements").child()
        self.ack_timeouts = registry.counter(
            "shardstate_replication_ack_timeouts_total",
            "semi-sync waits that ran out (the caller got UNAVAILABLE)").child()
        registry.on_collect(self.refresh)

    def refresh(self) -> None:
        for g in (self.lag_revisions, self.lag_seconds, self.connected):
            g.values.clear()  # a follower that went away leaves no stale series
        f = self.follower()
        if self.node.is_replica:
            if f is not None:
                revs, ms = f.lag()
                self._set(self.node.address, revs, ms, f.connected)
            return
        for st in self.leader.statuses():
            self._set(st.address, st.lag_revisions, st.lag_ms, st.up)

    def _set(self, replica: str, revs: int, ms: int, up: bool) -> None:
        self.lag_revisions.set(revs, replica=replica)
        self.lag_seconds.set(ms / 1000.0, replica=replica)
        self.connected.set(1.0 if up else 0.0, replica=replica)

    async def timed(self, wait: Awaitable[None]) -> None:
        t0 = time.perf_counter()
        try:
            await wait
        except errors.UnavailableError:
            self.ack_timeouts.inc()
            raise
        finally:
            self.ack_wait.observe(time.perf_counter() - t0)
