"""The shard process's configuration: one flag (and SHARDSTATE_ variable) per field."""

from __future__ import annotations

from dataclasses import dataclass

from shardstate.common.authconfig import AuthOptions
from shardstate.common.config import Limits, opt
from shardstate.common.errors import InvalidArgumentError
from shardstate.common.obsconfig import Observability
from shardstate.common.tlsconfig import TlsConfig

COMPRESSIONS = ("none", "snappy")


@dataclass
class ShardConfig(Limits, Observability, TlsConfig, AuthOptions):
    """One shard process (a primary, or a replica with --replica-of)."""

    id: str = opt("", "shard id (required); placement hashes ids, never addresses")
    listen: str = opt("127.0.0.1:7401", "host:port to serve on; port 0 picks a free one")
    data_dir: str = opt("./shard-data", "LevelDB directory; everything the shard knows lives here")
    replica_of: str = opt("", "address of the primary to follow (makes this shard a replica)")
    min_replica_acks: int = opt(0, "replicas that must persist a write before it is acknowledged (0 = asynchronous)")
    replica_ack_timeout_s: float = opt(5.0, "with --min-replica-acks: how long a write waits for replica acks before the caller gets UNAVAILABLE (the write stays durable on the primary)")
    compression: str = opt("none", "LevelDB block compression: none, or snappy (smaller files for compressible values such as JSON, more CPU per write and compaction; set it when the store is created or later, both read back)")
    fsync: bool = opt(False, "sync every write to disk (survives power loss; writes are group-committed). Off: a killed process loses nothing, a power cut may")
    compaction_nice: int = opt(10, "nice value (0-19) of LevelDB's flush and compaction thread: above 0 that work yields the CPU to requests when both want it, so a flush or compaction does not stall the writes around it; LevelDB still slows writes down itself when compaction falls behind. 0 = same priority as requests")
    block_cache_mib: int = opt(64, "LevelDB's block cache, MiB: table blocks read recently, kept uncompressed (a read of a cached block touches no file)")
    write_buffer_mib: int = opt(32, "LevelDB's memtable, MiB (each process draws its size within +-25%% of it); a full one is flushed to a level-0 file while the next fills, so up to two are in memory")
    max_open_files: int = opt(1000, "LevelDB table files kept open; each holds its index and bloom filter in memory (a read of a table not open opens it first)")
    session_cache: int = opt(20_000, "sessions whose metadata and encoded names the shard keeps in memory (reads of other sessions read LevelDB)")
    record_cache: int = opt(16_384, "values of up to 4 KiB the shard keeps in memory after reading or writing them")
    changelog_retention: int = opt(100_000, "change-log entries kept for replicas, watches and migration")
    changelog_retention_s: int = opt(3600, "oldest change-log entry age kept, seconds")
    idempotency_window_s: int = opt(600, "how long a request_id's response is kept for retries")
    sweep_interval_s: float = opt(1.0, "how often the expiry sweeper runs")
    migration_rate_bytes_s: int = opt(0, "rebalancing: the most snapshot bytes per second this shard sends to one migration target (0 = no limit), so that copying sessions away leaves the shard's CPU and disk to its callers")
    moved_data_grace_s: float = opt(60.0, "rebalancing: how long a shard keeps the sessions that moved away before deleting its copy (routers still holding the old map are sent on meanwhile)")
    grace_s: float = opt(10.0, "graceful shutdown: time in-flight requests get to finish")
    port_file: str = opt("", "write the bound port to this file once serving (for tests and dev)")
    cluster: str = opt("", "cluster file (TOML) to adopt at start")
    usage_poll_s: float = opt(1.0, "with namespace limits on sessions or bytes: how often a primary asks the other primaries what they hold of each limited namespace (a write is refused when this shard's exact figure plus theirs as last heard would pass the limit)")
    background_replica: bool = opt(False, "while this node is a replica, run its threads at the lowest CPU priority (Linux SCHED_IDLE): catching up uses only CPU the primaries and routers on the same machine leave idle (shardstate dev sets it). Replication lag grows while the machine is saturated (shown by admin status). A promotion returns the node to normal priority, which needs root, CAP_SYS_NICE or RLIMIT_NICE; without, it logs a warning and stays in the background until restarted")

    def validate(self) -> None:
        super().validate()
        if not self.id:
            raise InvalidArgumentError("--id is required: the shard id the cluster map knows it by")
        if ":" not in self.listen:
            raise InvalidArgumentError(f"--listen must be HOST:PORT, got {self.listen!r}")
        if self.usage_poll_s <= 0:
            raise InvalidArgumentError(f"--usage-poll-s must be positive, got {self.usage_poll_s}")
        if self.min_replica_acks < 0:
            raise InvalidArgumentError("--min-replica-acks cannot be negative")
        if not 0 <= self.compaction_nice <= 19:
            raise InvalidArgumentError(f"--compaction-nice must be 0..19 (a nice value), got {self.compaction_nice}")
        for name in ("block_cache_mib", "write_buffer_mib", "max_open_files", "session_cache", "record_cache"):
            low = 0 if name in ("session_cache", "record_cache") else (64 if name == "max_open_files" else 1)
            if getattr(self, name) < low:
                flag = "--" + name.replace("_", "-")
                raise InvalidArgumentError(f"{flag} must be at least {low}, got {getattr(self, name)}")
        if self.compression not in COMPRESSIONS:
            raise InvalidArgumentError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        self.validate_tls()
