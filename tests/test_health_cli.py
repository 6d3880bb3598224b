"""`shardstate health ADDRESS`, the probe command of the secure Kubernetes overlay: 0 when the
node answers SERVING, 1 saying what it got otherwise, 2 when its TLS files cannot be used. Over
TLS it is run as each pod's probes in tests/test_deploy_cluster_secure.py."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from shardstate.server import launch
from tests.procs import Procs


def health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(launch.shardstate_cmd("health", *args), capture_output=True, text=True, timeout=60)


def test_a_serving_node_is_healthy_and_a_closed_port_is_not(procs: Procs) -> None:
    shard = procs.shard("s1")
    router = procs.router([shard.address])
    for node in (shard, router):
        r = health(node.address)
        assert (r.returncode, r.stderr) == (0, ""), r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening
        r = health("--timeout-s", "5", closed)
    assert r.returncode == 1
    assert r.stderr.startswith(f"shardstate health: {closed}: UNAVAILABLE"), r.stderr


def test_tls_files_that_cannot_be_used_exit_2(tmp_path: Path) -> None:
    r = health("--tls-ca", str(tmp_path / "missing.pem"), "127.0.0.1:7400")
    assert r.returncode == 2 and "missing.pem does not exist" in r.stderr, r.stderr
