"""Servers the benchmarks start for themselves: Redis, etcd, a `shardstate dev` cluster, one shard
(the last two through shardstate.server.launch, the one process contract).

Each runs in its own process group on free 127.0.0.1 ports with a temp data dir, dies with the
benchmark (PR_SET_PDEATHSIG) and is stopped by `stop()` (SIGTERM to its group, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from shardstate.server import launch

READY_TIMEOUT_S = 90.0
STOP_GRACE_S = 15.0

REDIS_PERSISTENCE = {
    "appendonly": "yes",
    "appendfsync": "everysec",
    "save": "",  # no RDB snapshots: the AOF is the durability, and no fork lands mid-run
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One started server process (and its process group)."""

    def __init__(self, name: str, cmd: Sequence[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.address = ""
        self.data_dir: Path | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.popen = subprocess.Popen(
            self.cmd, stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, preexec_fn=launch.die_with_parent, env=env, cwd=str(workdir),
        )
        log.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> int | None:
        """SIGTERM the process group, wait, then SIGKILL what is left. Safe to call twice."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        # The group may hold children (a dev cluster's shards) even when the leader has exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        return self.popen.returncode

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _wait_until(check: Any, server: Server, what: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited with {server.popen.returncode}:\n{server.log_tail()}")
        try:
            if check():
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{server.name}: {what} not ready after {timeout:.0f}s ({last}):\n{server.log_tail()}")


def redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"v=(\S+)", out)
    return m.group(1) if m else out.strip()


def etcd_version() -> str:
    out = subprocess.run(["etcd", "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"etcd Version:\s*(\S+)", out)
    return m.group(1) if m else out.strip()


def start_redis(workdir: Path, maxmemory: str = "") -> Server:
    data = workdir / "redis-data"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
            "--daemonize", "no", "--logfile", ""]
    for k, v in REDIS_PERSISTENCE.items():
        args += [f"--{k}", v]
    if maxmemory:
        args += ["--maxmemory", maxmemory]
    srv = Server("redis", args, workdir)
    srv.address, srv.data_dir = f"127.0.0.1:{port}", data

    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    try:
        _wait_until(ping, srv, "redis PING")
    except BaseException:
        srv.stop()
        raise
    return srv


def start_etcd(workdir: Path) -> Server:
    data = workdir / "etcd-data"
    client, peer = free_port(), free_port()
    curl, purl = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    args = ["etcd", "--name", "bench", "--data-dir", str(data),
            "--listen-client-urls", curl, "--advertise-client-urls", curl,
            "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
            "--initial-cluster", f"bench={purl}", "--initial-cluster-state", "new",
            "--logger", "zap", "--log-level", "warn"]
    srv = Server("etcd", args, workdir)
    srv.address, srv.data_dir = f"127.0.0.1:{client}", data

    from shardstate.bench.etcd_pb import rpc_pb2, rpc_pb2_grpc

    def ready() -> bool:
        with grpc.insecure_channel(srv.address) as ch:
            rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=b"ready"), timeout=2)
        return True

    try:
        _wait_until(ready, srv, "etcd Range")
    except BaseException:
        srv.stop()
        raise
    return srv


def start_dev(workdir: Path, extra: Sequence[str] = ()) -> launch.Dev:
    """`shardstate dev --port 0 --data-dir DIR` with its default topology, its router healthy."""
    dev = launch.Dev(workdir / "dev-data", *extra, log_path=workdir / "shardstate-dev.log")
    try:
        dev.wait_router(READY_TIMEOUT_S)
    except BaseException:
        dev.stop()
        raise
    return dev


def start_shard(workdir: Path, shard_id: str = "s1", extra: Sequence[str] = ()) -> launch.Node:
    """One shard process, no router: clients talk to it directly (it serves every session)."""
    node = launch.Node("shard", ["--id", shard_id, "--data-dir", str(workdir / f"shard-{shard_id}-data"), *extra],
                       port_file=workdir / f"shard-{shard_id}.port", log_path=workdir / f"shard-{shard_id}.log",
                       own_group=True)
    node.data_dir = workdir / f"shard-{shard_id}-data"
    try:
        node.start(wait=False).wait_ready(READY_TIMEOUT_S)
    except BaseException:
        node.stop()
        raise
    return node


# What the benchmarks start: a Redis or etcd server, a dev cluster, a single shard.
Started: TypeAlias = "Server | launch.Dev | launch.Node"


@contextlib.contextmanager
def stopping(servers: list[Started]) -> Iterator[list[Started]]:
    """Stops every server appended to the list, on any exit (error, Ctrl-C, SIGTERM via SystemExit)."""
    try:
        yield servers
    finally:
        for s in reversed(servers):
            s.stop()


def term_as_exit() -> None:
    """Make SIGTERM/SIGHUP raise SystemExit and SIGINT KeyboardInterrupt in the main thread (even
    when started in the background, where the shell ignores SIGINT), so `finally` blocks clean up."""
    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):
            signal.signal(sig, handler)
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def have(binary: str) -> bool:
    return shutil.which(binary) is not None
