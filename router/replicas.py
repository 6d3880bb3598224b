"""Reads a replica may serve (docs/design.md §5) and which replica serves them: `EVENTUAL` reads and
reads with `min_revision` go to the shard's replicas round-robin; a replica that failed one is
skipped for a while, and the read falls back to the primary. Unary reads (forward.py) and the
read ops of a Batch / Pipeline (batching.py) both go through here.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import Any

import grpc

from shardstate.common.clustermap import ClusterView
from shardstate.router.shardlink import ShardLinks, SubBatchError
from shardstate.router.wire import redirect_of
from shardstate.v1 import admin_pb2, state_pb2, types_pb2

READS: dict[str, Any] = {
    "Get": state_pb2.GetRequest,
    "Scan": state_pb2.ScanRequest,
    "ReadLog": state_pb2.ReadLogRequest,
    "GetSession": state_pb2.GetSessionRequest,
}
DOWN_FOR_S = 1.0


def relaxed_read(method: str, request: bytes) -> bool:
    """True when the encoded request is a read that does not need the primary."""
    cls = READS.get(method)
    if cls is None:
        return False
    try:
        req = cls.FromString(request)
    except Exception:
        return False  # the primary names what is wrong with it
    if req.consistency == types_pb2.EVENTUAL:
        return True
    return bool(req.min_revision) and req.consistency != types_pb2.STRONG


class ReplicaPicker:
    def __init__(self) -> None:
        self._turn = itertools.count()
        self._down: dict[str, float] = {}

    def pick(self, shard: admin_pb2.ShardInfo) -> str | None:
        reps = list(shard.replicas)
        if not reps:
            return None
        now = time.monotonic()
        start = next(self._turn)
        for i in range(len(reps)):
            a = reps[(start + i) % len(reps)]
            if self._down.get(a, 0.0) <= now:
                return a
        return None

    def failed(self, address: str) -> None:
        self._down[address] = time.monotonic() + DOWN_FOR_S


# ---- relaxed reads inside a Batch / Pipeline ----

# First byte of an encoded BatchOp whose op is a read (field 1 get, 6 read_log, 8 scan,
# 10 get_session; wire type 2): only those are parsed to look at their consistency.
_READ_TAGS = {0x0A: "get", 0x32: "read_log", 0x42: "scan", 0x52: "get_session"}


def replica_reads(view: ClusterView, ops: Sequence[bytes], picker: ReplicaPicker) -> dict[int, str]:
    """Index of each op a replica may serve -> the replica chosen for it."""
    out: dict[int, str] = {}
    for i, op in enumerate(ops):
        kind = _READ_TAGS.get(op[0]) if op else None
        if kind is None:
            continue
        try:
            inner = getattr(state_pb2.BatchOp.FromString(op), kind)
        except Exception:
            continue
        if not (inner.consistency == types_pb2.EVENTUAL
                or (inner.min_revision and inner.consistency != types_pb2.STRONG)):
            continue
        shard = view.owner(inner.namespace or "default", inner.session_id)
        address = picker.pick(shard)
        if address is not None:
            out[i] = address
    return out


async def from_replicas(links: ShardLinks, picker: ReplicaPicker, ops: Sequence[bytes],
                        chosen: dict[int, str], deadline: float,
                        share: int = 0) -> tuple[dict[int, bytes], list[int]]:
    """Send the chosen ops to their replicas (one sub-batch per replica, each with `share`
    bytes of answer budget, 0 = the links' default). Returns the results they served, and the
    ops to ask the primary instead (replica down, behind, or redirected)."""
    by_replica: dict[str, list[int]] = {}
    for i, address in chosen.items():
        by_replica.setdefault(address, []).append(i)

    async def one(address: str, idx: list[int]) -> tuple[dict[int, bytes], list[int]]:
        try:
            _, results = await links.batch(address, [ops[i] for i in idx], deadline, share)
        except SubBatchError as e:
            if e.code == grpc.StatusCode.UNAVAILABLE:
                picker.failed(address)
            return {}, idx
        if len(results) != len(idx):
            return {}, idx
        served: dict[int, bytes] = {}
        again: list[int] = []
        for i, r in zip(idx, results, strict=True):
            if redirect_of(r) is None:
                served[i] = r
            else:
                again.append(i)
        return served, again

    served: dict[int, bytes] = {}
    leftover: list[int] = []
    for s, again in await asyncio.gather(*(one(a, idx) for a, idx in by_replica.items())):
        served.update(s)
        leftover += again
    return served, sorted(leftover)
