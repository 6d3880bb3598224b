"""benchmarks/shard_bench.py still runs end to end against a real shard (a fraction of a second
per cell); asserts that it measured something and saw no errors, never how fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.bench
def test_shard_bench_runs_briefly(tmp_path: Path) -> None:
    out = tmp_path / "cells.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "shard_bench.py"),
        "--sessions",
        "50",
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
        "--json",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    cells = json.loads(out.read_text())
    assert [(c["op"], c["concurrency"]) for c in cells] == [
        ("get", 1),
        ("get", 32),
        ("cas", 1),
        ("cas", 32),
    ]
    for c in cells:
        assert c["ops"] > 0 and c["errors"] == 0 and c["conflicts"] == 0
        assert c["shard_cpu_us_per_op"] is not None
    assert "CAS Put" in done.stdout


@pytest.mark.bench
def test_shard_bench_pipeline_cells_and_fit(tmp_path: Path) -> None:
    """--pipeline: one stream, N ops per message; every CAS carries the version the last answer
    gave (warm-up included), so a single writer never conflicts; the per-message fit is printed."""
    out = tmp_path / "cells.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "shard_bench.py"), "--sessions", "60",
           "--duration", "0.3", "--warmup", "0.2", "--pipeline", "1,8", "--request-ids",
           "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    cells = json.loads(out.read_text())
    assert [(c["op"], c["ops_per_message"]) for c in cells] == [("get", 1), ("get", 8), ("cas", 1), ("cas", 8)]
    for c in cells:
        assert c["ops"] > 0 and c["ops"] % c["ops_per_message"] == 0
        assert c["errors"] == 0 and c["conflicts"] == 0
        assert c["shard_cpu_us_per_op"] is not None
    fits = [line for line in done.stdout.splitlines() if "per Pipeline message" in line]
    assert [f.split(":")[0] for f in fits] == ["CAS Put", "Get"], done.stdout


@pytest.mark.bench
def test_leveldb_blocks_runs_briefly(tmp_path: Path) -> None:
    """benchmarks/leveldb_blocks.py writes the shard pattern and prints one row per block size."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "leveldb_blocks.py"), "--writes", "2200", "--block-kib", "4,32"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if "KiB │" in line]
    assert [r.split("│")[1].strip() for r in rows] == ["4 KiB", "32 KiB"]
    assert all(float(r.split("│")[2]) > 0 for r in rows)


@pytest.mark.bench
def test_step_bench_attributes_the_tail(tmp_path: Path) -> None:
    """benchmarks/step_bench.py --tail against its own dev cluster (free ports): a step rate,
    CPU per step of every process, and the tail set against each node's LevelDB LOG."""
    cmd = [sys.executable, "-m", "benchmarks.step_bench", "--port", "0", "--sessions", "200",
           "--duration", "1", "--warmup", "0.5", "--tail"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "steps/s" in out and "CPU us/step:" in out
    tail = [line for line in out.splitlines() if line.startswith("tail: p99")]
    assert len(tail) == 1, out
    ops = int(tail[0].split(" over ")[1].split(" ops")[0].replace(",", ""))
    assert ops > 0
    assert "ops overlapping none of it:" in out


@pytest.mark.bench
def test_write_path_cells(tmp_path: Path) -> None:
    """benchmarks/write_path.py: the four cells (session order x change-log tail), each with its
    measured ops; every CAS from the version the last answer gave, so none conflicts."""
    out = tmp_path / "cells.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "write_path.py"), "--ops", "320", "--sessions", "40",
           "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    cells = json.loads(out.read_text())
    assert [(c["order"], c["tail"]) for c in cells] == [
        ("in order", False), ("in order", True), ("random", False), ("random", True)]
    for c in cells:
        assert c["ops"] == 320 and c["errors"] == 0 and c["conflicts"] == 0
        assert c["process_us_per_op"] >= c["thread_us_per_op"] > 0
    bad = subprocess.run([*cmd[:2], "--batch", "50", "--sessions", "40"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert bad.returncode == 2 and "--batch must be between 1 and --sessions (40), got 50" in bad.stderr
    bad = subprocess.run([*cmd[:2], "--write-buffer-mib", "0"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert bad.returncode == 2 and "--write-buffer-mib must be at least 1, got 0" in bad.stderr


@pytest.mark.bench
def test_sync_batching_cells(tmp_path: Path) -> None:
    """Both clients at each thread count, every step counted and none failed; the batching
    client with 8 threads sent Pipeline messages, the unary one none."""
    from tests.procs import Procs

    procs = Procs(tmp_path)
    try:
        shard = procs.shard("s1")
        out = tmp_path / "cells.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "sync_batching.py"), "--address", shard.address,
               "--threads", "1,8", "--duration", "0.3", "--warmup", "0.1", "--rounds", "1", "--json", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        cells = json.loads(out.read_text())
        assert [(c["threads"], c["batching"]) for c in cells] == [(1, False), (1, True), (8, False), (8, True)]
        for c in cells:
            assert c["steps"] > 0 and c["errors"] == 0
        assert cells[2]["ops_per_message"] is None and cells[3]["ops_per_message"] is not None
        bad = subprocess.run([*cmd[:2], "--threads", "0"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "positive ints" in bad.stderr
    finally:
        procs.close()
