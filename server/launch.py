"""The process contract, from the starter's side: start a shard or router as a child process on
127.0.0.1 (port 0 = a free port), read the port it writes to its --port-file
(shardstate.common.portfile), and wait until it answers grpc.health.v1 SERVING.

One module for every starter: `shardstate dev`, the bench harness, the tests and the
benchmarks. A node is `shardstate shard ...` or `shardstate router ...` run as
`python -m shardstate.server.cli`, so it chooses its own transport (common.transport.tune).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import grpc

from shardstate.common import portfile, tls
from shardstate.common.supervision import PR_SET_PDEATHSIG

READY_TIMEOUT_S = 60.0
SERVING = "SERVING"  # what health() returns for a node that serves
POLL_S = 0.05


def shardstate_cmd(*args: str) -> list[str]:
    """The `shardstate` command as this interpreter runs it (no console script needed)."""
    return [sys.executable, "-m", "shardstate.server.cli", *args]


def health(address: str, service: str = "", timeout: float = 2.0,
           files: tls.TlsFiles | None = tls.PROCESS) -> str:
    """What `address` answers grpc.health.v1 Check(service) (over TLS with `files`; default:
    this process's TLS setting): SERVING, NOT_SERVING …, or the call's error code and message."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with tls.channel(address, tls=files) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=timeout)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def healthy(address: str, service: str = "", timeout: float = 2.0,
            files: tls.TlsFiles | None = tls.PROCESS) -> bool:
    """True when `address` answers grpc.health.v1 Check(service) with SERVING."""
    return health(address, service, timeout, files) == SERVING


def tls_args(files: tls.TlsFiles) -> list[str]:
    """The flags that start a node with `files`."""
    return ["--tls-ca", files.ca, "--tls-cert", files.cert, "--tls-key", files.key]


def _find_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: no parent-death signal


_PRCTL = _find_prctl()  # looked up here, not in the forked child (dlopen there could deadlock)


def die_with_parent() -> None:
    """preexec_fn for a child that is not a shardstate process (Redis, etcd, `shardstate dev`
    itself): its own session and process group, and SIGTERM when the process that started it
    dies. shardstate's nodes do the same themselves (supervision.die_with_supervisor)."""
    os.setsid()
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


class NotReady(Exception):
    """A node exited, or did not become healthy in time; the message names it and ends with
    the tail of its log."""

    def __init__(self, message: str, node: Node) -> None:
        super().__init__(message)
        self.node = node


