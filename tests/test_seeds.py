"""Seeds by DNS (router/seeds.py): a name with several addresses stands for all of them; the
map a router builds from such seeds names each node as the node knows itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardstate.router import maps, seeds
from shardstate.v1 import admin_pb2


def hosts(tmp: Path, text: str) -> str:
    path = tmp / "hosts"
    path.write_text(text)
    return str(path)


def test_a_name_with_several_addresses_expands_to_all_of_them(tmp_path: Path) -> None:
    f = hosts(tmp_path, """
# a headless Service: one line per pod
127.0.5.1 shards.ns.svc.cluster.local
127.0.5.2 shards.ns.svc.cluster.local  s1-1.shards.ns.svc.cluster.local
127.0.5.3 Shards.NS.svc.cluster.local   # names are case-insensitive
127.0.5.1 shards.ns.svc.cluster.local   # listed twice: once
""")
    got = seeds.expand(["shards.ns.svc.cluster.local:7401", "s1-1.shards.ns.svc.cluster.local:7401",
                        "10.0.0.9:7401", "[::1]:7402"], hosts_file=f)
    assert got == ["127.0.5.1:7401", "127.0.5.2:7401", "127.0.5.3:7401",
                   "10.0.0.9:7401", "[::1]:7402"]  # the second name's one address is among them


def test_the_hosts_file_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(seeds.HOSTS_FILE_ENV, hosts(tmp_path, "127.0.6.1 a\n127.0.6.2 a\n"))
    assert seeds.expand(["a:1"]) == ["127.0.6.1:1", "127.0.6.2:1"]
    monkeypatch.delenv(seeds.HOSTS_FILE_ENV)
    assert seeds.expand(["a.invalid:1"]) == ["a.invalid:1"]


def test_names_dns_cannot_resolve_yet_or_with_one_address_are_kept(tmp_path: Path) -> None:
    # pods not created yet: bootstrap keeps waiting on the name, it is not dropped
    assert seeds.expand(["nothing-here.invalid:7401"], hosts_file="") == ["nothing-here.invalid:7401"]
    # localhost is one node: one address family, so one address, so the name stays
    assert seeds.resolve("localhost") == ["127.0.0.1"]
    assert seeds.expand(["localhost:7401"], hosts_file="") == ["localhost:7401"]
    # a name in the hosts file is replaced even with one address: gRPC does not read that file
    assert seeds.expand(["one:7401"], hosts_file=hosts(tmp_path, "127.0.7.1 one\n")) == ["127.0.7.1:7401"]


def test_ipv6_addresses_are_used_when_a_name_has_no_ipv4(tmp_path: Path) -> None:
    f = hosts(tmp_path, "fd00::1 v6\nfd00::2 v6\n127.0.8.1 both\nfd00::3 both\n")
    assert seeds.expand(["v6:7401", "both:7401"], hosts_file=f) == ["[fd00::1]:7401", "[fd00::2]:7401", "127.0.8.1:7401"]
    assert seeds.split("[fd00::1]:7401") == ("fd00::1", "7401")


def test_bootstrap_names_each_node_by_its_own_address_not_the_seed_ip() -> None:
    def st(seed: str, own: str, sid: str, role: int) -> tuple[str, admin_pb2.StatusResponse]:
        return seed, admin_pb2.StatusResponse(nodes=[admin_pb2.NodeStatus(address=own, shard_id=sid, role=role)])  # type: ignore[arg-type]

    pb = maps.bootstrap_map([
        st("10.1.0.7:7401", "shardstate-s1-0.shardstate-s1.ns.svc.cluster.local:7401", "s1", admin_pb2.PRIMARY),
        st("10.1.0.8:7401", "shardstate-s1-1.shardstate-s1.ns.svc.cluster.local:7401", "s1", admin_pb2.REPLICA),
    ], cluster_id="c")
    (s1,) = pb.shards
    # the primary recognises itself in the map (a seed IP would make it follow "another" node)
    assert s1.primary == "shardstate-s1-0.shardstate-s1.ns.svc.cluster.local:7401"
    assert list(s1.replicas) == ["shardstate-s1-1.shardstate-s1.ns.svc.cluster.local:7401"]
