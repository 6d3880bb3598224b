"""Unit tests of the pure cluster-map and config logic: views, owners, cluster files, flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from shardstate.common import config
from shardstate.common.clustermap import ClusterView, empty_view, load_cluster_file
from shardstate.common.errors import InvalidArgumentError
from shardstate.common.ring import Ring
from shardstate.router.config import RouterConfig
from shardstate.v1 import admin_pb2


def cmap(epoch: int = 1) -> admin_pb2.ClusterMap:
    pb = admin_pb2.ClusterMap(epoch=epoch)
    pb.shards.add(id="s1", primary="h:1", replicas=["h:11"], weight=1, state=admin_pb2.ACTIVE)
    pb.shards.add(id="s2", primary="h:2", weight=2, state=admin_pb2.ACTIVE)
    pb.shards.add(id="s3", primary="h:3", weight=0, state=admin_pb2.ACTIVE)
    return pb


def test_view_owner_matches_the_ring_over_ids_with_weights() -> None:
    view = ClusterView.of(cmap())
    ring = Ring({"s1": 1, "s2": 2, "s3": 1})  # weight 0 reads as 1
    for i in range(500):
        sid = f"a{i}"
        assert view.owner("default", sid).id == ring.owner("default", sid)
        assert view.owner("", sid).id == view.owner("default", sid).id


def test_joining_shards_own_nothing_yet() -> None:
    pb = cmap()
    pb.shards.add(id="s4", primary="h:4", state=admin_pb2.JOINING)
    view = ClusterView.of(pb)
    assert view.shard("s4") is not None
    assert {view.owner("n", f"x{i}").id for i in range(500)} == {"s1", "s2", "s3"}


def test_lookup_helpers_and_epochs() -> None:
    view = ClusterView.of(cmap(4))
    assert view.epoch == 4
    assert view.shard("s2").primary == "h:2"  # type: ignore[union-attr]
    assert view.shard("nope") is None
    assert view.shard_of_address("h:11").id == "s1"  # type: ignore[union-attr]
    assert view.shard_of_address("h:9") is None
    assert view.newer_than(None) and view.newer_than(ClusterView.of(cmap(3)))
    assert not view.newer_than(ClusterView.of(cmap(4)))
    empty = empty_view()
    assert empty.epoch == 0 and not empty.ring
    with pytest.raises(LookupError):
        empty.owner("default", "x")


def test_addresses_move_nothing() -> None:
    a = ClusterView.of(cmap())
    pb = cmap()
    pb.shards[0].primary = "elsewhere:9"  # a failover changes the address, not the id
    b = ClusterView.of(pb)
    assert all(a.owner("", f"k{i}").id == b.owner("", f"k{i}").id for i in range(500))


def test_load_cluster_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        'epoch = 7\ncluster_id = "prod"\n'
        '[[shards]]\nid = "s1"\nprimary = "10.0.0.1:7401"\nreplicas = ["10.0.0.2:7401"]\n'
        '[[shards]]\nid = "s2"\nprimary = "10.0.0.3:7401"\nweight = 3\n'
    )
    pb = load_cluster_file(f)
    assert pb.epoch == 7 and pb.cluster_id == "prod"
    assert [(s.id, s.primary, list(s.replicas), s.weight, s.state) for s in pb.shards] == [
        ("s1", "10.0.0.1:7401", ["10.0.0.2:7401"], 1, admin_pb2.ACTIVE),
        ("s2", "10.0.0.3:7401", [], 3, admin_pb2.ACTIVE),
    ]


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ('[[shards]]\nprimary = "h:1"\n', "needs 'id'"),
        ('[[shards]]\nid = "s1"\n', "needs 'id' and 'primary'"),
        ('[[shards]]\nid = "s1"\nprimary = "a"\n[[shards]]\nid = "s1"\nprimary = "b"\n', "twice"),
        ("epoch = = 1\n", "cannot read"),
    ],
)
def test_bad_cluster_files_say_what_is_wrong(tmp_path: Path, text: str, word: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(InvalidArgumentError, match=word):
        load_cluster_file(f)


def test_missing_cluster_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        load_cluster_file(tmp_path / "absent.toml")


def test_router_config_flags_env_and_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDSTATE_MAX_HOPS", "5")
    monkeypatch.setenv("SHARDSTATE_SHARD_PIPELINE", "off")
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, RouterConfig)
    cfg = config.from_args(RouterConfig, parser.parse_args(["--seeds", "a:1,b:2", "--refresh-interval-s", "0.5"]))
    assert cfg.max_hops == 5 and cfg.shard_pipeline is False and cfg.refresh_interval_s == 0.5
    assert cfg.seeds == "a:1,b:2" and cfg.listen == "127.0.0.1:7400"
    cfg.validate()
    for bad, word in [
        (RouterConfig(), "--seeds"),
        (RouterConfig(seeds="a:1", listen="nope"), "--listen"),
        (RouterConfig(seeds="a:1", max_hops=0), "--max-hops"),
    ]:
        with pytest.raises(InvalidArgumentError, match=word):
            bad.validate()


def test_limits_validate() -> None:
    config.Limits().validate()
    with pytest.raises(InvalidArgumentError, match="max_value_bytes"):
        config.Limits(max_value_bytes=10, max_request_bytes=5).validate()
    with pytest.raises(InvalidArgumentError, match="max_batch_ops"):
        config.Limits(max_batch_ops=0).validate()
