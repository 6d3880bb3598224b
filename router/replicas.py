"""Reads a replica may serve (DESIGN §5) and which replica serves them: `EVENTUAL` reads and
reads with `min_revision` go to the shard's replicas round-robin; a replica that failed one is
skipped for a while, and the read falls back to the primary.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

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
