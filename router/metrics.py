"""The router's per-call figures: calls by RPC and status, their end-to-end latency, the ops
per Batch, open Watch streams. Label values are bound once per RPC (`RpcCells`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from shardstate.common import errors
from shardstate.common.metrics import SIZE_BUCKETS, BoundCounter, HistogramCell, Registry
from shardstate.router.forward import Relay

if TYPE_CHECKING:
    from shardstate.router.rebalance import Rebalancer


def code_of(exc: BaseException) -> str:
    """The gRPC status name the caller sees for `exc` (what `forward.fail` sends)."""
    if isinstance(exc, Relay):
        return str(exc.err.code().name)
    return errors.as_shardstate_error(exc).code.name


class RpcCells:
    __slots__ = ("latency", "ok")

    def __init__(self, ok: BoundCounter, latency: HistogramCell) -> None:
        self.ok = ok
        self.latency = latency


class RouterMetrics:
    def __init__(self, registry: Registry) -> None:
        self.calls = registry.counter("shardstate_router_calls_total",
                                      "client calls the router has served (a Batch or a Pipeline request counts one)")
        self.requests = registry.counter("shardstate_router_requests_total",
                                         "client calls by RPC and the gRPC status they got", ("rpc", "code"))
        self.latency = registry.histogram("shardstate_router_request_duration_seconds",
                                          "end-to-end time of a client call in the router "
                                          "(streams: until the first message)", ("rpc",))
        self.batch_ops = registry.histogram("shardstate_router_batch_ops",
                                            "ops per client Batch or Pipeline request",
                                            buckets=SIZE_BUCKETS).child()
        self.watches = registry.gauge("shardstate_router_watch_streams", "open Watch streams")
        self._cells: dict[str, RpcCells] = {}

    def cells(self, rpc: str) -> RpcCells:
        c = self._cells.get(rpc)
        if c is None:
            c = self._cells[rpc] = RpcCells(self.requests.child(rpc=rpc, code="OK"), self.latency.child(rpc=rpc))
        return c

    def done(self, rpc: str, t0: float) -> None:
        c = self._cells.get(rpc) or self.cells(rpc)
        c.latency.observe(time.perf_counter() - t0)
        c.ok.inc()

    def failed(self, rpc: str, exc: BaseException, t0: float) -> None:
        self.cells(rpc).latency.observe(time.perf_counter() - t0)
        self.requests.inc(rpc=rpc, code=code_of(exc))


def rebalance_gauges(registry: Registry, rebalancer: Rebalancer) -> None:
    """The rebalance this router drives or follows (zeros when none runs): its sessions to move,
    moved so far and bytes moved, summed over its pairs; 1 while one runs."""
    def figure(name: str) -> float:
        return float(getattr(rebalancer.summary(), name))

    registry.gauge("shardstate_router_rebalance_running", "1 while a rebalance this router drives runs",
                   fn=lambda: 0.0 if rebalancer.phase in ("idle", "done") else 1.0)
    registry.gauge("shardstate_router_rebalance_sessions", "sessions the running rebalance moves",
                   fn=lambda: figure("sessions_total"))
    registry.gauge("shardstate_router_rebalance_sessions_moved", "sessions the running rebalance moved so far",
                   fn=lambda: figure("sessions_moved"))
    registry.gauge("shardstate_router_rebalance_moved_bytes", "bytes the running rebalance moved so far",
                   fn=lambda: figure("bytes_moved"))
