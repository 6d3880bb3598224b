"""`shardstate dev` as a child process for tests (shardstate.server.launch.Dev): started on
port 0, its router address read from what it prints, killed with every child it started at
teardown."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from shardstate.server import launch

START_TIMEOUT_S = 120.0  # generous: the machine is shared; never asserted


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it has exited all the same.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """`shardstate ARGS...`, its output captured as text."""
    return subprocess.run(launch.shardstate_cmd(*args), capture_output=True, text=True, timeout=timeout)


class Dev(launch.Dev):
    def __init__(self, data: Path, *extra: str) -> None:
        super().__init__(data, *extra, err_path=data.parent / f"{data.name}-dev.err")
        self.router = self.wait_router(START_TIMEOUT_S)

    def child_pids(self) -> list[int]:
        return list(self.node_pids().values())
