"""Real shard and router processes for tests: start on port 0, wait until healthy, kill -9.

`Procs` tracks every process a test starts and kills what is left at teardown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

READY_TIMEOUT_S = 60.0


class Proc:
    """One `python -m shardstate <kind> ...` child process bound to 127.0.0.1:0."""

    def __init__(self, kind: str, args: Sequence[str], workdir: Path, name: str) -> None:
        self.kind = kind
        self.args = list(args)
        self.workdir = workdir
        self.name = name
        self.port_file = workdir / f"{name}.port"
        self.log_path = workdir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True, listen: str | None = None) -> Proc:
        """Start (or restart) the process. A restart reuses the port it had, so maps stay valid."""
        self.port_file.unlink(missing_ok=True)
        listen = listen or (f"127.0.0.1:{self.port}" if self.port else "127.0.0.1:0")
        cmd = [sys.executable, "-m", "shardstate", self.kind, "--listen", listen,
               "--port-file", str(self.port_file), *self.args]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            if self.port_file.exists():
                text = self.port_file.read_text().strip()
                if text:
                    self.port = int(text)
                    if self.healthy():
                        return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def healthy(self, service: str = "") -> bool:
        with grpc.insecure_channel(self.address) as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2
                )
            except grpc.RpcError:
                return False
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up."""
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(30)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.popen is not None
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Procs:
    """Factory for a test's processes; `close()` kills whatever still runs."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[Proc] = []

    def shard(self, shard_id: str, *extra: str, data_dir: Path | None = None, start: bool = True,
              name: str | None = None) -> Proc:
        name = name or f"shard-{shard_id}-{len(self.all)}"
        data = data_dir or (self.tmp / f"{name}-data")
        p = Proc("shard", ["--id", shard_id, "--data-dir", str(data), *extra], self.tmp, name)
        p.data_dir = data  # type: ignore[attr-defined]
        self.all.append(p)
        return p.start() if start else p

    def router(self, seeds: Sequence[str], *extra: str, start: bool = True) -> Proc:
        name = f"router-{len(self.all)}"
        p = Proc("router", ["--seeds", ",".join(seeds), *extra], self.tmp, name)
        self.all.append(p)
        return p.start() if start else p

    def close(self) -> None:
        for p in self.all:
            if p.alive():
                p.kill()
