"""`shardstate admin add-shard | remove-shard | set-weight | rebalance-status`: start a
rebalance through a router and follow it with a progress bar (sessions and bytes moved, rate,
ETA) until it ends; `--no-wait` returns once it has started; `--json` prints one JSON line per
progress message instead."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from google.protobuf import json_format

from shardstate.v1 import admin_pb2, admin_pb2_grpc

from .status import human_bytes

TIMEOUT_S = 30.0


def add_arguments(name: str, sp: argparse.ArgumentParser) -> None:
    if name in ("add-shard", "remove-shard", "set-weight"):
        sp.add_argument("id", help="shard id")
        sp.add_argument("--no-wait", action="store_true", help="return once the rebalance has started")
    if name == "add-shard":
        sp.add_argument("primary", help="the new shard's primary address (started first: shardstate shard --id ID ...)")
        sp.add_argument("--replica", action="append", default=[], help="a replica's address (repeatable)")
        sp.add_argument("--weight", type=int, default=1, help="placement weight [1]")
    if name == "set-weight":
        sp.add_argument("weight", type=int, help="the new weight (1..64)")


def follow(stub: admin_pb2_grpc.AdminStub, as_json: bool) -> int:
    """Stream Admin.Rebalance until its `done` summary; 0 when the rebalance ended."""
    last: admin_pb2.RebalanceProgress | None = None
    stream = stub.Rebalance(admin_pb2.RebalanceRequest())
    if as_json or not sys.stdout.isatty():
        for p in stream:
            if as_json:
                print(json_format.MessageToJson(p, indent=None), flush=True)
            if not p.source and not p.target:
                last = p
        return _summary(last, as_json)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(bar_width=24),
                  TextColumn("{task.completed:.0f}/{task.total:.0f} sessions"),
                  TextColumn("{task.fields[extra]}"), TimeRemainingColumn(), transient=False) as bar:
        task: Any = None
        for p in stream:
            if p.source or p.target:
                continue
            last = p
            rate = p.sessions_moved / p.elapsed_s if p.elapsed_s else 0.0
            extra = f"{human_bytes(p.bytes_moved)} {rate:.0f}/s {p.phase}"
            if task is None:
                task = bar.add_task(p.change or "rebalance", total=max(p.sessions_total, 1), extra=extra)
            bar.update(task, total=max(p.sessions_total, 1), completed=p.sessions_moved, extra=extra)
    return _summary(last, False)


def _summary(p: admin_pb2.RebalanceProgress | None, as_json: bool) -> int:
    if p is None:
        print("error: the router ended the progress stream without a summary", file=sys.stderr)
        return 1
    if as_json:
        return 0 if not p.error or p.phase in ("done", "idle") else 1
    if p.phase == "idle":
        print("no rebalance is running")
        return 0
    if p.phase != "done":
        print(f"{p.change}: not finished ({p.phase}): {p.error or 'the router stopped following it'}; "
              "follow it with: shardstate admin rebalance-status", file=sys.stderr)
        return 1
    rate = p.sessions_moved / p.elapsed_s if p.elapsed_s else 0.0
    print(f"{p.change}: {p.sessions_moved} sessions ({human_bytes(p.bytes_moved)}) moved in "
          f"{p.elapsed_s:.1f} s ({rate:.0f} sessions/s); cluster map epoch {p.epoch}")
    return 0


def _started(stub: admin_pb2_grpc.AdminStub, pb: admin_pb2.ClusterMap, args: argparse.Namespace) -> int:
    change = pb.migrations[0].change if pb.migrations else args.command
    if args.no_wait:
        if args.json:
            print(json_format.MessageToJson(pb))
        else:
            print(f"{change}: started at cluster map epoch {pb.epoch}; follow it with: shardstate admin rebalance-status")
        return 0
    return follow(stub, args.json)


def add_shard_cmd(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    pb = stub.AddShard(admin_pb2.AddShardRequest(id=args.id, primary=args.primary, replicas=args.replica,
                                                 weight=args.weight), timeout=TIMEOUT_S)
    return _started(stub, pb, args)


def remove_shard_cmd(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    pb = stub.RemoveShard(admin_pb2.RemoveShardRequest(id=args.id), timeout=TIMEOUT_S)
    return _started(stub, pb, args)


def set_weight_cmd(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    pb = stub.SetWeight(admin_pb2.SetWeightRequest(id=args.id, weight=args.weight), timeout=TIMEOUT_S)
    return _started(stub, pb, args)


def rebalance_status_cmd(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    return follow(stub, args.json)


COMMANDS = {
    "add-shard": (add_shard_cmd, "add a shard and move its share of the sessions to it: add-shard ID PRIMARY [--replica ADDR]... [--weight W]"),
    "remove-shard": (remove_shard_cmd, "move every session off a shard, then drop it from the map: remove-shard ID"),
    "set-weight": (set_weight_cmd, "change a shard's placement weight and move sessions to match: set-weight ID W"),
    "rebalance-status": (rebalance_status_cmd, "follow the running rebalance until it ends (from any router)"),
}
