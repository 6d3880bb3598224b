"""Direct mode (`Client(..., direct=True)`): session calls go straight to the primary of the
shard that owns the session, as Redis Cluster's and etcd's smart clients do, instead of
through a router.

The client fetches the cluster map from a router and computes each session's owner with the
same ring the routers use (shardstate.common.clustermap). A shard that answers WrongShard or
NotPrimary, or cannot be reached, marks the map stale (the next call fetches it again) and the
rest of that call's attempts go through the routers, which follow redirects, push maps to
shards that are behind, and wait out a failover; a shard address that could not be reached is
skipped for a while. Calls that are not about one session (Batch, ListSessions, Watch) always
go through a router. Every request keeps its request_id across these attempts, so a retry at
the new owner is applied once.

This module is the pure routing state, shared by the sync and asyncio drivers; they do the I/O
(fetching the map) when `wants_refresh()` says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from shardstate.common.clustermap import ClusterView
from shardstate.common.errors import (
    NotPrimaryError,
    ShardstateError,
    UnavailableError,
    WrongShardError,
)

# The unary State RPCs about one session (their requests carry namespace and session_id).
SESSION_METHODS = frozenset({
    "Get", "Put", "Delete", "Txn", "Increment", "Scan", "Append", "ReadLog", "TrimLog", "PopLast",
    "Touch", "DeleteSession", "GetSession",
})
REFRESH_S = 30.0  # a map older than this is fetched again even when nothing failed
MIN_GAP_S = 0.05  # never fetch the map more often than this (a burst of redirects fetches once)
DOWN_FOR_S = 1.0  # a shard address that could not be reached is skipped (via a router) this long


class DirectRoutes:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.view: ClusterView | None = None
        self.stale = True
        self._fetched = -1e18  # when the map was last fetched (or a fetch was tried)
        self._down: dict[str, float] = {}  # shard address -> skipped until
        self.direct_calls = 0  # attempts sent to a shard, and those that fell back (figures)
        self.fallbacks = 0

    def wants_refresh(self) -> bool:
        """True when the driver should fetch the map from a router before routing."""
        now = self.clock()
        if now - self._fetched < MIN_GAP_S:
            return False
        return self.stale or now - self._fetched > REFRESH_S

    def adopt(self, view: ClusterView | None) -> None:
        """The map a router answered (None: the fetch failed or the router has none yet)."""
        self._fetched = self.clock()
        if view is None:
            return
        if self.view is None or view.epoch >= self.view.epoch:
            self.view = view
        self.stale = False

    def target(self, call: Any) -> str | None:
        """The address of the primary that owns the call's session, or None: send it to a
        router (no map yet, not a session call, or that shard was unreachable a moment ago)."""
        view = self.view
        if view is None or call.method not in SESSION_METHODS:
            return None
        req = call.request
        shard = view.owner(req.namespace or "default", req.session_id)
        address = shard.primary
        if not address:
            return None
        if self._down.get(address, 0.0) > self.clock():
            return None
        self.direct_calls += 1
        return address

    def failed(self, address: str, exc: ShardstateError) -> bool:
        """An attempt at shard `address` failed: True when the call should go on through a
        router at once (the map is stale now); False when the error is the call's own."""
        if isinstance(exc, WrongShardError | NotPrimaryError):
            self.stale = True
            self.fallbacks += 1
            return True
        if isinstance(exc, UnavailableError):
            self._down[address] = self.clock() + DOWN_FOR_S
            self.stale = True
            self.fallbacks += 1
            return True
        return False
