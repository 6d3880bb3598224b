"""The manifests' processes form a working cluster: every pod of deploy/k8s (rendered for two
shard groups of a primary and one replica, and two routers) runs as a real process with exactly
its container's arguments, after what the kubelet and the cluster's DNS would do to them
(tests/deploy_pods.py: each pod on its own 127.B.C.n address, which stands for its DNS name).
The secure overlay's pods: tests/test_deploy_cluster_secure.py.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shardstate import Client
from shardstate.common.clustermap import ClusterView
from shardstate.v1 import admin_pb2, admin_pb2_grpc
from tests.deploy_pods import Pod, pods_of, running
from tests.deploy_support import PENDING_FLAGS, build, render_module
from tests.replicas import cluster_map, status, wait_converged, wait_for


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[Pod]]:
    render = render_module()
    assert render.main(["--out", str(tmp_path / "k8s"), "--shards", "2", "--replicas", "1", "--routers", "2"]) == 0
    pods = pods_of(build(tmp_path / "k8s"))
    with running(pods, tmp_path):
        yield pods


def test_the_manifests_processes_form_a_cluster(cluster: list[Pod]) -> None:
    shards = {p.name: p for p in cluster if p.kind == "shard"}
    routers = [p for p in cluster if p.kind == "router"]
    assert sorted(shards) == ["shardstate-s1-0", "shardstate-s1-1", "shardstate-s2-0", "shardstate-s2-1"]
    assert len(routers) == 2
    addr = {name: f"{p.host}:7401" for name, p in shards.items()}

    # pod 0 of each group is its primary, the other pod follows it by the name it was given
    for sid in ("s1", "s2"):
        primary, replica = status(addr[f"shardstate-{sid}-0"]), status(addr[f"shardstate-{sid}-1"])
        assert (primary.role, primary.shard_id) == (admin_pb2.PRIMARY, sid)
        assert (replica.role, replica.primary) == (admin_pb2.REPLICA, addr[f"shardstate-{sid}-0"])

    # the routers found every pod through the groups' Service names
    router_addrs = [f"{r.host}:7400" for r in routers]
    for ra in router_addrs:
        pb = cluster_map(ra)
        assert {(s.id, s.primary, tuple(s.replicas)) for s in pb.shards} == {
            (sid, addr[f"shardstate-{sid}-0"], (addr[f"shardstate-{sid}-1"],)) for sid in ("s1", "s2")
        }

    # put through one router, read back through the other
    sessions = [f"agent-{i}" for i in range(40)]
    with Client(router_addrs[0]) as a, Client(router_addrs[1]) as b:
        versions = {sid: a.session(sid).put("state", sid.encode()) for sid in sessions}
        for sid in sessions:
            rec = b.session(sid).get("state")
            assert rec is not None and (rec.value, rec.version) == (sid.encode(), versions[sid])

    # both groups hold some of the sessions, and each replica has what its primary has
    keys = 0
    for sid in ("s1", "s2"):
        p, r = addr[f"shardstate-{sid}-0"], addr[f"shardstate-{sid}-1"]
        wait_converged(p, r)
        held = status(p).keys
        assert held > 0
        wait_for(lambda p=p, r=r: status(r).keys == status(p).keys, f"{r} to hold {p}'s keys")
        keys += held
    assert keys == len(sessions)

    # failover: pod 0 dies, its replica is promoted; pod 0 restarted with the same arguments
    # (naming itself in --replica-of) follows the new primary instead of taking over again
    old, new = shards["shardstate-s1-0"], shards["shardstate-s1-1"]
    assert old.node is not None
    old.node.kill()
    with grpc.insecure_channel(router_addrs[0]) as ch:
        resp = admin_pb2_grpc.AdminStub(ch).PromoteReplica(admin_pb2.PromoteReplicaRequest(shard_id="s1"), timeout=60)
    assert resp.new_primary == addr[new.name]
    view = ClusterView.of(cluster_map(router_addrs[1]))
    on_s1 = next(sid for sid in sessions if view.owner("default", sid).id == "s1")
    old.node.start(wait=False)
    # Ready with no write on s1 since the promotion: the promoted primary's raised revision
    # reaches its replicas as an (empty) change-log entry.
    old.node.wait_ready()
    with Client(router_addrs[1]) as b:
        later = b.session(on_s1).put("after", b"failover")
        back = status(addr[old.name])
        assert (back.role, back.primary) == (admin_pb2.REPLICA, addr[new.name])
        for sid in sessions:
            rec = b.session(sid).get("state")
            assert rec is not None and (rec.value, rec.version) == (sid.encode(), versions[sid])
    assert later > versions[on_s1]
    wait_converged(addr[new.name], addr[old.name])


@pytest.mark.skipif(bool(PENDING_FLAGS), reason=f"this build has no {', '.join(sorted(PENDING_FLAGS))} yet")
def test_every_pod_serves_its_metrics_where_the_manifests_say(cluster: list[Pod]) -> None:
    for p in cluster:
        assert p.node is not None
        # --metrics-host 0.0.0.0 is the pod's address here; port 0 stands for 9100
        port = int(Path(f"{p.node.port_file}.metrics").read_text())
        with urllib.request.urlopen(f"http://{p.host}:{port}/metrics", timeout=30) as resp:
            body = resp.read().decode()
        assert resp.status == 200 and f"shardstate_{p.kind}_" in body, p.name
