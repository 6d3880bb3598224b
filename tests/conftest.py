"""Shared fixtures: `procs` starts real shard/router processes and kills them at teardown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.devcluster import Dev
from tests.procs import Procs


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def devs() -> Iterator[list[Dev]]:
    """`shardstate dev` clusters a test starts (append to the list); killed at teardown."""
    started: list[Dev] = []
    yield started
    for d in started:
        d.kill()
