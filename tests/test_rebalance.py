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


def ideal(view: ClusterView) -> dict[str, float]:
    total = sum((s.weight or 1) for s in view.pb.shards)
    return {s.id: (s.weight or 1) / total for s in view.pb.shards}


def test_add_a_fourth_then_remove_one(procs: Procs) -> None:
    c = Cluster(procs, shards=3)
    load = Load([r.address for r in c.routers]).start()
    try:
        load.wait_ops(1500)
        v3 = c.view()
        s4 = c.new_shard("s4")
        out = admin(c.routers[0], "add-shard", "s4", s4.address)
        assert out.returncode == 0, out.stderr
        assert "add-shard s4:" in out.stdout and "moved" in out.stdout, out.stdout
        v4 = c.view()
        assert 0.18 <= moved_fraction(v3, v4, load.sids) <= 0.32
        load.wait_ops(1000)
        out = admin(c.routers[0], "remove-shard", "s2", "--json")
        assert out.returncode == 0, out.stderr
        after = c.view()
        assert [s.id for s in after.pb.shards] == ["s1", "s3", "s4"]
        owned_by_s2 = [s for s in load.sids if v4.owner("default", s).id == "s2"]
        assert owned_by_s2 and all(after.owner("default", s).id != "s2" for s in owned_by_s2)
        got, want = shares(after, load.sids), ideal(after)
        assert all(abs(got[k] - want[k]) <= 0.05 for k in want), (got, want)
        load.wait_ops(500)
        c.shards["s2"].terminate()  # the removed shard's processes can go; the cluster serves on
        load.wait_ops(1000)
    finally:
        load.stop()
    load.check()
    del c.shards["s2"]
    settle_one_copy(c, load)


def test_reweight_a_shard(procs: Procs) -> None:
    c = Cluster(procs, shards=3)
    load = Load([r.address for r in c.routers]).start()
    try:
        load.wait_ops(1500)
        before = shares(c.view(), load.sids)
        out = admin(c.routers[0], "set-weight", "s1", "2", "--json")
        assert out.returncode == 0, out.stderr
        load.wait_ops(1000)
    finally:
        load.stop()
    after = c.view()
    assert {s.id: s.weight for s in after.pb.shards} == {"s1": 2, "s2": 1, "s3": 1}
    got = shares(after, load.sids)
    assert abs(got["s1"] - 0.5) <= 0.05 and got["s1"] > 1.3 * before["s1"], (before, got)
    load.check()
    settle_one_copy(c, load)


def test_two_add_shard_calls_at_once(procs: Procs) -> None:
    c = Cluster(procs, shards=2, routers=2)
    a, b = c.new_shard("s3"), c.new_shard("s4")
    calls = [subprocess.Popen([*launch.shardstate_cmd("admin", "--router", r.address), "add-shard", sid, p.address, "--no-wait"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, sid, p in ((c.routers[0], "s3", a), (c.routers[1], "s4", b))]
    results = [(p.wait(60), *p.communicate()) for p in calls]
    ok = [r for r in results if r[0] == 0]
    failed = [r for r in results if r[0] != 0]
    assert len(ok) == 1 and len(failed) == 1, results
    assert "a rebalance is already running: add-shard" in failed[0][2], failed[0][2]
    out = admin(c.routers[0], "rebalance-status", "--json")
    assert out.returncode == 0, out.stderr
    maps = []
    for p in [*c.shards.values(), *c.routers]:
        st = Stubs(p.address)
        maps.append(st.admin.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T))
        st.close()
    joined = maps[0]
    assert len(joined.shards) == 3 and not joined.migrations
    loser = "s4" if any(s.id == "s3" for s in joined.shards) else "s3"
    wait_until(lambda: all(m == joined for m in [*maps[:2], c.stub.admin.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T)]))
    assert all(s.id != loser for s in joined.shards)


