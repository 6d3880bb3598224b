"""What the LangGraph integration tests share: one `shardstate dev` cluster per test module
(2 shards, no replicas) and fresh key prefixes, so tests never see each other's threads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.devcluster import Dev
from tests.stubs import uid


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dev = Dev(Path(tmp_path_factory.mktemp("lg")) / "dev", "--shards", "2", "--replicas", "0")
    try:
        yield dev.router
    finally:
        dev.kill()


def fresh_prefix() -> str:
    return f"{uid('lg')}/"
