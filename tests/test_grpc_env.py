"""shardstate.grpc_env: the grpcio transport setting every shardstate process starts with."""

from __future__ import annotations

import os
import subprocess
import sys

from shardstate import grpc_env

# A real server and channel in a fresh interpreter that imports shardstate before grpc.
PROBE = """
import asyncio, os, shardstate, grpc
from grpc import aio
print(os.environ.get("GRPC_EXPERIMENTS"))

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


def _probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)


def _env_without_experiments() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}


def test_import_sets_the_experiments_and_grpcio_knows_them() -> None:
    out = _probe(_env_without_experiments())
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [grpc_env.EXPERIMENTS, "connected"]
    # grpcio logs "Unknown experiment: NAME" for names it no longer has.
    assert "Unknown experiment" not in out.stderr


def test_a_set_variable_wins_and_empty_keeps_grpcio_defaults() -> None:
    for value in ("", "-event_engine_client"):
        out = _probe({**_env_without_experiments(), "GRPC_EXPERIMENTS": value})
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == [value, "connected"]


def test_tune_leaves_the_environment_alone_once_grpc_is_loaded() -> None:
    import grpc  # noqa: F401  (loaded by the test process already; made explicit)

    env: dict[str, str] = {}
    assert grpc_env.tune(env) is False
    assert env == {}


def test_tune_sets_it_only_when_unset() -> None:
    saved = sys.modules.pop("grpc")
    try:
        env: dict[str, str] = {}
        assert grpc_env.tune(env) is True
        assert env == {"GRPC_EXPERIMENTS": grpc_env.EXPERIMENTS}
        env = {"GRPC_EXPERIMENTS": ""}
        assert grpc_env.tune(env) is False
        assert env == {"GRPC_EXPERIMENTS": ""}
    finally:
        sys.modules["grpc"] = saved