class Node:
    """One shard or router child process: `start()`, `wait_ready()`, then its `address`.

    A restart (`start()` again) reuses the port it had, so a cluster map naming it stays valid.
    With `tls` it is started with those files (--tls-ca/--tls-cert/--tls-key) and probed with them.
    """

    def __init__(self, kind: str, args: Sequence[str], *, port_file: Path, log_path: Path, name: str = "",
                 port: int = 0, env: Mapping[str, str] | None = None, own_group: bool = False,
                 tls_files: tls.TlsFiles | None = None) -> None:
        self.kind = kind  # "shard" or "router"
        self.args = list(args)
        self.port_file = port_file
        self.log_path = log_path
        self.name = name or port_file.stem
        self.port = port
        self.env = dict(env or {})
        self.own_group = own_group  # a terminal's Ctrl-C then reaches only the starter
        self.popen: subprocess.Popen[bytes] | None = None
        self.data_dir: Path | None = None  # where it keeps its data, when the starter says
        self.tls = tls_files

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def metrics_address(self) -> str:
        """host:port of its /metrics once serving (started with --metrics-port), else ""."""
        from shardstate.common.promexport import metrics_port_file

        port = portfile.read(metrics_port_file(str(self.port_file)))
        return f"127.0.0.1:{port}" if port else ""

    def command(self, listen: str, extra: Sequence[str] = ()) -> list[str]:
        """What `start()` runs; a subclass may run another server that keeps the same contract
        (--listen, --port-file, grpc.health.v1)."""
        files = tls_args(self.tls) if self.tls is not None else []
        return shardstate_cmd(self.kind, "--listen", listen, "--port-file", str(self.port_file), *files,
                              *self.args, *extra)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode if self.popen is not None else None

    def start(self, wait: bool = True, listen: str | None = None, extra: Sequence[str] = ()) -> Self:
        self.port_file.unlink(missing_ok=True)
        Path(f"{self.port_file}.metrics").unlink(missing_ok=True)
        cmd = self.command(listen or f"127.0.0.1:{self.port}", extra)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, process_group=0 if self.own_group else None)
        if wait:
            self.wait_ready()
        return self

    def poll_ready(self) -> bool:
        """One look: True once the port file is written and the node answers SERVING; raises
        NotReady when the process has exited."""
        if not self.alive():
            raise NotReady(f"{self.name} exited with code {self.returncode}:\n{self.log_tail()}", self)
        port = portfile.read(self.port_file)
        if port is None:
            return False
        self.port = port
        return healthy(self.address, files=self.tls)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        wait_all([self], timeout)

    def healthy(self, service: str = "") -> bool:
        return healthy(self.address, service, files=self.tls)

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
        return self.wait(timeout)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, wait up to `grace`, then SIGKILL. Safe to call twice, or before start."""
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        self.kill()
        return self.returncode

    def wait(self, timeout: float) -> int:
        """The exit code, once it has exited (subprocess.TimeoutExpired after `timeout`)."""
        assert self.popen is not None
        return self.popen.wait(timeout)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_all(nodes: Sequence[Node], timeout: float = READY_TIMEOUT_S, stop: threading.Event | None = None,
             on_ready: Callable[[Node], None] | None = None) -> None:
    """Wait until every node is healthy (calling on_ready(node) as each becomes so). Raises
    NotReady for the first that exits or is still not healthy at the deadline, and
    KeyboardInterrupt when `stop` is set."""
    deadline = time.monotonic() + timeout
    waiting = list(nodes)
    while waiting:
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt
        for n in list(waiting):
            if n.poll_ready():
                waiting.remove(n)
                if on_ready is not None:
                    on_ready(n)
        if waiting and time.monotonic() > deadline:
            n = waiting[0]
            raise NotReady(f"{n.name} not healthy after {timeout:.0f}s:\n{n.log_tail()}", n)
        if waiting:
            time.sleep(POLL_S)


class Dev:
    """`shardstate dev --port PORT --data-dir DATA ...` as a child process in its own process
    group: `wait_router()` reads the `router: ADDR` line it prints once every node is healthy
    and checks the router's health; `node_pids()` reads DATA/dev.json; `stop()` ends the
    whole group. Its stdout is copied to `log_path` and kept in `lines`; stderr goes to the log too
    (or to `err_path` when given)."""

    def __init__(self, data: Path, *extra: str, port: int = 0, log_path: Path | None = None,
                 err_path: Path | None = None) -> None:
        self.data = data
        self.log_path = log_path or data.parent / f"{data.name}-dev.log"
        self.err_path = err_path or self.log_path
        self.address = ""
        self.lines: list[str] = []
        self._line = threading.Condition()
        self._eof = False
        self.tls: tls.TlsFiles | None = None  # with --tls: the CA and client certificate dev made
        cmd = shardstate_cmd("dev", "--port", str(port), "--data-dir", str(data), *extra)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.err_path, "ab") as err:
            self.popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent)
        threading.Thread(target=self._pump, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def data_dir(self) -> Path:
        return self.data

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        with open(self.log_path, "ab") as log:
            for raw in self.popen.stdout:
                log.write(raw)
                log.flush()
                with self._line:
                    self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                    self._line.notify_all()
        with self._line:
            self._eof = True
            self._line.notify_all()

    def wait_router(self, timeout: float = 2 * READY_TIMEOUT_S) -> str:
        """The router's address, once dev printed it and the router answers SERVING."""
        deadline = time.monotonic() + timeout
        with self._line:
            while not any(line.startswith("router: ") for line in self.lines):
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = f"exited with code {self.popen.wait()}" if self._eof else f"printed no router after {timeout:.0f}s"
                    raise RuntimeError(f"shardstate dev {why}:\n{self.log_tail()}")
                self._line.wait(min(left, 0.5))
            line = next(line for line in self.lines if line.startswith("router: "))
        self.address = line.split(" ", 1)[1].strip()
        self.tls = self.client_tls()
        while not healthy(self.address, files=self.tls):
            if time.monotonic() > deadline or not self.alive():
                raise RuntimeError(f"shardstate dev's router {self.address} is not healthy:\n{self.log_tail()}")
            time.sleep(POLL_S)
        return self.address

    def state(self) -> dict[str, Any]:
        """DATA/dev.json: {"pid", "router", "nodes": {name: {"pid", "address", "kind"}}}."""
        return dict(json.loads((self.data / "dev.json").read_text()))

    def client_tls(self) -> tls.TlsFiles | None:
        """With `dev --tls`: the files a client of this cluster needs (dev.json's "tls")."""
        try:
            t = self.state().get("tls")
        except FileNotFoundError:
            return None
        return tls.TlsFiles(ca=t["ca"], cert=t["client_cert"], key=t["client_key"]) if t else None

    def node_pids(self) -> dict[str, int]:
        try:
            return {name: int(n["pid"]) for name, n in self.state()["nodes"].items()}
        except FileNotFoundError:
            return {}

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM to dev alone (it stops its nodes in order) and wait."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM the group, wait, then SIGKILL dev's group and any node left. Safe twice."""
        pids = self.node_pids()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        self.kill(pids)
        return self.popen.returncode

    def kill(self, pids: Mapping[str, int] | None = None) -> None:
        """SIGKILL dev and every node it started (they would outlive it by up to a grace)."""
        pids = self.node_pids() if pids is None else pids
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
