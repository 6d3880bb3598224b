"""Real shard and router processes for tests: start on port 0, wait until healthy, kill -9
(shardstate.server.launch does the starting and waiting).

`Procs` tracks every process a test starts and kills what is left at teardown.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from shardstate.server import launch


class Proc(launch.Node):
    """One `shardstate <kind> ...` child process bound to 127.0.0.1:0, its port file and log
    in the test's directory."""

    def __init__(self, kind: str, args: Sequence[str], workdir: Path, name: str) -> None:
        super().__init__(kind, args, port_file=workdir / f"{name}.port", log_path=workdir / f"{name}.log", name=name)
        self.workdir = workdir


class Procs:
    """Factory for a test's processes; `close()` kills whatever still runs."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[Proc] = []

    def shard(self, shard_id: str, *extra: str, data_dir: Path | None = None, start: bool = True,
              name: str | None = None) -> Proc:
        name = name or f"shard-{shard_id}-{len(self.all)}"
        data = data_dir or (self.tmp / f"{name}-data")
        p = Proc("shard", ["--id", shard_id, "--data-dir", str(data), *extra], self.tmp, name)
        p.data_dir = data
        self.all.append(p)
        return p.start() if start else p

    def router(self, seeds: Sequence[str], *extra: str, start: bool = True) -> Proc:
        name = f"router-{len(self.all)}"
        p = Proc("router", ["--seeds", ",".join(seeds), *extra], self.tmp, name)
        self.all.append(p)
        return p.start() if start else p

    def close(self) -> None:
        for p in self.all:
            if p.alive():
                p.kill()
