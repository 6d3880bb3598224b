"""`shardstate admin status` and `watch-status` against real processes (a primary, its replica,
a router): the table fits 80 columns and names every node with its role and sessions, a dead
node makes the exit status 1 and is named under the table, `--json` answers parse, and
`watch-status --json --count N` prints N refreshes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator

import grpc
import pytest
from rich.console import Console

from shardstate import Client
from shardstate.server.cli.status import view
from shardstate.v1 import admin_pb2, admin_pb2_grpc
from tests.procs import Proc, Procs
from tests.replicas import run_cli, wait_for

T = 30.0
SESSIONS = 5


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc, Proc]]:
    procs = Procs(tmp_path_factory.mktemp("status"))
    try:
        primary = procs.shard("s1")
        replica = procs.shard("s1", "--replica-of", primary.address)
        router = procs.router([primary.address])
        with Client(router.address, timeout=T) as c:
            for i in range(SESSIONS):
                c.session(f"st-{i}").put("k", b"v")
        yield primary, replica, router
    finally:
        procs.close()


def status(router: Proc) -> admin_pb2.StatusResponse:
    with grpc.insecure_channel(router.address) as ch:
        return admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=T)


def status_when(router: Proc, ok: Callable[[admin_pb2.StatusResponse], bool], what: str) -> admin_pb2.StatusResponse:
    def probe() -> admin_pb2.StatusResponse | None:
        resp = status(router)
        return resp if ok(resp) else None

    return wait_for(probe, what)


def rendered(resp: admin_pb2.StatusResponse, wide: bool = False, width: int = 80) -> list[str]:
    con = Console(width=width, record=True, color_system=None)
    con.print(view(resp, wide))
    return con.export_text().splitlines()


def test_table_fits_80_columns_and_names_every_node(nodes: tuple[Proc, Proc, Proc]) -> None:
    primary, replica, router = nodes
    resp = status_when(router, lambda r: len(r.nodes) == 3 and all(n.up for n in r.nodes),
                       "every node up in the router's status")
    lines = rendered(resp)
    assert max(len(line) for line in lines) <= 80, lines
    rows = {n: next(line for line in lines if line.startswith(n)) for n in
            (primary.address, replica.address, router.address)}
    assert "primary" in rows[primary.address] and f" {SESSIONS} " in rows[primary.address] + " "
    assert "replica" in rows[replica.address] and re.search(r" \d+w \d+ms", rows[replica.address])
    assert "router" in rows[router.address]
    assert "uptime" in rendered(resp, wide=True, width=200)[1]

    r = run_cli("admin", "--router", router.address, "status")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("primary") == 1 and r.stdout.count("replica") == 1
    r = run_cli("admin", "--router", router.address, "status", "--json")
    got = json.loads(r.stdout)
    assert r.returncode == 0 and {n["address"] for n in got["nodes"]} == set(rows)


def test_watch_status_json_prints_one_line_per_refresh(nodes: tuple[Proc, Proc, Proc]) -> None:
    router = nodes[2]
    r = run_cli("admin", "--router", router.address, "watch-status", "--json", "--count", "3",
                "--interval", "0.1")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 3
    assert all(len(line["status"]["nodes"]) == 3 and line["time"] for line in lines)
    r = run_cli("admin", "--router", router.address, "watch-status", "--count", "2", "--interval", "0.1")
    assert r.returncode == 0 and r.stdout.count("map epoch") == 2


def test_a_dead_node_is_named_and_fails_the_exit_status(nodes: tuple[Proc, Proc, Proc]) -> None:
    _, replica, router = nodes
    replica.kill()
    resp = status_when(router, lambda r: any(not n.up for n in r.nodes), "the router to see the replica down")
    text = "\n".join(rendered(resp))
    assert f"{replica.address} is down" in text and "DOWN" in text
    r = run_cli("admin", "--router", router.address, "status")
    assert r.returncode == 1 and f"{replica.address} is down" in r.stdout
    r = run_cli("admin", "--router", router.address, "watch-status", "--json", "--count", "1", "--interval", "0")
    assert r.returncode == 1 and not all(n.get("up") for n in json.loads(r.stdout)["status"]["nodes"])


def test_watch_status_reports_a_router_that_does_not_answer() -> None:
    r = run_cli("admin", "--router", "127.0.0.1:1", "watch-status", "--json", "--count", "1", "--interval", "0")
    assert r.returncode == 1
    line = json.loads(r.stdout)
    assert line["error"] == "UNAVAILABLE" and line["message"]
