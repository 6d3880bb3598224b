"""`shardstate dev`: a whole cluster on this machine as child processes (shards, replicas, a
router), started in order, health-checked, and stopped gracefully together.

Layout of the data directory:  DATA/s1 ... (LevelDB per shard), DATA/s1-r1 ... (replicas),
DATA/logs/<node>.log, DATA/run/<node>.port, DATA/dev.json (pids and addresses while running),
DATA/dev.lock (held by the running dev, with its pid: a second dev on DATA is refused and
touches nothing), DATA/tls/ with --tls (a throwaway CA, one certificate per node, a client
certificate: server/cli/devtls.py; kept across restarts). Children get SIGTERM when dev dies, however it dies (supervision.py).
Ports: router at --port, shard i at --port+i, replica r of shard i at --port+r*N+i, so a
restart keeps every address; with --port 0 free ports are picked and, on a restart, the map
the shards persisted is re-published with the new addresses (same shard ids: no data moves).
Every node serves Prometheus metrics at its port + METRICS_OFFSET (free ports with --port 0),
listed in dev.json and printed at start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from shardstate.common import errors, tls
from shardstate.common.authwire import with_token
from shardstate.common.supervision import (
    SUPERVISOR_ENV,
    DirectoryInUse,
    describe_pid,
    hold,
    lock_holder,
)
from shardstate.server import launch
from shardstate.server.cli import devauth

from .devtls import DevCerts

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
METRICS_OFFSET = 1000  # router 7400 -> metrics on 8400


@dataclass
class NodeSpec:
    """One child process: what it is, where it listens, what extra flags it gets."""

    name: str  # s1, s1-r1, router
    kind: str  # "shard" or "router"
    port: int  # 0 = any free port
    args: list[str] = field(default_factory=list)
    shard_id: str = ""
    replica_of: str = ""  # name of the primary's NodeSpec (replicas only)


class DevNode(launch.Node):
    """A started child of dev, with the spec it was started from."""

    def __init__(self, spec: NodeSpec, data: Path, tls_files: tls.TlsFiles | None = None) -> None:
        super().__init__(spec.kind, spec.args, port_file=data / "run" / f"{spec.name}.port",
                         log_path=data / "logs" / f"{spec.name}.log", name=spec.name, port=spec.port,
                         env={SUPERVISOR_ENV: str(os.getpid())}, own_group=True, tls_files=tls_files)
        self.spec = spec


def plan(
    shards: int, replicas: int, port: int, data: Path, background_replicas: bool = True,
) -> list[list[NodeSpec]]:
    """Start stages, in order: primaries, then replicas (they need their primary's address),
    then the router. Each stage is started together and waited for before the next.
    background_replicas: every shard node gets --background-replica (whichever node is a
    replica, after failovers too, runs on the CPU the others leave idle)."""
    bg = ["--background-replica"] if background_replicas else []
    prim = [
        NodeSpec(f"s{i}", "shard", port + i if port else 0,
                 ["--id", f"s{i}", "--data-dir", str(data / f"s{i}"), *bg], f"s{i}")
        for i in range(1, shards + 1)
    ]
    reps = [
        NodeSpec(f"s{i}-r{r}", "shard", port + r * shards + i if port else 0,
                 ["--id", f"s{i}", "--data-dir", str(data / f"s{i}-r{r}"), *bg], f"s{i}", replica_of=f"s{i}")
        for r in range(1, replicas + 1) for i in range(1, shards + 1)
    ]
    router = NodeSpec("router", "router", port, [])
    return [stage for stage in (prim, reps, [router]) if stage]


MAX_DEFAULT_SHARDS = 3


def default_shards(cpus: int) -> int:
    """One primary per CPU core, at most MAX_DEFAULT_SHARDS. Every shard a batch touches costs
    the router a message each way (~100 us of CPU per end in grpcio): on 2 cores a third
    primary adds those messages and no parallelism (benchmarks/compare, step workload: 2 shards
    +5% steps/s and -5% CPU per step against 3)."""
    return max(1, min(MAX_DEFAULT_SHARDS, cpus))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def existing_shards(data: Path) -> set[str]:
    if not data.is_dir():
        return set()
    return {p.name for p in data.iterdir() if p.is_dir() and re.fullmatch(r"s\d+", p.name)}


class DevCluster:
    def __init__(self, data: Path, console: Any, with_tls: bool = False, auth: devauth.DevAuth | None = None) -> None:
        self.data = data
        self.console = console
        self.auth = auth  # --auth: every node gets the token file and the cluster token
        self.token = auth.cluster_token if auth is not None else None  # dev's own calls
        self.nodes: dict[str, DevNode] = {}
        self.certs: DevCerts | None = None
        if with_tls:
            self.certs = DevCerts(data / "tls")
            # dev's own calls (re-publishing the map, add-shard, restore) go as a node's would.
            tls.use(self.certs.node("router"))
        (data / "logs").mkdir(parents=True, exist_ok=True)
        (data / "run").mkdir(parents=True, exist_ok=True)

    # -- starting --

    def spawn(self, spec: NodeSpec, seeds: Sequence[str] = ()) -> DevNode:
        """Start one child in its own process group: a terminal's Ctrl-C reaches only dev, which
        then stops the router before the shards so in-flight calls drain in order."""
        extra = []
        if spec.replica_of:
            extra += ["--replica-of", self.nodes[spec.replica_of].address]
        if spec.kind == "router":
            extra += ["--seeds", ",".join(seeds)]
        extra += ["--metrics-port", str(spec.port + METRICS_OFFSET if spec.port else 0)]
        if self.auth is not None:
            extra += self.auth.node_args()
        node = DevNode(spec, self.data, self.certs.node(spec.name) if self.certs else None)
        self.nodes[spec.name] = node
        return node.start(wait=False, extra=extra)

    def wait_ready(self, nodes: Sequence[DevNode], stop: threading.Event) -> None:
        def ready(n: launch.Node) -> None:
            self.console.print(f"  [green]✓[/] {n.name:<8} {n.address}  pid {n.pid}")

        launch.wait_all(nodes, READY_TIMEOUT_S, stop, ready)

    def reconcile_map(self) -> None:
        """After a restart on new ports, the map the shards persisted names old addresses:
        publish it again with the addresses the same shard ids now have (epoch + 1)."""
        from shardstate.v1 import admin_pb2, admin_pb2_grpc

        shards = [n for n in self.nodes.values() if n.spec.kind == "shard"]
        maps = []
        for n in shards:
            with tls.channel(n.address) as ch:
                maps.append(admin_pb2_grpc.AdminStub(with_token(ch, self.token)).GetClusterMap(
                    admin_pb2.GetClusterMapRequest(), timeout=10))
        best = max(maps, key=lambda m: m.epoch)
        if best.epoch == 0:
            return  # a new cluster: the router bootstraps it
        named = {a for s in best.shards for a in (s.primary, *s.replicas)}
        if named <= {n.address for n in shards}:
            return  # same addresses: the map's roles stand (a promoted replica stays primary)
        primary = {n.spec.shard_id: n.address for n in shards if not n.spec.replica_of}
        replicas: dict[str, list[str]] = {}
        for n in shards:
            if n.spec.replica_of:
                replicas.setdefault(n.spec.shard_id, []).append(n.address)
        pb = admin_pb2.ClusterMap()
        pb.CopyFrom(best)
        changed = False
        for s in pb.shards:
            if s.id in primary and (s.primary != primary[s.id] or list(s.replicas) != replicas.get(s.id, [])):
                s.primary = primary[s.id]
                del s.replicas[:]
                s.replicas.extend(replicas.get(s.id, []))
                changed = True
        if not changed:
            return
        pb.epoch = best.epoch + 1
        members = {s.id for s in pb.shards}
        for n in shards:
            if n.spec.shard_id not in members:
                continue  # a shard being added stays fresh: add-shard gives it the map
            with tls.channel(n.address) as ch:
                admin_pb2_grpc.AdminStub(with_token(ch, self.token)).PublishClusterMap(pb, timeout=10)
        self.console.print(f"  [yellow]↻[/] addresses changed: cluster map re-published at epoch {pb.epoch}")

    def resize(self, router: str, adding: Sequence[str], removing: Sequence[str]) -> None:
        """add-shard each new shard (with its replicas), remove-shard each extra one, with the
        progress bar; a removed shard's processes stop and its directories go."""
        from shardstate.v1 import admin_pb2, admin_pb2_grpc

        from .rebalance import follow

        with tls.channel(router) as ch:
            stub = admin_pb2_grpc.AdminStub(with_token(ch, self.token))
            for sid in adding:
                reps = [n.address for n in self.nodes.values() if n.spec.replica_of == sid]
                self.console.print(f"adding shard {sid} (its share of the sessions moves to it) …")
                stub.AddShard(admin_pb2.AddShardRequest(id=sid, primary=self.nodes[sid].address, replicas=reps,
                                                        weight=1), timeout=30)
                if follow(stub, False):
                    raise RuntimeError(f"adding shard {sid} did not finish")
            for sid in removing:
                self.console.print(f"removing shard {sid} (its sessions move to the others) …")
                stub.RemoveShard(admin_pb2.RemoveShardRequest(id=sid), timeout=30)
                if follow(stub, False):
                    raise RuntimeError(f"removing shard {sid} did not finish")
                for name in [n for n, node in self.nodes.items() if node.spec.shard_id == sid]:
                    self.nodes.pop(name).stop()
                    shutil.rmtree(self.data / name, ignore_errors=True)

    def client_tls(self) -> tls.TlsFiles | None:
        """With --tls: the CA and the client certificate to give a client (direct mode needs the
        certificate; through a router the CA is enough)."""
        return self.certs.client() if self.certs else None

    def write_state(self, router: str) -> None:
        state: dict[str, Any] = {
            "pid": os.getpid(), "router": router,
            "nodes": {n.spec.name: {"pid": n.pid, "address": n.address, "kind": n.spec.kind,
                                    "metrics": n.metrics_address(),
                                    **({"tls_cert": n.tls.cert, "tls_key": n.tls.key} if n.tls else {})}
                      for n in self.nodes.values()},
        }
        client = self.client_tls()
        if client is not None:
            state["tls"] = {"ca": client.ca, "client_cert": client.cert, "client_key": client.key}
        if self.auth is not None:
            state["auth"] = self.auth.state()
        tmp = self.data / "dev.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.data / "dev.json")

    # -- stopping --

    def stop(self) -> None:
        """SIGTERM the router first, then everything else; SIGKILL what outlives the grace."""
        routers = [n for n in self.nodes.values() if n.spec.kind == "router"]
        others = [n for n in self.nodes.values() if n.spec.kind != "router"]
        for group in (routers, others):
            for n in group:
                if n.alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(n.pid, signal.SIGTERM)
            for n in group:
                try:
                    n.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.console.print(f"  [red]✗[/] {n.spec.name} did not stop in time; killing it")
                    n.kill()
        (self.data / "dev.json").unlink(missing_ok=True)


class Refused(Exception):
    """The data directory cannot be started now; nothing was touched."""


def claim(data: Path) -> IO[str]:
    """DATA/dev.lock, held for this process's life. Refused when another dev holds it, or when
    a process (an orphan of an old dev, a node restarted by hand) holds a node's LevelDB lock."""
    try:
        lock = hold(data / "dev.lock")
    except DirectoryInUse as e:
        who = describe_pid(e.pid) if e.pid else "another shardstate dev"
        raise Refused(f"{data} is in use by {who}; stop it first or use another --data-dir") from None
    for d in sorted(p for p in data.iterdir() if p.is_dir() and re.fullmatch(r"s\d+(-r\d+)?", p.name)):
        pid = lock_holder(d / "LOCK")
        if pid:
            lock.close()
            raise Refused(f"{d} is in use by {describe_pid(pid)}; stop it first")
    return lock


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardstate dev", description="Run a whole shardstate cluster on this machine.")
    p.add_argument("--port", type=int, default=int(os.environ.get("SHARDSTATE_DEV_PORT", 7400)),
                   help="router port; shards take the next ports (0 = pick free ports) [default 7400]")
    p.add_argument("--shards", type=int, default=None,
                   help="number of shards [default: the cluster's in --data-dir, else one per CPU core, "
                        f"at most {MAX_DEFAULT_SHARDS}]")
    p.add_argument("--replicas", type=int, default=1, help="replicas per shard [default 1]")
    p.add_argument("--data-dir", default=os.environ.get("SHARDSTATE_DEV_DATA_DIR", ".shardstate"),
                   help="where the shards keep their data [default .shardstate]")
    p.add_argument("--replica-priority", choices=("background", "normal"),
                   default=os.environ.get("SHARDSTATE_DEV_REPLICA_PRIORITY", "background"),
                   help="CPU priority of the replicas: background (Linux SCHED_IDLE: they catch up on "
                        "CPU the primaries and the router leave idle) or normal [default background]")
    p.add_argument("--tls", action=argparse.BooleanOptionalAction,
                   default=os.environ.get("SHARDSTATE_DEV_TLS", "") in ("1", "true", "yes", "on"),
                   help="TLS everywhere: make a throwaway CA and certificates under DATA/tls (kept across "
                        "restarts) and start every node with them; routers serve TLS, shards require "
                        "client certificates [env SHARDSTATE_DEV_TLS]")
    p.add_argument("--auth", action=argparse.BooleanOptionalAction, default=None,
                   help="tokens on: make an admin, a read-write and a read-only token for the default namespace "
                        "(printed, and in DATA/dev-tokens.json), the hashed DATA/tokens.toml and a cluster token; "
                        "every node checks every call [default: as the last start of --data-dir]")
    p.add_argument("--restore", metavar="BACKUP", default=None,
                   help="start a new cluster (empty --data-dir) holding a backup: a directory or tar "
                        "file written by `shardstate admin backup`")
    a = p.parse_args(argv)
    if (a.shards is not None and a.shards < 1) or a.replicas < 0:
        p.error("--shards must be at least 1 and --replicas not negative")
    from shardstate.server.cli import backup as backup_cli

    restoring: backup_cli.Backup | None = None
    if a.restore:
        try:
            restoring = backup_cli.open_checked(Path(a.restore))
            a.shards = backup_cli.dev_shard_count(restoring, a.shards)
        except backup_cli.BackupError as e:
            print(f"shardstate dev: {e}", file=sys.stderr)
            return 1
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    data = Path(a.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    try:
        dev_lock = claim(data)
    except Refused as e:
        print(f"shardstate dev: {e}", file=sys.stderr)
        return 1
    have = existing_shards(data)
    if restoring is not None and have:
        print(f"shardstate dev: {data} holds a cluster already (shards {', '.join(sorted(have))}); "
              "--restore starts a new one: give an empty --data-dir", file=sys.stderr)
        return 1
    if a.shards is None:
        a.shards = len(have) if have else default_shards(usable_cpus())
    want = {f"s{i}" for i in range(1, a.shards + 1)}
    if have and have != {f"s{i}" for i in range(1, len(have) + 1)}:
        console.print(f"[red]{data} holds shards {', '.join(sorted(have, key=lambda s: int(s[1:])))}[/], not "
                      "s1..sN: start it with shardstate shard and change it with shardstate admin")
        return 2
    # A different --shards than the directory holds: start the cluster it holds plus the new
    # shards, then add them (or remove the extra ones) with rebalancing, as an operator would.
    adding = sorted(want - have, key=lambda s: int(s[1:])) if have else []
    removing = sorted(have - want, key=lambda s: -int(s[1:]))
    start_shards = max(a.shards, len(have))

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())

    if a.auth is None:
        a.auth = devauth.was_on(data)
    dev_auth = devauth.prepare(data) if a.auth else None
    cluster = DevCluster(data, console, a.tls, dev_auth)
    console.print(f"[bold]shardstate dev[/]: {a.shards} shards, {a.replicas} replicas each, data in {data}")
    try:
        stages = plan(start_shards, a.replicas, a.port, data, a.replica_priority == "background")
        if a.port:
            # Fixed ports: start every shard at once. After a failover the map, not the plan,
            # says which node is primary, and a node waits for the primary it must follow.
            stages = [[spec for stage in stages[:-1] for spec in stage], stages[-1]]
        for stage in stages:
            if stage[0].kind == "router":
                cluster.reconcile_map()
                seeds = [n.address for n in cluster.nodes.values() if n.spec.kind == "shard"]
                started = [cluster.spawn(spec, seeds) for spec in stage]
            else:
                started = [cluster.spawn(spec) for spec in stage]
            with console.status(f"starting {', '.join(s.name for s in stage)} …"):
                cluster.wait_ready(started, stop)
    except launch.NotReady as e:
        console.print(f"[red]✗ {e}[/]\n(log: {e.node.log_path})")
        cluster.stop()
        return 1
    except KeyboardInterrupt:
        console.print("interrupted; stopping")
        cluster.stop()
        return 130
    except grpc.RpcError as e:
        console.print(f"[red]✗ could not read the cluster map: {e}[/]")
        cluster.stop()
        return 1

    router = cluster.nodes["router"].address
    if adding or removing:
        try:
            cluster.resize(router, adding, removing)
        except grpc.RpcError as e:
            err = errors.from_rpc_error(e)
            console.print(f"[red]✗ resizing the cluster failed: {err.code.name}: {err.message}[/]")
            cluster.stop()
            return 1
    if restoring is not None:
        try:
            with console.status(f"restoring {a.restore} …"):
                backup_cli.restore_into(router, restoring, cluster.token)
        except backup_cli.BackupError as e:
            print(f"shardstate dev: restore failed: {e}", file=sys.stderr)
            cluster.stop()
            return 1
        console.print(f"restored {a.restore}")
    cluster.write_state(router)
    client = cluster.client_tls()
    if client is not None:
        # Before the router line: a starter that waits for that line has these already.
        print(f"tls-ca: {client.ca}\ntls-client-cert: {client.cert}\ntls-client-key: {client.key}", flush=True)
    if dev_auth is not None:  # before the router line too
        for key, token in dev_auth.tokens.items():
            print(f"token {key}: {token}", flush=True)
    print(f"router: {router}", flush=True)
    if dev_auth is not None:
        console.print(f"tokens in {dev_auth.tokens_file} (give one to Client(token=...) or SHARDSTATE_TOKEN)")
    if client is not None:
        console.print(f"TLS on: give a client the CA, e.g. Client({router!r}, ca_file={client.ca!r}) or "
                      f"shardstate get --router {router} --tls-ca {client.ca} SESSION KEY; direct mode "
                      f"also needs cert_file={client.cert!r}, key_file={client.key!r}")
    for n in cluster.nodes.values():
        console.print(f"  metrics {n.spec.name:<8} http://{n.metrics_address()}/metrics")
    console.print("Ctrl-C stops the cluster; logs in " + str(data / "logs"))
    reported: set[str] = set()
    while not stop.wait(0.5):
        for n in cluster.nodes.values():
            if not n.alive() and n.spec.name not in reported:
                reported.add(n.spec.name)
                console.print(f"[red]✗ {n.spec.name} exited with code {n.returncode}[/] (log: {n.log_path})")
    console.print("stopping …")
    cluster.stop()
    console.print("stopped")
    dev_lock.close()
    return 0
