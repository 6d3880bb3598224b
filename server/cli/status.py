"""`shardstate admin status` and `shardstate admin watch-status`: the router and every node
(role, shard and its state, replica lag, sessions, size, load) as a `rich` table that fits
80 columns (`--wide` adds revisions, keys, epochs and uptime), problems and the running
rebalance under it; `--json` prints Admin.Status as JSON (watch-status: one line per refresh).
Also the display helpers the other admin commands share."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import grpc
from google.protobuf import json_format

from shardstate.common import errors
from shardstate.v1 import admin_pb2, admin_pb2_grpc

TIMEOUT_S = 30.0
ROLE = {admin_pb2.PRIMARY: "primary", admin_pb2.REPLICA: "replica", admin_pb2.ROUTER: "router"}
STATE = {admin_pb2.ACTIVE: "active", admin_pb2.JOINING: "joining", admin_pb2.LEAVING: "leaving"}


def human_bytes(n: float) -> str:
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
    """Replicas: writes and ms behind their primary; any node: writes set aside after a failover."""
    out = f"{n.lag_revisions}w {n.lag_ms}ms" if n.role == admin_pb2.REPLICA and n.up else ""
    if n.diverged_writes:
        out += f"{' ' if out else ''}[yellow]{n.diverged_writes} aside[/]"
    return out


def add_arguments(name: str, sp: argparse.ArgumentParser) -> None:
    if name in ("status", "watch-status"):
        sp.add_argument("--wide", action="store_true", help="also revisions, keys, epochs and uptime (wider than 80 columns)")
    if name == "watch-status":
        sp.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes [2]")
        sp.add_argument("--count", type=int, default=0, help="stop after this many refreshes [0: until Ctrl-C]")


def healthy(resp: admin_pb2.StatusResponse) -> bool:
    return all(n.up for n in resp.nodes)


def view(resp: admin_pb2.StatusResponse, wide: bool = False) -> Any:
    """The table and, under it, what needs a look: down nodes, nodes behind the map's epoch,
    writes set aside, the running rebalance."""
    from rich.console import Group
    from rich.table import Table

    pb = resp.cluster_map
    state = {s.id: s.state for s in pb.shards}
    table = Table(title=f"cluster {pb.cluster_id or '-'} · map epoch {pb.epoch}", title_justify="left",
                  pad_edge=False, show_edge=False)
    cols = ["node", "role", "shard", "lag", "sessions", "size", "ops/s"]
    if wide:
        cols += ["revision", "keys", "epoch", "uptime"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("node", "role", "shard", "lag") else "right",
                         no_wrap=col == "node", overflow="fold")
    notes: list[str] = []
    for n in resp.nodes:
        router = n.role == admin_pb2.ROUTER
        role = ROLE.get(n.role, "?") if n.up else "[red]DOWN[/]"
        shard = n.shard_id or "-"
        if n.shard_id and state.get(n.shard_id, admin_pb2.ACTIVE) != admin_pb2.ACTIVE:
            shard += f" [yellow]{STATE.get(state[n.shard_id], '?')}[/]"
        row = [n.address, role, shard, replica_lag(n), "" if router or not n.up else str(n.sessions),
               human_bytes(n.bytes) if n.bytes else "", f"{n.load_ops_per_s:.0f}" if n.up else ""]
        if wide:
            row += [str(n.revision) if n.revision else "", "" if router or not n.up else str(n.keys),
                    str(n.epoch) if n.up else "", f"{n.uptime_s}s" if n.up else ""]
        table.add_row(*row)
        if not n.up:
            notes.append(f"[red]{n.address} is down[/]: {n.error or 'no answer'}")
        elif n.epoch and n.epoch < pb.epoch:
            notes.append(f"[yellow]{n.address} holds map epoch {n.epoch}[/] (the router's is {pb.epoch})")
        if n.diverged_writes:
            notes.append(f"[yellow]{n.address} set aside {n.diverged_writes} writes[/] after a failover "
                         "(in its audit file)")
    for m in resp.moves:
        if m.source or m.target:
            notes.append(f"  {m.source} → {m.target}: {m.phase}, {m.sessions_moved}/{m.sessions_total} "
                         f"sessions, {human_bytes(m.bytes_moved)}" + (f" [red]{m.error}[/]" if m.error else ""))
        elif m.phase not in ("", "idle", "done") or m.sessions_total:
            eta = f", about {m.eta_s:.0f} s to go" if m.eta_s else ""
            notes.insert(0, f"rebalance {m.change or ''}: {m.phase}, {m.sessions_moved}/{m.sessions_total} "
                         f"sessions moved, {human_bytes(m.bytes_moved)}{eta}")
    return Group(table, *notes) if notes else table


def status_json(resp: admin_pb2.StatusResponse, one_line: bool = False) -> str:
    return json_format.MessageToJson(resp, indent=None if one_line else 2)


def status_cmd(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    resp = stub.Status(admin_pb2.StatusRequest(), timeout=TIMEOUT_S)
    if args.json:
        print(status_json(resp))
    else:
        console().print(view(resp, args.wide))
    return 0 if healthy(resp) else 1


def watch_status_cmd(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    """Refresh the status every --interval seconds until Ctrl-C (or --count refreshes); a
    router that does not answer is shown as such and asked again. Exit status: the last one's."""
    from rich.live import Live
    from rich.text import Text

    def fetch() -> tuple[Any, str, bool]:
        try:
            resp = stub.Status(admin_pb2.StatusRequest(), timeout=min(TIMEOUT_S, max(args.interval, 1.0) * 5))
        except grpc.RpcError as e:
            err = errors.from_rpc_error(e)
            msg = f"{time.strftime('%H:%M:%S')} router {args.router}: {err.code.name}: {err.message}"
            return Text(msg, style="red"), json.dumps({"error": err.code.name, "message": err.message}), False
        stamp = time.strftime("%H:%M:%S")
        return view(resp, args.wide), f'{{"time": "{stamp}", "status": {status_json(resp, True)}}}', healthy(resp)

    done, ok = 0, True
    try:
        if args.json or not sys.stdout.isatty():
            while not args.count or done < args.count:
                shown, line, ok = fetch()
                done += 1
                if args.json:
                    print(line, flush=True)
                else:
                    console().print(shown)
                if not args.count or done < args.count:
                    time.sleep(args.interval)
            return 0 if ok else 1
        with Live(Text("asking the router…"), console=console(), auto_refresh=False) as live:
            while not args.count or done < args.count:
                shown, _, ok = fetch()
                done += 1
                live.update(shown, refresh=True)
                if not args.count or done < args.count:
                    time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return 0 if ok else 1
