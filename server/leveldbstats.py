"""LevelDB's own figures for Prometheus: files and size per level, compaction time and bytes
read and written per level (since the store was opened), the memtables' memory.

They come from LevelDB's `leveldb.stats` and `leveldb.approximate-memory-usage` properties,
read at scrape time. LevelDB prints sizes in whole MiB, so the byte figures move in MiB steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardstate.common.metrics import Registry

MIB = 1 << 20


@dataclass(frozen=True)
class LevelStats:
    level: int
    files: int
    size_bytes: int
    compaction_s: float
    read_bytes: int
    written_bytes: int


def parse_stats(text: str) -> list[LevelStats]:
    """The rows of LevelDB's `leveldb.stats` table (levels with no files and no compactions
    are not printed by LevelDB, so they are absent here too)."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 6 or not parts[0].isdigit():
            continue
        try:
            level, files, size, secs, read, written = (int(parts[0]), int(parts[1]), float(parts[2]),
                                                       float(parts[3]), float(parts[4]), float(parts[5]))
        except ValueError:
            continue
        rows.append(LevelStats(level, files, int(size * MIB), secs, int(read * MIB), int(written * MIB)))
    return rows


def register(db: Any, registry: Registry) -> None:
    """Gauges and counters over `db` (a plyvel.DB), filled when the registry is collected."""
    files = registry.gauge("shardstate_shard_leveldb_files", "table files per LevelDB level", ("level",))
    size = registry.gauge("shardstate_shard_leveldb_level_bytes", "size of each LevelDB level", ("level",))
    secs = registry.counter("shardstate_shard_leveldb_compaction_seconds_total",
                            "time LevelDB spent compacting into each level since the store opened",
                            ("level",))
    read = registry.counter("shardstate_shard_leveldb_compaction_read_bytes_total",
                            "bytes LevelDB compactions read, by level they wrote into", ("level",))
    written = registry.counter("shardstate_shard_leveldb_compaction_written_bytes_total",
                               "bytes LevelDB compactions (and memtable flushes) wrote, by level",
                               ("level",))
    memory = registry.gauge("shardstate_shard_leveldb_memtable_bytes",
                            "memory LevelDB's memtables hold (approximate-memory-usage)")

    def refresh() -> None:
        try:
            text = (db.get_property(b"leveldb.stats") or b"").decode()
            mem = db.get_property(b"leveldb.approximate-memory-usage") or b"0"
        except RuntimeError:  # closed at shutdown
            return
        memory.set(float(int(mem)))
        for row in parse_stats(text):
            lv = str(row.level)
            files.set(row.files, level=lv)
            size.set(row.size_bytes, level=lv)
            # LevelDB keeps these cumulative; the counters take its figure as it is
            secs.values[(("level", lv),)] = row.compaction_s
            read.values[(("level", lv),)] = float(row.read_bytes)
            written.values[(("level", lv),)] = float(row.written_bytes)

    registry.on_collect(refresh)
