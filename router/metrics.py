"""The router's per-call figures: calls by RPC and status, their end-to-end latency, the ops
per Batch, open Watch streams. Label values are bound once per RPC (`RpcCells`)."""

from __future__ import annotations

import time

from shardstate.common import errors
from shardstate.common.metrics import SIZE_BUCKETS, BoundCounter, HistogramCell, Registry
from shardstate.router.forward import Relay


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
        self.requests = registry.counter("shardstate_router_requests_total",
                                         "client calls by RPC and the gRPC status they got", ("rpc", "code"))
        self.latency = registry.histogram("shardstate_router_request_duration_seconds",
                                          "end-to-end time of a client call in the router "
                                          "(streams: until the first message)", ("rpc",))
        self.batch_ops = registry.histogram("shardstate_router_batch_ops", "ops per client Batch",
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
