"""Online rebalancing with real processes under load (docs/design.md §6.4): add, remove and
reweight shards while 16 asyncio clients run CAS-increment loops and appends over 2 000
sessions; afterwards every acknowledged write is there exactly once, the callers saw no error,
the shares moved are within the issue's bounds and every session lives on exactly one shard."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from shardstate.common.clustermap import ClusterView
from shardstate.server import launch
from shardstate.v1 import admin_pb2, admin_pb2_grpc
from tests.procs import Proc, Procs
from tests.rebalance_load import Load
from tests.routercluster import Stubs
from tests.stubs import wait_until

T = 30.0
SHARD_ARGS = ("--moved-data-grace-s", "1")


def admin(router: Proc, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*launch.shardstate_cmd("admin", "--router", router.address), *args],
                          capture_output=True, text=True, timeout=timeout)


class Cluster:
    def __init__(self, procs: Procs, shards: int, routers: int = 1, shard_args: tuple[str, ...] = SHARD_ARGS) -> None:
        self.procs = procs
        self.shard_args = shard_args
        self.shards: dict[str, Proc] = {f"s{i}": procs.shard(f"s{i}", *shard_args) for i in range(1, shards + 1)}
        seeds = [p.address for p in self.shards.values()]
        self.routers = [procs.router(seeds) for _ in range(routers)]
        self.stub = Stubs(self.routers[0].address)

    def new_shard(self, sid: str) -> Proc:
        p = self.shards[sid] = self.procs.shard(sid, *self.shard_args)
        return p

    def view(self) -> ClusterView:
        return self.stub.view()

    def status(self) -> admin_pb2.StatusResponse:
        return admin_pb2_grpc.AdminStub(self.stub.channel).Status(admin_pb2.StatusRequest(), timeout=T)

    def stored_sessions(self, ids: list[str]) -> dict[str, int]:
        """Sessions each shard's primary holds on disk (owned or not)."""
        out = {}
        for sid in ids:
            st = Stubs(self.shards[sid].address)
            try:
                out[sid] = st.admin.Status(admin_pb2.StatusRequest(), timeout=T).nodes[0].sessions
            finally:
                st.close()
        return out


def shares(view: ClusterView, sids: list[str]) -> dict[str, float]:
    counts: dict[str, int] = {s.id: 0 for s in view.pb.shards}
    for sid in sids:
        counts[view.owner("default", sid).id] += 1
    return {k: v / len(sids) for k, v in counts.items()}


def moved_fraction(before: ClusterView, after: ClusterView, sids: list[str]) -> float:
    return sum(1 for s in sids if before.owner("default", s).id != after.owner("default", s).id) / len(sids)


def settle_one_copy(c: Cluster, load: Load) -> None:
    """After the grace period every session is stored by exactly one shard (each written
    session is read back through its owner by load.check, so the sum says no other has it)."""
    ids = [s.id for s in c.view().pb.shards]
    written = len(load.written())
    wait_until(lambda: sum(c.stored_sessions(ids).values()) == written, timeout=60)


@pytest.fixture
def cluster2(procs: Procs) -> Iterator[Cluster]:
    c = Cluster(procs, shards=2)
    yield c
    c.stub.close()


def test_add_a_third_shard_under_load(cluster2: Cluster) -> None:
    c = cluster2
    load = Load([r.address for r in c.routers]).start()
    try:
        load.wait_ops(2000)
        before = c.view()
        s3 = c.new_shard("s3")
        out = admin(c.routers[0], "add-shard", "s3", s3.address, "--json")
        assert out.returncode == 0, out.stderr
        last = json.loads(out.stdout.strip().splitlines()[-1])
        assert last.get("done") and last.get("phase") == "done", last
        load.wait_ops(1000)
    finally:
        load.stop()
    after = c.view()
    assert [s.id for s in after.pb.shards] == ["s1", "s2", "s3"] and not after.pb.migrations
    assert all(s.state == admin_pb2.ACTIVE for s in after.pb.shards)
    moved = moved_fraction(before, after, load.sids)
    assert 0.25 <= moved <= 0.42, moved
    assert {before.owner("default", s).id for s in load.sids if before.owner("default", s).id != after.owner("default", s).id} <= {"s1", "s2"}
    load.check()
    settle_one_copy(c, load)
