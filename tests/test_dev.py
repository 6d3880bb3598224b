"""`shardstate dev` as a user runs it: starts a cluster, serves through the printed router
address, stops every child on SIGTERM, and a restart on the same data directory sees the data.
The small CLI helpers (put/get/ls, admin status) are exercised against it too."""

from __future__ import annotations

import json
from pathlib import Path

import grpc

from shardstate.server.cli.dev import MAX_DEFAULT_SHARDS, default_shards, existing_shards, plan
from shardstate.v1 import state_pb2, state_pb2_grpc
from tests.devcluster import Dev, cli, gone


def test_dev_starts_serves_stops_and_restarts_with_the_data(tmp_path: Path, devs: list[Dev]) -> None:
    data = tmp_path / "data"
    dev = Dev(data, "--shards", "3", "--replicas", "0")
    devs.append(dev)
    with grpc.insecure_channel(dev.router) as ch:
        st = state_pb2_grpc.StateStub(ch)
        for i in range(30):
            assert st.Put(state_pb2.PutRequest(session_id=f"dev-{i}", key="k", value=b"v%d" % i), timeout=30).applied
        got = st.Get(state_pb2.GetRequest(session_id="dev-7", key="k"), timeout=30)
        assert got.found and got.record.value == b"v7"
        shards_used = {st.Get(state_pb2.GetRequest(session_id=f"dev-{i}", key="k"), timeout=30).header.shard_id
                       for i in range(30)}
    assert shards_used == {"s1", "s2", "s3"}
    assert existing_shards(data) == {"s1", "s2", "s3"}

    # The shell helpers against the same cluster.
    r = cli("put", "--router", dev.router, "--namespace", "cli", "sess", "greeting", "hello")
    assert r.returncode == 0, r.stderr
    version = int(r.stdout.strip())
    r = cli("get", "--router", dev.router, "--namespace", "cli", "sess", "greeting")
    assert (r.returncode, r.stdout) == (0, "hello")
    r = cli("put", "--router", dev.router, "--namespace", "cli", "--expect", str(version + 1), "sess", "greeting", "x")
    assert r.returncode == 1 and f"current version is {version}" in r.stderr
    r = cli("get", "--router", dev.router, "--namespace", "cli", "sess", "nope")
    assert r.returncode == 1 and "not found" in r.stderr
    r = cli("ls", "--router", dev.router, "--namespace", "cli", "--plain")
    assert r.stdout.split() == ["sess"]
    r = cli("ls", "--router", dev.router, "--namespace", "cli", "sess")
    assert r.stdout.split("\t")[0] == "greeting" and "hello" in r.stdout
    r = cli("put", "--router", dev.router, "", "k", "v")
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr and "session_id" in r.stderr
    r = cli("admin", "--router", dev.router, "status")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("primary") == 3 and "router" in r.stdout
    r = cli("admin", "--router", dev.router, "map", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["epoch"] == "1"

    pids = dev.child_pids()
    assert len(pids) == 4
    assert dev.terminate() == 0
    assert all(gone(p) for p in pids), [p for p in pids if not gone(p)]
    assert not (data / "dev.json").exists()

    # Without --shards a restart takes the cluster the data directory holds (3 here).
    dev2 = Dev(data, "--replicas", "0")
    devs.append(dev2)
    with grpc.insecure_channel(dev2.router) as ch:
        st = state_pb2_grpc.StateStub(ch)
        for i in range(30):
            got = st.Get(state_pb2.GetRequest(session_id=f"dev-{i}", key="k"), timeout=30)
            assert got.found and got.record.value == b"v%d" % i
    r = cli("get", "--router", dev2.router, "--namespace", "cli", "sess", "greeting")
    assert r.stdout == "hello"
    pids = dev2.child_pids()
    assert len(pids) == 4
    assert dev2.terminate() == 0
    assert all(gone(p) for p in pids)


def test_dev_refuses_a_data_dir_with_gaps_in_its_shards(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for s in ("s1", "s3"):
        (data / s).mkdir(parents=True)
    r = cli("dev", "--port", "0", "--data-dir", str(data), "--shards", "3")
    assert r.returncode == 2 and "not s1..sN" in r.stderr


def _values(router: str, n: int) -> tuple[list[bytes], set[str]]:
    with grpc.insecure_channel(router) as ch:
        st = state_pb2_grpc.StateStub(ch)
        got = [st.Get(state_pb2.GetRequest(session_id=f"grow-{i}", key="k"), timeout=30) for i in range(n)]
    return [g.record.value for g in got], {g.header.shard_id for g in got}


def test_dev_grows_and_shrinks_the_cluster_its_directory_holds(tmp_path: Path) -> None:
    """--shards N on a directory holding another count adds (or removes) shards through
    rebalancing: every value is still there, served by the new set of shards."""
    data = tmp_path / "data"
    dev = Dev(data, "--shards", "2", "--replicas", "0")
    with grpc.insecure_channel(dev.router) as ch:
        st = state_pb2_grpc.StateStub(ch)
        for i in range(60):
            assert st.Put(state_pb2.PutRequest(session_id=f"grow-{i}", key="k", value=b"v%d" % i), timeout=30).applied
    assert dev.terminate() == 0
    want = [b"v%d" % i for i in range(60)]
    dev = Dev(data, "--shards", "3", "--replicas", "0")
    values, used = _values(dev.router, 60)
    assert values == want and used == {"s1", "s2", "s3"}
    assert existing_shards(data) == {"s1", "s2", "s3"}
    assert dev.terminate() == 0
    dev = Dev(data, "--shards", "2", "--replicas", "0")
    values, used = _values(dev.router, 60)
    assert values == want and used == {"s1", "s2"}
    assert existing_shards(data) == {"s1", "s2"}
    assert dev.terminate() == 0


def test_plan_gives_fixed_consecutive_ports_and_replica_hooks(tmp_path: Path) -> None:
    stages = plan(3, 1, 7400, tmp_path)
    prim, reps, router = stages
    assert [(s.name, s.port) for s in prim] == [("s1", 7401), ("s2", 7402), ("s3", 7403)]
    assert [(s.name, s.port, s.replica_of) for s in reps] == [
        ("s1-r1", 7404, "s1"), ("s2-r1", 7405, "s2"), ("s3-r1", 7406, "s3")]
    assert [(s.name, s.port) for s in router] == [("router", 7400)]
    assert all(s.port == 0 for stage in plan(2, 0, 0, tmp_path) for s in stage)
    assert len(plan(2, 0, 0, tmp_path)) == 2  # no replica stage without replicas


def test_plan_puts_every_shard_node_in_background_replica_mode_unless_asked_not_to(tmp_path: Path) -> None:
    """Whichever node is a replica (after a failover too) runs in the background by default;
    --replica-priority normal leaves the flag off everywhere; the router never gets it."""
    on = [s for stage in plan(2, 1, 0, tmp_path) for s in stage]
    assert all(("--background-replica" in s.args) == (s.kind == "shard") for s in on)
    off = [s for stage in plan(2, 1, 0, tmp_path, background_replicas=False) for s in stage]
    assert not any("--background-replica" in s.args for s in off)


def test_default_shards_is_one_per_core_up_to_three() -> None:
    assert [default_shards(c) for c in (0, 1, 2, 3, 4, 64)] == [1, 1, 2, 3, 3, 3]
    assert MAX_DEFAULT_SHARDS == 3
