"""Ring placement: balance within ±15% of a fair share and minimal movement on growth."""

from __future__ import annotations

from collections import Counter

import pytest

from shardstate.common.ring import Ring

IDS = [f"agent-{i}" for i in range(100_000)]


@pytest.mark.parametrize("n", [3, 4, 5, 8, 12, 16])
def test_each_shard_within_15_percent_of_its_share(n: int) -> None:
    ring = Ring({f"s{i}": 1 for i in range(n)})
    counts = Counter(ring.owner("default", sid) for sid in IDS)
    share = len(IDS) / n
    assert set(counts) == {f"s{i}" for i in range(n)}
    for shard, count in counts.items():
        assert abs(count - share) / share <= 0.15, (shard, count, share)


@pytest.mark.parametrize("n", [3, 5, 8, 15])
def test_adding_a_shard_moves_about_one_share(n: int) -> None:
    before = Ring({f"s{i}": 1 for i in range(n)})
    after = Ring({f"s{i}": 1 for i in range(n + 1)})
    moved = [sid for sid in IDS if before.owner("default", sid) != after.owner("default", sid)]
    frac = len(moved) / len(IDS)
    assert 0.7 / (n + 1) <= frac <= 1.3 / (n + 1)
    # everything that moved went to the new shard
    assert {after.owner("default", sid) for sid in moved} == {f"s{n}"}


def test_weight_doubles_the_share() -> None:
    ring = Ring({"a": 1, "b": 1, "c": 2})
    counts = Counter(ring.owner("default", sid) for sid in IDS[:40_000])
    assert 0.4 <= counts["c"] / 40_000 <= 0.6


def test_namespace_is_part_of_the_routing_key() -> None:
    ring = Ring({f"s{i}": 1 for i in range(8)})
    differ = sum(ring.owner("a", sid) != ring.owner("b", sid) for sid in IDS[:2000])
    assert differ > 1000


def test_empty_ring_raises() -> None:
    with pytest.raises(LookupError):
        Ring({}).owner("default", "x")