@pytest.mark.parametrize("args, code, words", [
    (["remove-shard", "s9"], "NOT_FOUND", "no shard 's9'"),
    (["set-weight", "s1", "0"], "INVALID_ARGUMENT", "weight must be between 1 and 64"),
    (["set-weight", "s1", "65"], "INVALID_ARGUMENT", "weight must be between 1 and 64"),
    (["set-weight", "s1", "1"], "FAILED_PRECONDITION", "already has weight 1"),
    (["add-shard", "s1", "127.0.0.1:1"], "ALREADY_EXISTS", "shard 's1' is already in the cluster map"),
    (["add-shard", "s5", "127.0.0.1:1"], "UNAVAILABLE", "does not answer"),
])
def test_bad_admin_input_changes_nothing(procs: Procs, args: list[str], code: str, words: str) -> None:
    c = Cluster(procs, shards=1)
    before = c.view().pb
    out = admin(c.routers[0], *args)
    assert out.returncode != 0 and code in out.stderr and words in out.stderr, out.stderr
    assert c.view().pb == before


def test_bad_admin_input_needing_a_cluster(procs: Procs) -> None:
    c = Cluster(procs, shards=2)
    before = c.view().pb
    out = admin(c.routers[0], "add-shard", "s3", c.shards["s2"].address)  # not a fresh shard: s2 itself
    assert out.returncode != 0 and "already serves shard 's2'" in out.stderr, out.stderr
    used = c.new_shard("s3")
    Stubs(used.address).put("x", "k", b"v")  # it holds data: not fresh
    out = admin(c.routers[0], "add-shard", "s3", used.address)
    assert out.returncode != 0 and "not a fresh shard" in out.stderr, out.stderr
    out = admin(c.routers[0], "remove-shard", "s1")
    assert out.returncode == 0, out.stderr
    out = admin(c.routers[0], "remove-shard", "s2")
    assert out.returncode != 0 and "is the last shard" in out.stderr, out.stderr
    assert [s.id for s in c.view().pb.shards] == ["s2"] and c.view().pb.epoch > before.epoch


def test_a_watch_on_a_moving_session_continues_on_the_new_owner(cluster2: Cluster) -> None:
    """Writes to sessions that move keep coming while s3 joins; a Watch opened through the
    router before the move sees every one of them once, in order, with rising revisions."""
    import threading

    from shardstate.common.ring import Ring
    from shardstate.v1 import state_pb2

    c = cluster2
    target = Ring({"s1": 1, "s2": 1, "s3": 1})
    movers = [f"watched-{i}" for i in range(200) if target.owner("default", f"watched-{i}") == "s3"][:3]
    assert len(movers) == 3
    seen: dict[str, list[tuple[int, bytes]]] = {sid: [] for sid in movers}
    calls = []
    for sid in movers:
        c.stub.put(sid, "w", b"0")
        call = c.stub.state.Watch(state_pb2.WatchRequest(session_id=sid, prefix="w"), timeout=120)
        calls.append(call)

        def read(call: object = call, sid: str = sid) -> None:
            for resp in call:  # type: ignore[attr-defined]
                seen[sid].extend((e.revision, e.record.value) for e in resp.events)
                if seen[sid] and seen[sid][-1][1] == b"end":
                    return

        threading.Thread(target=read, daemon=True).start()
    s3 = c.new_shard("s3")
    mover = subprocess.Popen([*launch.shardstate_cmd("admin", "--router", c.routers[0].address),
                              "add-shard", "s3", s3.address, "--json"], stdout=subprocess.PIPE, text=True)
    i, after = 0, 20
    while after:  # writes before, during and after the move
        if mover.poll() is not None:
            after -= 1
        i += 1
        for sid in movers:
            assert c.stub.put(sid, "w", str(i).encode()).applied
    assert mover.returncode == 0
    n = i
    for sid in movers:
        assert c.stub.put(sid, "w", b"end").applied
    assert all(c.view().owner("default", sid).id == "s3" for sid in movers)
    wait_until(lambda: all(seen[sid] and seen[sid][-1][1] == b"end" for sid in movers), timeout=60)
    assert n > 20
    for sid in movers:
        values = [v for _, v in seen[sid]][:-1]
        revs = [r for r, _ in seen[sid]]
        assert values == [str(i).encode() for i in range(1, n + 1)], (sid, values[:5], len(values))
        assert revs == sorted(set(revs))
    for call in calls:
        call.cancel()
