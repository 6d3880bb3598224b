"""`shardstate admin --router ADDR COMMAND`: cluster administration from a shell.

`status` (a table of the router and every node), `map` (the cluster map), failover
(`promote`, `remove-node`) and rebalancing (`add-shard`, `remove-shard`, `set-weight`,
`rebalance-status`: server/cli/rebalance.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format

from shardstate.common import errors
from shardstate.server.cli import backup as backup_cli
from shardstate.v1 import admin_pb2, admin_pb2_grpc

from . import rebalance

TIMEOUT_S = 30.0
DEFAULT_ROUTER = "127.0.0.1:7400"
ROLE = {admin_pb2.PRIMARY: "primary", admin_pb2.REPLICA: "replica", admin_pb2.ROUTER: "router"}
STATE = {admin_pb2.ACTIVE: "active", admin_pb2.JOINING: "joining", admin_pb2.LEAVING: "leaving"}


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def console() -> Any:
    from rich.console import Console

    # Piped output keeps whole rows rather than wrapping at 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=200)


def replica_lag(n: admin_pb2.NodeStatus) -> str:
    """Replicas: writes behind / ms behind their primary; any node: writes set aside after a failover."""
    out = f"{n.lag_revisions} writes / {n.lag_ms} ms" if n.role == admin_pb2.REPLICA and n.up else ""
    if n.diverged_writes:
        out += f"{' · ' if out else ''}[yellow]{n.diverged_writes} set aside[/]"
    return out


def promote_cmd(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    resp = stub.PromoteReplica(admin_pb2.PromoteReplicaRequest(shard_id=args.shard, replica=args.replica),
                               timeout=TIMEOUT_S)
    if args.json:
        print(json_format.MessageToJson(resp))
        return 0
    print(f"shard {args.shard}: {resp.new_primary} is the primary now "
          f"(cluster map epoch {resp.cluster_map.epoch}, revisions continue above {resp.revision})")
    return 0


def remove_node_cmd(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    pb = stub.RemoveNode(admin_pb2.RemoveNodeRequest(address=args.address), timeout=TIMEOUT_S)
    if args.json:
        print(json_format.MessageToJson(pb))
        return 0
    print(f"{args.address} removed from the cluster map (epoch {pb.epoch})")
    return 0


def status_cmd(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    resp = stub.Status(admin_pb2.StatusRequest(), timeout=TIMEOUT_S)
    if args.json:
        print(json_format.MessageToJson(resp))
        return 0 if all(n.up for n in resp.nodes) else 1
    from rich.table import Table

    table = Table(title=f"cluster {resp.cluster_map.cluster_id or '-'} · map epoch {resp.cluster_map.epoch}")
    for col in ("node", "role", "shard", "up", "epoch", "revision", "lag", "sessions", "keys", "bytes", "ops/s", "uptime", "error"):
        table.add_column(col, justify="right" if col in ("sessions", "keys", "bytes", "ops/s", "epoch") else "left")
    for n in resp.nodes:
        up = "[green]up[/]" if n.up else "[red]DOWN[/]"
        table.add_row(
            n.address, ROLE.get(n.role, "?"), n.shard_id or "-", up, str(n.epoch) if n.up else "",
            str(n.revision) if n.revision else "", replica_lag(n), str(n.sessions) if n.role != admin_pb2.ROUTER else "",
            str(n.keys) if n.role != admin_pb2.ROUTER else "", human_bytes(n.bytes) if n.bytes else "",
            f"{n.load_ops_per_s:.0f}" if n.up else "", f"{n.uptime_s}s" if n.up else "", n.error,
        )
    console().print(table)
    return 0 if all(n.up for n in resp.nodes) else 1


def map_cmd(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    pb = stub.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=TIMEOUT_S)
    if args.json:
        print(json_format.MessageToJson(pb))
        return 0
    from rich.table import Table

    table = Table("shard", "state", "weight", "primary", "replicas",
                  title=f"cluster map epoch {pb.epoch} ({pb.cluster_id or '-'})")
    for s in pb.shards:
        table.add_row(s.id, STATE.get(s.state, "?"), str(s.weight or 1), s.primary, ", ".join(s.replicas) or "-")
    console().print(table)
    for m in pb.migrations:
        print(f"{m.change}: {m.source} -> {m.target} {m.phase} (since epoch {m.started_epoch})")
    return 0


# subcommand -> (function, help); later commands (add-shard, remove-shard, set-weight,
# promote, backup) register here.
COMMANDS: dict[str, tuple[Callable[[admin_pb2_grpc.AdminStub, argparse.Namespace], int], str]] = {
    "status": (status_cmd, "the router and every node: role, up/down, revision, sessions, sizes"),
    "map": (map_cmd, "the cluster map the router holds"),
    "promote": (promote_cmd, "make a replica the primary of its shard (failover): promote SHARD [--replica ADDR]"),
    "remove-node": (remove_node_cmd, "remove a dead replica from the cluster map: remove-node ADDR"),
    **rebalance.COMMANDS,
    **backup_cli.COMMANDS,
}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardstate admin", description="Cluster administration through a router.")
    p.add_argument("--router", default=os.environ.get("SHARDSTATE_ROUTER", DEFAULT_ROUTER),
                   help=f"router address [env SHARDSTATE_ROUTER; default {DEFAULT_ROUTER}]")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--json", action="store_true", help="print the raw answer as JSON")
        if name == "promote":
            sp.add_argument("shard", help="shard id")
            sp.add_argument("--replica", default="", help="replica address to promote (default: the most caught-up)")
        if name == "remove-node":
            sp.add_argument("address", help="the node's host:port as `shardstate admin map` lists it")
        rebalance.add_arguments(name, sp)
        backup_cli.add_arguments(name, sp)
    args = p.parse_args(argv)
    fn = COMMANDS[args.command][0]
    with grpc.insecure_channel(args.router) as ch:
        try:
            return fn(admin_pb2_grpc.AdminStub(ch), args)
        except grpc.RpcError as e:
            err = errors.from_rpc_error(e)
            print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
            return 1
