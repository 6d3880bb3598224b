"""Prometheus endpoints of real processes: a primary with a semi-sync replica and a router,
each with --metrics-port 0. Known numbers of puts, CAS conflicts, idempotent replays, appends
and bad requests go through the router; /metrics of the router and of the shard count exactly
those."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardstate.common.metrics import Registry
from shardstate.common.promexport import render
from shardstate.v1 import state_pb2
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
