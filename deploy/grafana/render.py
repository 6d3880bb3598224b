#!/usr/bin/env python3
"""Writes deploy/grafana/shardstate.json, a Grafana dashboard over the metrics every router and
shard serves on `--metrics-port` (docs/design.md §9.1):

    python deploy/grafana/render.py          # the checked-in file
    python deploy/grafana/render.py --check  # fails when the file is stale

Import it in Grafana (Dashboards → New → Import) and pick the Prometheus data source that
scrapes the pods (deploy/k8s annotates them with `prometheus.io/scrape`). Every expression names
only metrics the processes export: tests/test_prometheus.py scrapes real processes to check it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "shardstate.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
R = "[$__rate_interval]"

# (row title, [(panel title, unit, [(expr, legend)])])
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    ("Routers", [
        ("Client calls by RPC", "reqps", [
            (f"sum by (rpc) (rate(shardstate_router_requests_total{R}))", "{{rpc}}")]),
        ("Failed calls by status", "reqps", [
            (f'sum by (rpc, code) (rate(shardstate_router_requests_total{{code!="OK"}}{R}))', "{{rpc}} {{code}}")]),
        ("End-to-end latency p50 / p99", "s", [
            (f"histogram_quantile(0.5, sum by (le) (rate(shardstate_router_request_duration_seconds_bucket{R})))", "p50"),
            (f"histogram_quantile(0.99, sum by (le) (rate(shardstate_router_request_duration_seconds_bucket{R})))", "p99")]),
        ("Ops per Batch / Pipeline request", "short", [
            (f"sum(rate(shardstate_router_batch_ops_sum{R})) / sum(rate(shardstate_router_batch_ops_count{R}))", "mean")]),
        ("Open Watch streams", "short", [
            ("sum(shardstate_router_watch_streams)", "routers"),
            ("sum(shardstate_shard_watch_streams)", "shards")]),
    ]),
    ("Shards", [
        ("Ops by kind", "ops", [
            (f"sum by (op) (rate(shardstate_shard_ops_total{R}))", "{{op}}")]),
        ("Op latency in the engine, p99", "s", [
            (f"histogram_quantile(0.99, sum by (le, op) (rate(shardstate_shard_op_duration_seconds_bucket{R})))", "{{op}}")]),
        ("CAS conflicts and idempotent replays", "ops", [
            (f"sum by (op) (rate(shardstate_shard_cas_conflicts_total{R}))", "conflicts {{op}}"),
            (f"sum(rate(shardstate_shard_idempotent_replays_total{R}))", "replays")]),
        ("Sessions per node", "short", [
            ("shardstate_shard_sessions", "{{instance}}")]),
        ("Keys per node", "short", [
            ("shardstate_shard_keys", "{{instance}}")]),
        ("Change-log entries retained", "short", [
            ("shardstate_shard_changelog_entries", "{{instance}}")]),
        ("Expiry sweeper: reclaimed", "ops", [
            (f"sum by (kind) (rate(shardstate_shard_expiry_reclaimed_total{R}))", "{{kind}}"),
            (f"sum(rate(shardstate_shard_expiry_sweeps_total{R}))", "sweeps")]),
    ]),
    ("Replication", [
        ("Replica lag (writes)", "short", [
            ("max by (replica) (shardstate_replication_lag_revisions)", "{{replica}}")]),
        ("Replica lag (age of the oldest unapplied write)", "s", [
            ("max by (replica) (shardstate_replication_lag_seconds)", "{{replica}}")]),
        ("Semi-sync ack wait p99 and timeouts", "s", [
            (f"histogram_quantile(0.99, sum by (le) (rate(shardstate_replication_ack_wait_seconds_bucket{R})))", "p99 wait"),
            (f"sum(rate(shardstate_replication_ack_timeouts_total{R}))", "timeouts/s")]),
        ("Primaries and connected replicas", "short", [
            ("sum(shardstate_shard_is_primary)", "primaries"),
            ("sum(shardstate_replication_replica_connected)", "connected replicas")]),
    ]),
    ("Storage (LevelDB)", [
        ("Size on disk", "bytes", [
            ("shardstate_shard_leveldb_bytes", "{{instance}}")]),
        ("Compaction writes by level", "Bps", [
            (f"sum by (level) (rate(shardstate_shard_leveldb_compaction_written_bytes_total{R}))", "L{{level}} written"),
            (f"sum by (level) (rate(shardstate_shard_leveldb_compaction_read_bytes_total{R}))", "L{{level}} read")]),
        ("Compaction time", "s", [
            (f"sum by (level) (rate(shardstate_shard_leveldb_compaction_seconds_total{R}))", "L{{level}}")]),
        ("Table files per level", "short", [
            ("sum by (level) (shardstate_shard_leveldb_files)", "L{{level}}")]),
        ("Memtables", "bytes", [
            ("shardstate_shard_leveldb_memtable_bytes", "{{instance}}")]),
    ]),
    ("Rebalancing", [
        ("Sessions moved by the running rebalance", "short", [
            ("max(shardstate_router_rebalance_sessions)", "to move"),
            ("max(shardstate_router_rebalance_sessions_moved)", "moved")]),
        ("Copy progress per pair (target shard)", "percentunit", [
            ("shardstate_migration_sessions_copied / shardstate_migration_sessions", "{{instance}} from {{source}}")]),
        ("Target behind its source", "short", [
            ("shardstate_migration_lag_revisions", "{{instance}} from {{source}}")]),
        ("Bytes moved", "bytes", [
            ("max(shardstate_router_rebalance_moved_bytes)", "rebalance"),
            ("sum by (source) (shardstate_migration_copied_bytes)", "from {{source}}")]),
    ]),
]


def panel(pid: int, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int) -> dict[str, Any]:
    return {
        "id": pid, "type": "timeseries", "title": title, "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": e, "legendFormat": legend}
                    for i, (e, legend) in enumerate(targets)],
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = pid = 0
    for row, items in ROWS:
        pid += 1
        panels.append({"id": pid, "type": "row", "title": row, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        for i, (title, unit, targets) in enumerate(items):
            pid += 1
            panels.append(panel(pid, title, unit, targets, 12 * (i % 2), y + 8 * (i // 2)))
        y += 8 * ((len(items) + 1) // 2)
    return {
        "uid": "shardstate", "title": "shardstate", "tags": ["shardstate"], "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "10s", "timezone": "",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
        "annotations": {"list": []},
        "panels": panels,
    }


def text() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail when shardstate.json is stale")
    args = p.parse_args()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text():
            print(f"{OUT} is stale: run python deploy/grafana/render.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
