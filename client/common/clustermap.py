"""The cluster map as every process sees it: which shards exist, their addresses and weights.

Wraps the `ClusterMap` protobuf with the ring built once per epoch, the owner lookup, and
loading from a TOML cluster file. The highest epoch wins everywhere.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from shardstate.common.errors import InvalidArgumentError
from shardstate.common.ring import Ring
from shardstate.v1 import admin_pb2


def node_addresses(pb: admin_pb2.ClusterMap) -> list[str]:
    """Every primary and replica address the map names, primaries first, no duplicates."""
    out: list[str] = []
    for s in pb.shards:
        for a in [s.primary, *s.replicas]:
            if a and a not in out:
                out.append(a)
    return out


@dataclass(frozen=True)
class ClusterView:
    """An immutable cluster map plus its ring. Replace the whole view on a new epoch."""

    pb: admin_pb2.ClusterMap
    ring: Ring

    @classmethod
    def of(cls, pb: admin_pb2.ClusterMap) -> ClusterView:
        weights = {
            s.id: (s.weight or 1)
            for s in pb.shards
            if s.state != admin_pb2.JOINING
        }
        return cls(pb, Ring(weights))

    @property
    def epoch(self) -> int:
        return int(self.pb.epoch)

    def shard(self, shard_id: str) -> admin_pb2.ShardInfo | None:
        for s in self.pb.shards:
            if s.id == shard_id:
                return s
        return None

    def owner(self, namespace: str, session_id: str) -> admin_pb2.ShardInfo:
        sid = self.ring.owner(namespace, session_id)
        shard = self.shard(sid)
        assert shard is not None  # the ring is built from the same shards
        return shard

    def shard_of_address(self, address: str) -> admin_pb2.ShardInfo | None:
        for s in self.pb.shards:
            if s.primary == address or address in s.replicas:
                return s
        return None

    def newer_than(self, other: ClusterView | None) -> bool:
        return other is None or self.epoch > other.epoch


def empty_view() -> ClusterView:
    return ClusterView.of(admin_pb2.ClusterMap())


def load_cluster_file(path: str | Path) -> admin_pb2.ClusterMap:
    """Read a TOML cluster file:

        epoch = 1
        [[shards]]
        id = "s1"
        primary = "127.0.0.1:7401"
        replicas = ["127.0.0.1:7411"]
        weight = 1
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgumentError(f"cannot read cluster file {path}: {e}") from e
    pb = admin_pb2.ClusterMap(epoch=int(data.get("epoch", 1)), cluster_id=str(data.get("cluster_id", "")))
    seen: set[str] = set()
    for i, s in enumerate(data.get("shards", [])):
        if "id" not in s or "primary" not in s:
            raise InvalidArgumentError(f"{path}: shards[{i}] needs 'id' and 'primary'")
        if s["id"] in seen:
            raise InvalidArgumentError(f"{path}: shard id {s['id']!r} appears twice")
        seen.add(s["id"])
        pb.shards.add(
            id=str(s["id"]), primary=str(s["primary"]), replicas=[str(r) for r in s.get("replicas", [])],
            weight=int(s.get("weight", 1)), state=admin_pb2.ACTIVE,
        )
    return pb
