"""shardstate.bench.tails: LevelDB LOG parsing and setting slow ops against its background work."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shardstate.bench.tails import Event, attribute, leveldb_events, node_events

T0 = 1_790_000_000.0  # an epoch second; LOG lines carry local time, as LevelDB writes them


def stamp(t: float) -> str:
    lt = time.localtime(int(t))
    return time.strftime("%Y/%m/%d-%H:%M:%S", lt) + f".{round((t - int(t)) * 1e6):06d}"


def line(t: float, msg: str) -> str:
    return f"{stamp(t)} 140204436281024 {msg}"


LOG = "\n".join([
    line(T0, "Recovering log #3"),
    line(T0 + 1.0, "Level-0 table #7: started"),
    line(T0 + 1.25, "Level-0 table #7: 28568657 bytes OK"),
    line(T0 + 2.0, "Compacting 4@0 + 0@1 files"),
    # a flush inside a compaction (LevelDB flushes a full memtable between compaction outputs)
    line(T0 + 2.1, "Level-0 table #9: started"),
    line(T0 + 2.2, "Level-0 table #9: 28561372 bytes OK"),
    line(T0 + 2.5, "Generated table #10@0: 1737 keys, 2131451 bytes"),
    line(T0 + 2.75, "Compacted 4@0 + 0@1 files => 71204316 bytes"),
    "not a LevelDB line",
    line(T0 + 3.0, "Level-0 table #11: started"),  # still running when the LOG was read
])


def test_leveldb_events_pairs_starts_and_ends() -> None:
    events = leveldb_events(LOG)
    assert [(e.kind, round(e.start - T0, 3), round(e.end - T0, 3)) for e in events] == [
        ("flush", 1.0, 1.25),
        ("flush", 2.1, 2.2),
        ("compaction", 2.0, 2.75),
    ]


def test_node_events_reads_each_nodes_log(tmp_path: Path) -> None:
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "LOG").write_text(LOG)
    got = node_events(tmp_path, ["s1", "s2"])
    assert len(got["s1"]) == 3
    assert got["s2"] == []  # no LOG: no events, not an error


def test_attribute_finds_the_work_behind_the_slow_ops() -> None:
    flush = Event("flush", T0 + 10.0, T0 + 11.0)
    compaction = Event("compaction", T0 + 30.0, T0 + 31.0)
    # far from both events, before and after the flush (the window spans it whole)
    fast = [(T0 + base + i * 0.01, 0.001) for base in (1.0, 20.0) for i in range(50)]
    slow = [(T0 + 10.1 + i * 0.05, 0.05) for i in range(10)]  # all during the flush
    result = attribute(fast + slow, {"s1": [flush, compaction]}, quantile=0.9)
    assert result.ops == 110 and result.tail_ops == 10
    assert result.threshold_ms == pytest.approx(1.0)
    rows = {(r.node, r.kind): r for r in result.rows}
    f = rows[("s1", "flush")]
    assert f.share_all == pytest.approx(10 / 110)
    assert f.share_tail == 1.0
    assert f.enrichment == pytest.approx(11.0)
    c = rows[("s1", "compaction")]
    assert c.share_all == 0.0 and c.share_tail == 0.0 and c.enrichment is None
    assert c.busy_s == 0.0  # after the last op ended: outside the measured window
    assert f.busy_s == pytest.approx(1.0)
    assert result.clear_share == pytest.approx(100 / 110)
    assert result.clear_quantile_ms == pytest.approx(1.0)


def test_attribute_counts_an_op_spanning_an_event_edge() -> None:
    ev = Event("compaction", T0 + 5.0, T0 + 6.0)
    ops = [
        (T0 + 5.01, 0.02),  # started before the event, ended inside it
        (T0 + 6.001, 0.0005),  # started 0.5 ms after it ended: within the slack
        (T0 + 7.0, 0.01),  # clear of it
    ]
    result = attribute(ops, {"s2": [ev]}, quantile=0.5)
    assert result.rows[0].share_all == pytest.approx(2 / 3)
    assert result.clear_share == pytest.approx(1 / 3)


def test_attribute_needs_ops() -> None:
    with pytest.raises(ValueError, match="no ops"):
        attribute([], {})
