"""Prometheus endpoints of real processes: a primary with a semi-sync replica and a router,
each with --metrics-port 0. Known numbers of puts, CAS conflicts, idempotent replays, appends
and bad requests go through the router; /metrics of the router and of the shard count exactly
those."""

from __future__ import annotations

import asyncio
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import plyvel
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardstate.common.metrics import Registry
from shardstate.common.promexport import render
from shardstate.server import leveldbstats
from shardstate.server.migration import metrics as migration_metrics
from shardstate.v1 import replication_pb2, state_pb2
from tests.deploy_support import ROOT, render_module
from tests.procs import Proc, Procs
from tests.replicas import wait_for
from tests.routercluster import Stubs, T

PUTS, CONFLICTS, REPLAYS, APPENDS, SESSIONS = 7, 3, 2, 5, 4

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(node: Proc) -> Samples:
    address = node.metrics_address()
    assert address, f"{node.name} wrote no metrics port file"
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=T) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def families(node: Proc) -> set[str]:
    """Every metric name `node` exports, with or without samples (as PromQL names them)."""
    with urllib.request.urlopen(f"http://{node.metrics_address()}/metrics", timeout=T) as resp:
        fams = list(text_string_to_metric_families(resp.read().decode()))
    names = {f.name for f in fams} | {s.name for f in fams for s in f.samples}
    return names | {f"{f.name}_total" for f in fams if f.type == "counter"} | {
        f"{f.name}_{suffix}" for f in fams if f.type == "histogram" for suffix in ("bucket", "sum", "count")}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc, Proc, Stubs]]:
    procs = Procs(tmp_path_factory.mktemp("metrics"))
    try:
        primary = procs.shard("s1", "--metrics-port", "0", "--min-replica-acks", "1")
        replica = procs.shard("s1", "--metrics-port", "0", "--replica-of", primary.address)
        router = procs.router([primary.address], "--metrics-port", "0")
        stubs = Stubs(router.address)
        yield primary, replica, router, stubs
        stubs.close()
    finally:
        procs.close()


def drive(stubs: Stubs) -> None:
    sids = [f"m-{i}" for i in range(SESSIONS)]
    for i in range(PUTS):
        stubs.put(sids[i % SESSIONS], f"k{i}", b"v")
    for _ in range(CONFLICTS):
        r = stubs.put(sids[0], "k0", b"late", expected_version=1)  # k0 exists at another version
        assert not r.applied
    for i in range(REPLAYS):
        first = stubs.put(sids[1], f"idem{i}", b"x", request_id=f"req-{i}")
        again = stubs.put(sids[1], f"idem{i}", b"x", request_id=f"req-{i}")
        assert again.header.replayed and again.version == first.version
    for i in range(APPENDS):
        stubs.state.Append(state_pb2.AppendRequest(session_id=sids[2], stream="events",
                                                   entries=[f"e{i}".encode()]), timeout=T)
    with pytest.raises(grpc.RpcError) as bad:
        stubs.state.Put(state_pb2.PutRequest(session_id="", key="k", value=b"v"), timeout=T)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_router_and_shard_count_exactly_what_was_driven(cluster: tuple[Proc, Proc, Proc, Stubs]) -> None:
    primary, replica, router, stubs = cluster
    drive(stubs)
    puts = PUTS + CONFLICTS + 2 * REPLAYS

    r = scrape(router)
    assert value(r, "shardstate_router_requests_total", rpc="Put", code="OK") == puts
    assert value(r, "shardstate_router_requests_total", rpc="Append", code="OK") == APPENDS
    assert value(r, "shardstate_router_requests_total", rpc="Put", code="INVALID_ARGUMENT") == 1
    assert value(r, "shardstate_router_request_duration_seconds_count", rpc="Put") == puts + 1
    assert value(r, "shardstate_router_request_duration_seconds_bucket", rpc="Put", le="+Inf") == puts + 1

    s = scrape(primary)
    assert value(s, "shardstate_shard_ops_total", op="put", code="OK") == puts
    assert value(s, "shardstate_shard_ops_total", op="append", code="OK") == APPENDS
    assert value(s, "shardstate_shard_ops_total", op="put", code="INVALID_ARGUMENT") == 1
    assert value(s, "shardstate_shard_cas_conflicts_total", op="put") == CONFLICTS
    assert value(s, "shardstate_shard_idempotent_replays_total") == REPLAYS
    assert value(s, "shardstate_shard_op_duration_seconds_count", op="put") == puts + 1
    assert value(s, "shardstate_shard_sessions") == SESSIONS  # the puts touch every one
    assert value(s, "shardstate_shard_keys") == PUTS + REPLAYS
    assert value(s, "shardstate_shard_leveldb_bytes") > 0
    assert value(s, "shardstate_shard_is_primary") == 1
    # semi-sync: every write waited for the replica's ack, none timed out
    assert value(s, "shardstate_replication_ack_wait_seconds_count") >= 1
    assert value(s, "shardstate_replication_ack_timeouts_total") == 0
    assert value(s, "shardstate_replication_replica_connected", replica=replica.address) == 1


def test_replica_reports_its_lag_and_role(cluster: tuple[Proc, Proc, Proc, Stubs]) -> None:
    primary, replica, _, stubs = cluster
    stubs.put("m-lag", "k", b"v")

    def caught_up() -> Samples | None:
        s = scrape(replica)
        rev = value(s, "shardstate_shard_revision")
        return s if rev and rev == value(scrape(primary), "shardstate_shard_revision") else None

    s = wait_for(caught_up, "the replica to apply the primary's revision")
    assert value(s, "shardstate_shard_is_primary") == 0
    assert value(s, "shardstate_replication_lag_revisions", replica=replica.address) == 0
    assert value(s, "shardstate_replication_replica_connected", replica=replica.address) == 1


