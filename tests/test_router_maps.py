"""The router's cluster map against real shards: bootstrap from seeds or a cluster file,
restart keeps the map, and a router holding an older map than the shards follows WrongShard
to the new owner without the caller seeing an error.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from shardstate.common.clustermap import ClusterView
from shardstate.v1 import admin_pb2, state_pb2
from tests.procs import Procs
from tests.routercluster import RouterCluster, T, owners_by_reading_shards
from tests.stubs import expect_error, uid

NO_PERIODIC_REFRESH = ("--refresh-interval-s", "3600")


def new_map(old: admin_pb2.ClusterMap, **weights: int) -> admin_pb2.ClusterMap:
    pb = admin_pb2.ClusterMap()
    pb.CopyFrom(old)
    pb.epoch = old.epoch + 1
    for s in pb.shards:
        if s.id in weights:
            s.weight = weights[s.id]
    return pb


def moved_sessions(old: ClusterView, new: ClusterView, n: int, prefix: str,
                   src: str = "", dst: str = "") -> list[str]:
    """n fresh session ids whose owner differs between the two maps (from src, to dst)."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        sid = f"{prefix}-{i}"
        a, b = old.owner("", sid).id, new.owner("", sid).id
        if a != b and (not src or a == src) and (not dst or b == dst):
            out.append(sid)
        i += 1
    return out


def test_bootstrap_publishes_epoch_1_to_every_shard(procs: Procs) -> None:
    c = RouterCluster(procs, shards=3, routers=2)
    try:
        maps = [c.stub(s).admin.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T) for s in c.shards]
        assert all(m == maps[0] for m in maps)
        assert maps[0].epoch == 1
        assert {(s.id, s.primary, s.weight, s.state) for s in maps[0].shards} == {
            (p.args[1], p.address, 1, admin_pb2.ACTIVE) for p in c.shards
        }
        for r in c.routers:
            assert c.stub(r).admin.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T) == maps[0]
    finally:
        c.close()


def test_stale_router_follows_wrong_shard_after_a_weight_change_via_another_router(procs: Procs) -> None:
    c = RouterCluster(procs, shards=3, routers=2, router_args=NO_PERIODIC_REFRESH)
    try:
        stale, fresh = c.stub(c.routers[0]), c.stub(c.routers[1])
        old = stale.view()
        pb = new_map(old.pb, s1=3)
        resp = fresh.admin.PublishClusterMap(pb, timeout=T)
        assert resp.adopted and resp.epoch == pb.epoch
        for s in c.shards:  # the router forwarded it to every shard
            assert c.stub(s).view().epoch == pb.epoch
        assert stale.view().epoch == old.epoch  # no periodic refresh: it still holds the old map

        new = ClusterView.of(pb)
        sids = moved_sessions(old, new, 60, uid("moved"))
        for i, sid in enumerate(sids):
            assert stale.put(sid, "k", b"%d" % i).applied  # no error surfaces
        assert stale.view().epoch == pb.epoch
        found = owners_by_reading_shards(c, sids, "k")
        assert all(found[s] == [new.owner("", s).id] for s in sids)
        for i, sid in enumerate(sids):
            assert fresh.get(sid, "k").record.value == b"%d" % i
    finally:
        c.close()


def test_stale_router_batch_and_list_follow_a_new_shard_published_to_the_shards(procs: Procs) -> None:
    c = RouterCluster(procs, shards=3, routers=1, router_args=NO_PERIODIC_REFRESH)
    try:
        r = c.stub(c.routers[0])
        old = r.view()
        s4 = procs.shard("s4")
        c.shards.append(s4)
        pb = new_map(old.pb)
        pb.shards.add(id="s4", weight=1, primary=s4.address, state=admin_pb2.ACTIVE)
        for s in c.shards:  # published straight to the shards, behind the router's back
            assert c.stub(s).admin.PublishClusterMap(pb, timeout=T).adopted
        new = ClusterView.of(pb)
        sids = moved_sessions(old, new, 40, uid("four"))
        assert {new.owner("", s).id for s in sids} == {"s4"}
        batch = [state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=s, key="k", value=s.encode())) for s in sids]
        batch += [state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=uid("stay"), key="k", value=b"v"))
                  for _ in range(20)]
        res = r.state.Batch(state_pb2.BatchRequest(ops=batch), timeout=T).results
        assert [x.code for x in res] == [0] * len(batch), [x.message for x in res if x.code]
        assert all(x.put.applied for x in res)
        assert [x.put.header.shard_id for x in res[: len(sids)]] == ["s4"] * len(sids)
        found = owners_by_reading_shards(c, sids, "k")
        assert all(found[s] == ["s4"] for s in sids)
        listed = [s for p in r.list_all(limit=7) for s in p]
        assert sorted(sids) == [s for s in listed if s in set(sids)]
        assert len(listed) == len(set(listed))
    finally:
        c.close()


