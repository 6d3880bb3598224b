"""shardstate.common.transport: the grpcio transport shardstate's own processes start with (the
`shardstate` command chooses it before loading grpc; the client library never does)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shardstate.common import transport

# A fresh interpreter that runs the `shardstate` command (which tunes before its subcommand
# loads grpc), then serves a real server and channel.
PROBE = """
import asyncio, os, sys
from shardstate.server import cli
from shardstate.common import transport
assert "grpc" not in sys.modules
try:
    cli.main(["admin", "--help"])
except SystemExit:
    pass
from grpc import aio
print(transport.applied or "-")
print(os.environ.get("GRPC_EXPERIMENTS", "<unset>"))

async def main():
    server = aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        await asyncio.wait_for(ch.channel_ready(), 10)
    await server.stop(None)
    print("connected")

asyncio.run(main())
"""


def _probe(env: dict[str, str]) -> tuple[list[str], str]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines(), out.stderr


def _env_without_experiments() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}


def test_the_command_loads_grpc_with_the_experiments_and_children_do_not_inherit_them() -> None:
    lines, stderr = _probe(_env_without_experiments())
    assert lines[-3:] == [transport.EXPERIMENTS, "<unset>", "connected"]
    # grpcio logs "Unknown experiment: NAME" for a name it no longer has.
    assert "Unknown experiment" not in stderr


def test_a_set_variable_wins_and_stays() -> None:
    for value in ("", "-event_engine_client"):
        lines, _ = _probe({**_env_without_experiments(), "GRPC_EXPERIMENTS": value})
        assert lines[-3:] == ["-", value, "connected"]


def test_tune_does_nothing_once_grpc_is_loaded() -> None:
    env: dict[str, str] = {}
    assert transport.tune(env) is False  # this test process has grpc loaded
    assert env == {}


def test_tune_sets_the_variable_only_while_grpc_loads() -> None:
    env: dict[str, str] = {}
    seen: list[str | None] = []
    assert transport.tune(env, loaded=lambda: False, load=lambda: seen.append(env.get("GRPC_EXPERIMENTS")))
    assert seen == [transport.EXPERIMENTS] and env == {}
    # a failing load raises and leaves the environment as it was, too
    def boom() -> None:
        raise ImportError("no grpc")

    with pytest.raises(ImportError):
        transport.tune(env, loaded=lambda: False, load=boom)
    assert env == {}
    set_env = {"GRPC_EXPERIMENTS": ""}
    assert transport.tune(set_env, loaded=lambda: False, load=boom) is False
    assert set_env == {"GRPC_EXPERIMENTS": ""}
