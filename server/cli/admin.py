"""`shardstate admin --router ADDR COMMAND`: cluster administration from a shell.

`status` and `watch-status` (server/cli/status.py), `map` (the cluster map), failover
(`promote`, `remove-node`) and rebalancing (`add-shard`, `remove-shard`, `set-weight`,
`rebalance-status`: server/cli/rebalance.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import grpc
from google.protobuf import json_format

from shardstate.common import errors, tls
from shardstate.common.authconfig import add_token_arguments, token_of
from shardstate.common.authwire import with_token
from shardstate.server.cli import backup as backup_cli
from shardstate.v1 import admin_pb2, admin_pb2_grpc

from . import rebalance, status, tlsopts
from .status import STATE, console

TIMEOUT_S = 30.0
DEFAULT_ROUTER = "127.0.0.1:7400"


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
    "status": (status.status_cmd, "the router and every node: role, shard, revision, lag, sessions, size, load"),
    "watch-status": (status.watch_status_cmd, "the status, refreshed every --interval seconds until Ctrl-C"),
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
    tlsopts.add(p)
    add_token_arguments(p)
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--json", action="store_true", help="print the raw answer as JSON")
        if name == "promote":
            sp.add_argument("shard", help="shard id")
            sp.add_argument("--replica", default="", help="replica address to promote (default: the most caught-up)")
        if name == "remove-node":
            sp.add_argument("address", help="the node's host:port as `shardstate admin map` lists it")
        status.add_arguments(name, sp)
        rebalance.add_arguments(name, sp)
        backup_cli.add_arguments(name, sp)
    args = p.parse_args(argv)
    fn = COMMANDS[args.command][0]
    if not tlsopts.use("admin", args):
        return 2
    with tls.channel(args.router) as ch:
        try:
            return fn(admin_pb2_grpc.AdminStub(with_token(ch, token_of(args))), args)
        except grpc.RpcError as e:
            err = errors.from_rpc_error(e)
            print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
            return 1