def test_router_pushes_its_map_to_a_shard_that_is_behind(procs: Procs) -> None:
    c = RouterCluster(procs, shards=3, routers=1, router_args=NO_PERIODIC_REFRESH)
    try:
        r = c.stub(c.routers[0])
        old = r.view()
        pb = new_map(old.pb, s2=4)
        # Only s1 learns of epoch 2; the router, s2 and s3 still hold epoch 1. A session that
        # moves s1 -> s2 is refused by s1 (WrongShard at epoch 2); the router adopts epoch 2,
        # offers it to s2 and s3 (behind it), and the retry on s2 is accepted.
        assert c.shard_stub("s1").admin.PublishClusterMap(pb, timeout=T).adopted
        new = ClusterView.of(pb)
        sids = moved_sessions(old, new, 30, uid("behind"), src="s1", dst="s2")
        for sid in sids:
            assert r.put(sid, "k", b"v").applied
        assert r.view().epoch == pb.epoch
        for s in c.shards:
            assert c.stub(s).view().epoch == pb.epoch
        found = owners_by_reading_shards(c, sids, "k")
        assert all(found[s] == ["s2"] for s in sids)
    finally:
        c.close()


def test_router_bootstraps_from_a_cluster_file(procs: Procs, tmp_path: Path) -> None:
    shards = [procs.shard(f"s{i}") for i in (1, 2)]
    f = tmp_path / "cluster.toml"
    f.write_text(
        'epoch = 3\ncluster_id = "test"\n'
        + "".join(f'[[shards]]\nid = "s{i}"\nprimary = "{s.address}"\nweight = {i}\n' for i, s in enumerate(shards, 1))
    )
    router = procs.router([], "--cluster", str(f))
    c = RouterCluster.__new__(RouterCluster)
    c.procs, c.shards, c.routers, c.stubs = procs, shards, [router], {}
    try:
        r = c.stub(router)
        view = r.view()
        assert view.epoch == 3 and view.pb.cluster_id == "test"
        assert [(s.id, s.weight) for s in view.pb.shards] == [("s1", 1), ("s2", 2)]
        for s in shards:
            assert c.stub(s).view().epoch == 3
        sids = [uid("file") for _ in range(40)]
        for sid in sids:
            r.put(sid, "k", b"v")
        found = owners_by_reading_shards(c, sids, "k")
        assert all(found[s] == [view.owner("", s).id] for s in sids)
    finally:
        c.close()


def test_router_restart_adopts_the_persisted_map(procs: Procs) -> None:
    c = RouterCluster(procs, shards=3, routers=1)
    try:
        r = c.stub(c.routers[0])
        pb = new_map(r.view().pb, s3=2)
        r.admin.PublishClusterMap(pb, timeout=T)
        sid = uid("persist")
        r.put(sid, "k", b"kept")
        c.close()
        assert c.routers[0].terminate() == 0
        for s in c.shards:
            assert s.terminate() == 0
            s.start()
        router2 = c.start_router()
        r2 = c.stub(router2)
        assert r2.view().pb == pb
        assert r2.get(sid, "k").record.value == b"kept"
    finally:
        c.close()


def test_publishing_an_invalid_or_older_map_to_the_router(procs: Procs) -> None:
    c = RouterCluster(procs, shards=2, routers=1)
    try:
        r = c.stub(c.routers[0])
        cur = r.view().pb
        older = admin_pb2.ClusterMap()
        older.CopyFrom(cur)
        resp = r.admin.PublishClusterMap(older, timeout=T)
        assert not resp.adopted and resp.epoch == cur.epoch
        bad = new_map(cur)
        bad.shards.add(id="s1", primary="127.0.0.1:1")
        exc = expect_error(grpc.StatusCode.INVALID_ARGUMENT, r.admin.PublishClusterMap, bad, timeout=T)
        assert "s1" in exc.message
        assert r.view().pb == cur
    finally:
        c.close()