def test_pipeline_requests_count_one_call_each(cluster: tuple[Proc, Proc, Proc, Stubs]) -> None:
    primary, _, router, stubs = cluster
    before_r, before_s = scrape(router), scrape(primary)
    n, per = 3, 4
    reqs = [state_pb2.PipelineRequest(id=i + 1, batch=state_pb2.BatchRequest(ops=[
        state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=f"pipe-{i}", key=f"k{j}", value=b"v"))
        for j in range(per)])) for i in range(n)]
    got = list(stubs.state.Pipeline(iter(reqs), timeout=T))
    assert sorted(r.id for r in got) == [1, 2, 3] and all(r.code == 0 for r in got)
    assert all(res.put.applied for r in got for res in r.batch.results)

    r, s = scrape(router), scrape(primary)

    def delta(now: Samples, before: Samples, name: str, **labels: str) -> float:
        return value(now, name, **labels) - value(before, name, **labels)

    assert delta(r, before_r, "shardstate_router_requests_total", rpc="Pipeline", code="OK") == n
    assert delta(r, before_r, "shardstate_router_calls_total") == n
    assert delta(r, before_r, "shardstate_router_batch_ops_count") == n
    assert delta(r, before_r, "shardstate_router_batch_ops_sum") == n * per
    assert delta(s, before_s, "shardstate_shard_ops_total", op="put", code="OK") == n * per


def test_dashboard_names_only_exported_metrics(cluster: tuple[Proc, Proc, Proc, Stubs]) -> None:
    """deploy/grafana/shardstate.json is what its script writes, and each metric its
    expressions name is one a router or a shard serves."""
    grafana = render_module(ROOT / "deploy" / "grafana" / "render.py")
    assert (ROOT / "deploy" / "grafana" / "shardstate.json").read_text() == grafana.text(), \
        "run deploy/grafana/render.py"
    primary, replica, router, _ = cluster
    exported = families(router) | families(primary) | families(replica)
    used = {name for panel in grafana.dashboard()["panels"] for t in panel.get("targets", [])
            for name in re.findall(r"shardstate_[a-z_]+", t["expr"])}
    assert len(used) >= 30
    assert used - exported == set()


def test_leveldb_stats_from_a_real_store(tmp_path: Path) -> None:
    db = plyvel.DB(str(tmp_path / "db"), create_if_missing=True)
    try:
        for i in range(40_000):
            db.put(b"k%08d" % i, os.urandom(100))  # incompressible
        db.compact_range()
        rows = leveldbstats.parse_stats(db.get_property(b"leveldb.stats").decode())
        reg = Registry()
        leveldbstats.register(db, reg)
        asyncio.run(reg.refresh())
    finally:
        db.close()
    assert rows and sum(r.files for r in rows) >= 1
    assert sum(r.written_bytes for r in rows) >= 4 << 20  # 40 000 x 100 B, written at least once
    files = reg.get("shardstate_shard_leveldb_files")
    assert files.total() == sum(r.files for r in rows)
    assert reg.get("shardstate_shard_leveldb_compaction_written_bytes_total").total() == \
        sum(r.written_bytes for r in rows)
    assert leveldbstats.parse_stats("garbage\n  1 x 2 3 4 5\n") == []


def test_migration_gauges_follow_the_pairs() -> None:
    reg = Registry()
    pairs = [replication_pb2.PairStatus(source="s1", phase="tailing", sessions_total=10, sessions_copied=10,
                                        bytes=4096, position=90, source_revision=100)]
    migration_metrics.register(reg, lambda: pairs)
    asyncio.run(reg.refresh())
    assert reg.get("shardstate_migration_sessions_copied").value(source="s1") == 10
    assert reg.get("shardstate_migration_lag_revisions").value(source="s1") == 10
    assert reg.get("shardstate_migration_phase").value(source="s1", phase="tailing") == 1
    assert reg.get("shardstate_migration_phase").value(source="s1", phase="copying") == 0
    pairs.clear()  # the pair finished: its series go
    asyncio.run(reg.refresh())
    assert reg.get("shardstate_migration_copied_bytes").total() == 0
    assert reg.get("shardstate_migration_phase").values == {}


def test_no_endpoint_without_the_flag(tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    try:
        shard = procs.shard("s1")
        assert shard.metrics_address() == ""
    finally:
        procs.close()


def test_render_is_valid_exposition() -> None:
    reg = Registry()
    c = reg.counter("shardstate_x_total", "x", ("op",))
    c.child(op="a").inc(3)
    h = reg.histogram("shardstate_y_seconds", "y", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    reg.gauge("shardstate_z", "z", fn=lambda: 2.5)
    got = {(s.name, frozenset(s.labels.items())): s.value
           for fam in text_string_to_metric_families(render(reg).decode()) for s in fam.samples}
    assert got[("shardstate_x_total", frozenset({("op", "a")}))] == 3
    assert got[("shardstate_y_seconds_bucket", frozenset({("le", "0.1")}))] == 1
    assert got[("shardstate_y_seconds_bucket", frozenset({("le", "1.0")}))] == 2
    assert got[("shardstate_y_seconds_bucket", frozenset({("le", "+Inf")}))] == 3
    assert got[("shardstate_y_seconds_count", frozenset())] == 3
    assert got[("shardstate_y_seconds_sum", frozenset())] == pytest.approx(5.55)
    assert got[("shardstate_z", frozenset())] == 2.5
