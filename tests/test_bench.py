"""The load harness runs end to end against real servers: `shardstate bench` against a dev
cluster, and `benchmarks/compare` against Redis, etcd and shardstate. Asserts that the reports
are complete and their counts consistent (completed = successes + conflicts + errors), never speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shardstate.bench import compare, procstat
from shardstate.bench.stats import CONFLICT, ERROR, OK, Recorder
from shardstate.bench.workloads import SessionPicker
from shardstate.server import launch
from shardstate.server.cli.dev import default_shards, usable_cpus
from tests.devcluster import Dev

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--sessions", "50", "--concurrency", "4", "--duration", "2", "--warmup", "0.5", "--value-size", "64"]


def check_result(r: dict[str, Any], store: str, workload: str) -> None:
    """Every field a reader relies on is there and the counts add up."""
    assert r["store"] == store and r["workload"] == workload
    assert r["completed"] == r["successes"] + r["conflicts"] + r["errors"]
    assert r["completed"] > 0, r
    assert r["errors"] == 0, (r["error_kinds"], r["error_samples"])
    assert set(r["latency_ms"]) >= {"p50", "p95", "p99", "max"}
    assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"] <= r["latency_ms"]["max"]
    assert r["throughput_ops_s"] > 0
    assert len(r["timeline"]) >= 2
    assert sum(s["ops"] for s in r["timeline"]) == r["completed"]
    assert sum(s["conflicts"] for s in r["timeline"]) == r["conflicts"]
    assert r["step_impl"] in ("cached", "read-cas")
    assert r["cpu_s"].get("client") is not None and r["machine"]["cores"] >= 1
    for key in ("config", "started_at", "backend", "warmup_ops", "late_ops", "cpu_s_per_1000_ops"):
        assert key in r


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(launch.shardstate_cmd("bench", *args),
                          capture_output=True, text=True, timeout=timeout)


def test_recorder_counts_each_op_once() -> None:
    rec = Recorder(measure_start=10.0, measure_end=12.0)
    rec.record(9.0, 9.5, OK)  # warm-up
    rec.record(9.9, 10.1, OK)
    rec.record(10.2, 10.3, CONFLICT)
    rec.record(10.5, 11.2, ERROR, RuntimeError("boom"))
    rec.record(11.9, 12.1, OK)  # late
    s = rec.summary(2.0)
    assert (s["completed"], s["successes"], s["conflicts"], s["errors"]) == (3, 1, 1, 1)
    assert (s["warmup_ops"], s["late_ops"]) == (1, 1)
    assert [t["ops"] for t in s["timeline"]] == [2, 1]
    assert s["error_kinds"] == {"RuntimeError": 1}


def test_zipf_picker_prefers_a_few_sessions() -> None:
    import random

    ids = [f"s{i}" for i in range(1000)]
    picker = SessionPicker(ids, 1.2, random.Random(3))
    picks = [picker.pick() for _ in range(5000)]
    top = max(picks.count(p) for p in set(picks))
    assert top > 5000 / 1000 * 20  # the hottest session gets far more than a uniform share
    assert set(picks) <= set(ids)


@pytest.mark.bench
def test_shardstate_bench_against_a_dev_cluster(tmp_path: Path, devs: list[Dev]) -> None:
    dev = Dev(tmp_path / "data")
    devs.append(dev)
    for workload, extra in (("step", []), ("mixed", ["--zipf", "1.1", "--step-impl", "read-cas"])):
        out = tmp_path / f"{workload}.json"
        done = bench("--router", dev.router, "--workload", workload, *TINY, *extra,
                     "--json", str(out), "--plot", str(tmp_path / f"{workload}.png"))
        assert done.returncode == 0, done.stdout + done.stderr
        r = json.loads(out.read_text())
        check_result(r, "shardstate", workload)
        assert r["step_impl"] == ("cached" if workload == "step" else "read-cas")
        assert "p99 ms" in done.stdout and "conflicts" in done.stdout
        assert (tmp_path / f"{workload}.png").stat().st_size > 0


@pytest.mark.bench
def test_shardstate_bench_append_and_read(tmp_path: Path, devs: list[Dev]) -> None:
    dev = Dev(tmp_path / "data", "--replicas", "0")
    devs.append(dev)
    for workload in ("append", "read"):
        out = tmp_path / f"{workload}.json"
        done = bench("--router", dev.router, "--workload", workload, *TINY, "--json", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        check_result(json.loads(out.read_text()), "shardstate", workload)

    # Without matplotlib (an optional extra) the run still succeeds; only the PNG is missing.
    out, png = tmp_path / "noplot.json", tmp_path / "noplot.png"
    code = ("import sys; sys.modules['matplotlib'] = None; from shardstate.bench.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "--router", dev.router, "--workload", "read", *TINY,
                           "--no-load", "--json", str(out), "--plot", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no plot written" in done.stderr and "matplotlib" in done.stderr
    assert not png.exists()
    check_result(json.loads(out.read_text()), "shardstate", "read")


def test_bench_says_what_is_wrong_when_nothing_listens(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = bench("--router", f"127.0.0.1:{port}", "--sessions", "5", "--duration", "1", timeout=180)
    assert done.returncode == 2
    assert f"127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


def require_peers() -> None:
    missing = [b for b in ("redis-server", "etcd") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run benchmarks/install-peers.sh "
                    "(tests/run.sh does) to install Debian's redis-server and etcd-server")


@pytest.mark.bench
def test_compare_runs_every_store_with_both_patterns(tmp_path: Path) -> None:
    require_peers()
    out = tmp_path / "report"
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run([str(ROOT / "benchmarks" / "compare"), *TINY, "--out", str(out), "--quiet", "--no-install"],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads((out / "results.json").read_text())
    # Every store runs every pattern; each result says which pattern it ran, and ran it.
    stores = ("redis", "etcd", "shardstate", "shardstate-direct")
    assert [(r["store"], r["pattern"]) for r in doc["results"]] == [
        (s, p) for p in ("read-cas", "cached") for s in stores]
    for r in doc["results"]:
        check_result(r, r["store"], "step")
        assert r["step_impl"] == r["pattern"] == r["backend"]["step_impl"]
        assert r["cpu_s"], r["store"]
    shard = doc["results"][2]
    # dev's default: one shard per core (at most 3), one replica each.
    primaries = {f"s{i}" for i in range(1, default_shards(usable_cpus()) + 1)}
    assert {"router", "client", *primaries, *(f"{p}-r1" for p in primaries)} <= set(shard["cpu_s"])
    assert doc["results"][0]["cpu_s"].get("redis-server") is not None
    assert doc["results"][1]["cpu_s"].get("etcd") is not None
    for pattern in ("read-cas", "cached"):
        sec = doc["patterns"][pattern]
        assert [r["pattern"] for r in sec["results"]] == [pattern] * 4
        # Ratios only within a pattern: shardstate's own is 1.0, the peers' divide by it.
        ratios, base = sec["summary"]["ratios"], sec["results"][2]["throughput_ops_s"]
        assert ratios["shardstate"]["throughput_vs_shardstate"] == 1.0
        assert ratios["redis"]["throughput_vs_shardstate"] == sec["results"][0]["throughput_ops_s"] / base
        assert len(sec["summary"]["targets"]) == 2
    assert doc["machine"]["cores"] >= 1 and doc["command"].startswith("benchmarks/compare")
    md = (out / "report.md").read_text()
    for word in ("redis", "etcd", "shardstate", "CPU s / 1000 ops", "benchmarks/compare", "cores",
                 "## Pattern read-cas", "## Pattern cached", "read-cas steps/s >= 3 x etcd (shardstate)",
                 "cached p99 <= Redis (shardstate-direct)", "straight to each shard's primary"):
        assert word in md
    assert (out / "compare.png").stat().st_size > 0
    assert "1.00x" in done.stdout and "target" in done.stdout
    # Every server process it started is gone (a pid still alive runs something else).
    for r in doc["results"]:
        for name, pid in r["server"]["pids"].items():
            assert r["server"]["cmdlines"][name], name  # recorded while it ran
            assert procstat.cmdline(pid) != r["server"]["cmdlines"][name], f"{r['store']} {name} still runs"


    # The cost model reads that same result and projects from it.
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cost_model.py"), "--from",
                           str(out / "results.json"), "--out", str(tmp_path / "cost")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    model = json.loads((tmp_path / "cost" / "cost-model.json").read_text())
    assert model["costs"]["shards"] == len(primaries) and model["costs"]["replicas_per_shard"] == 1
    assert model["costs"]["router"] > 0 and model["costs"]["primary"] > 0
    assert [r["cores"] for r in model["model"]["by_cores"]][:2] == [2, 4]
    assert "Assumptions" in (tmp_path / "cost" / "cost-model.md").read_text()


@pytest.mark.bench
def test_memory_scale_loads_a_shard_and_redis(tmp_path: Path) -> None:
    require_peers()
    out = tmp_path / "mem.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_scale.py"), "--sessions", "3000",
                           "--batch", "200", "--settle", "0.5", "--json", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    shard, redis = doc["results"]
    assert shard["sessions"] == redis["sessions"] == 3000
    assert shard["rss_bytes"] > 0 and shard["disk_bytes"] > 3000 * 1024
    assert redis["keys"] == 3000 and redis["used_memory"] > 3000 * 1024
    assert "used_memory" in done.stdout


def _run(store: str, ops_s: float, p99: float) -> dict[str, Any]:
    return {"store": store, "throughput_ops_s": ops_s, "latency_ms": {"p99": p99}}


def test_compare_rounds_pick_each_stores_median_run() -> None:
    rounds = [
        [_run("redis", 100, 5), _run("shardstate", 90, 7)],
        [_run("redis", 120, 6), {"store": "shardstate", "error": "RuntimeError: boom"}],
        [_run("redis", 80, 4), _run("shardstate", 110, 6)],
        [_run("redis", 110, 5), _run("shardstate", 100, 8)],
    ]
    redis, shard = compare.median_results(rounds)
    # redis: 80, 100, 110, 120 -> the lower middle (100, round 1); shardstate: 90, 100, 110 of 3 ok.
    assert (redis["throughput_ops_s"], redis["round"], redis["rounds_ok"]) == (100, 1, 4)
    assert (shard["throughput_ops_s"], shard["round"], shard["rounds_ok"]) == (100, 4, 3)
    assert "round" not in rounds[0][0]  # the runs themselves are left as they were
    failed = compare.median_results([[{"store": "etcd", "error": "x"}], [{"store": "etcd", "error": "y"}]])
    assert failed == [{"store": "etcd", "error": "x"}]
    rows = compare.round_rows(rounds, "cached")
    assert [r["ops_s"]["shardstate"] for r in rows] == [90, None, 110, 100]
    assert rows[1]["targets"] == []  # no shardstate result in round 2: nothing to compare
    assert [t["met"] for t in rows[2]["targets"]] == [True, False]  # >= 1.2 x Redis, p99 <= Redis
    assert [t["met"] for t in rows[0]["targets"]] == [False, False]
    stores = ["redis", "shardstate"]
    assert compare.round_header(stores, "cached") == [
        "round", "redis ops/s", "shardstate ops/s", "cached steps/s >= 1.2 x Redis (shardstate) (has / needs)",
        "cached p99 <= Redis (shardstate) (has / needs)", "targets met"]
    assert compare.round_cells(rows[0], stores, "cached") == [
        "1", "100", "90", "90.00 / 120.00 NOT met", "7.00 / 5.00 NOT met", "0 of 2"]
    assert compare.round_cells(rows[1], stores, "cached") == ["2", "120", "failed", "-", "-", "-"]
    # read-cas holds shardstate to 1.2 x Redis and 3 x etcd: with no etcd run, one target.
    assert compare.round_header(stores, "read-cas")[3:] == [
        "read-cas steps/s >= 1.2 x Redis (shardstate) (has / needs)", "targets met"]
    # With a direct-mode run in the comparison, the cached targets are about it.
    assert compare.target_labels(["redis", "shardstate", "shardstate-direct"], "cached") == [
        "cached steps/s >= 1.2 x Redis (shardstate-direct)", "cached p99 <= Redis (shardstate-direct)"]


@pytest.mark.bench
def test_compare_rounds_interleave_the_stores(tmp_path: Path) -> None:
    require_peers()
    out = tmp_path / "report"
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run([str(ROOT / "benchmarks" / "compare"), *TINY, "--stores", "redis,shardstate",
                           "--rounds", "2", "--patterns", "read-cas", "--out", str(out), "--quiet", "--no-install"],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads((out / "results.json").read_text())
    sec = doc["patterns"]["read-cas"]
    assert list(doc["patterns"]) == ["read-cas"]
    assert doc["config"]["rounds"] == 2 and [row["round"] for row in sec["rounds"]] == [1, 2]
    for k in (1, 2):
        for store in ("redis", "shardstate"):
            r = json.loads((out / f"round{k}" / f"{store}-read-cas.json").read_text())
            check_result(r, store, "step")
            assert r["step_impl"] == "read-cas"
            assert sec["rounds"][k - 1]["ops_s"][store] == r["throughput_ops_s"]
    for r in doc["results"]:  # each store's median run is one of its rounds, as stored
        assert r["rounds_ok"] == 2 and r["round"] in (1, 2)
        stored = json.loads((out / f"round{r['round']}" / f"{r['store']}-read-cas.json").read_text())
        assert r["throughput_ops_s"] == stored["throughput_ops_s"] == min(
            sec["rounds"][0]["ops_s"][r["store"]], sec["rounds"][1]["ops_s"][r["store"]])
    assert len(sec["rounds"][0]["targets"]) == 1 and len(sec["summary"]["targets"]) == 1
    md = (out / "report.md").read_text()
    assert "median run of 2 rounds" in md and "| 2 |" in md and "the median runs" in md
    assert "read-cas steps/s >= 1.2 x Redis (shardstate) (has / needs)" in md
    assert "every round (2)" in done.stdout and "median of 2 rounds" in done.stdout


def test_compare_help_says_what_it_installs() -> None:
    done = subprocess.run([str(ROOT / "benchmarks" / "compare"), "--help"], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    assert done.returncode == 0
    assert "install-peers.sh" in done.stdout and "appendfsync everysec" in done.stdout
