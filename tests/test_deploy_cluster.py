"""The manifests' processes form a working cluster: every pod of deploy/k8s (rendered for two
shard groups of a primary and one replica, and two routers) runs as a real process with exactly
its container's arguments, after what the kubelet and the cluster's DNS would do to them:

- `$(POD_NAME)`, `$(POD_NAMESPACE)` expanded from the pod's downward-API env;
- each pod gets its own loopback address, 127.B.C.n with B.C chosen per run (Linux routes all
  of 127.0.0.0/8 to loopback), and its DNS name `pod.service.ns.svc.cluster.local` in the
  arguments is replaced by that address, `0.0.0.0` too (gRPC resolves those names itself);
- the Service names the routers seed with stay names, resolved through SHARDSTATE_HOSTS_FILE
  to every pod behind them, as a headless Service resolves (router/seeds.py);
- the volume's mount path is a temporary directory per pod.
Ports are the manifests' own (7401, 7400): the addresses are new each run.
"""

from __future__ import annotations

import random
import re
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from shardstate import Client
from shardstate.common.clustermap import ClusterView
from shardstate.router.seeds import HOSTS_FILE_ENV
from shardstate.server import launch
from shardstate.v1 import admin_pb2, admin_pb2_grpc
from tests.deploy_support import PENDING_FLAGS, build, container, of_kind, render_module
from tests.replicas import cluster_map, status, wait_converged, wait_for

NAMESPACE = "store"
DOMAIN = "svc.cluster.local"


@dataclass
class Pod:
    name: str
    workload: dict[str, Any]
    host: str
    dns: str = ""  # its stable name, for StatefulSet pods
    node: launch.Node | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return str(container(self.workload)["args"][0])


class PodProcess(launch.Node):
    """A node started with the pod's arguments as they are, on the pod's own address."""

    def __init__(self, pod: Pod, args: list[str], tmp: Path, hosts_file: Path) -> None:
        super().__init__(pod.kind, args, port_file=tmp / f"{pod.name}.port", log_path=tmp / f"{pod.name}.log",
                         name=pod.name, env={HOSTS_FILE_ENV: str(hosts_file)})
        self.host = pod.host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self, listen: str, extra: Any = ()) -> list[str]:
        return launch.shardstate_cmd(*self.args, "--port-file", str(self.port_file))


def loopback_base() -> str:
    """127.B.C, unused by anything listening on the manifests' ports."""
    for _ in range(50):
        base = f"127.{random.randrange(16, 250)}.{random.randrange(256)}"
        try:
            for port in (7400, 7401):
                with socket.socket() as s:
                    s.bind((f"{base}.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free loopback range")


def pods_of(docs: list[dict[str, Any]]) -> list[Pod]:
    base, pods = loopback_base(), []
    for w in of_kind(docs, "StatefulSet") + of_kind(docs, "Deployment"):
        for i in range(w["spec"]["replicas"]):
            name = f"{w['metadata']['name']}-{i}"
            dns = f"{name}.{w['spec']['serviceName']}.{NAMESPACE}.{DOMAIN}" if w["kind"] == "StatefulSet" else ""
            pods.append(Pod(name, w, f"{base}.{len(pods) + 1}", dns))
    return pods


def hosts_text(pods: list[Pod]) -> str:
    """Each pod's name, and each headless Service's name on a line per pod behind it."""
    lines = []
    for p in pods:
        if p.dns:
            service = p.dns.split(".", 1)[1]
            lines.append(f"{p.host} {p.dns} {service}")
    return "\n".join(lines) + "\n"


def kubelet_args(pod: Pod, pods: list[Pod], tmp: Path) -> list[str]:
    """The container's args as the process would get them in the pod, on this machine."""
    c = container(pod.workload)
    env = {"metadata.name": pod.name, "metadata.namespace": NAMESPACE}
    values = {e["name"]: env[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in c["env"]}
    by_dns = {p.dns: p.host for p in pods if p.dns}
    mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
    if mounts:
        (tmp / pod.name).mkdir()  # the volume, mounted

    def local(addr: str) -> str:
        host, _, port = addr.rpartition(":")
        return f"{pod.host if host == '0.0.0.0' else by_dns.get(host, host)}:{port}"

    out: list[str] = []
    for a in c["args"]:
        a = re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a)
        if a == "0.0.0.0":
            a = pod.host  # every address of the pod: here, its one
        if re.fullmatch(r"[\w.-]+:\d+(,[\w.-]+:\d+)*", a):
            a = ",".join(local(x) for x in a.split(","))
        for m in mounts:
            if a.startswith(m + "/"):
                a = str(tmp / pod.name) + a[len(m):]
        out.append(a)
    for flag in PENDING_FLAGS:  # not in this build yet (tests/deploy_support.py)
        if flag in out:
            i = out.index(flag)
            del out[i : i + 2]
    if "--metrics-port" in out:
        out[out.index("--metrics-port") + 1] = "0"  # 9100 on every pod would collide on one machine
    return out


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[Pod]]:
    render = render_module()
    assert render.main(["--out", str(tmp_path / "k8s"), "--shards", "2", "--replicas", "1", "--routers", "2"]) == 0
    pods = pods_of(build(tmp_path / "k8s"))
    hosts = tmp_path / "hosts"
    hosts.write_text(hosts_text(pods))
    for p in pods:
        p.node = PodProcess(p, kubelet_args(p, pods, tmp_path), tmp_path, hosts)
    try:
        # as the StatefulSets start them (OrderedReady): pod 0 of each group, then the next
        ordinals = sorted({int(p.name.rsplit("-", 1)[1]) for p in pods if p.dns})
        for n in ordinals:
            wave = [p.node for p in pods if p.dns and p.name.endswith(f"-{n}") and p.node]
            launch.wait_all([w.start(wait=False) for w in wave])
        launch.wait_all([p.node.start(wait=False) for p in pods if not p.dns and p.node])
        yield pods
    finally:
        for p in pods:
            if p.node is not None:
                p.node.stop(grace=10)


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
