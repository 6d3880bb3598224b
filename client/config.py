"""Typed configuration of every process, with documented defaults and `validate()`.

Each field becomes a command-line flag (`--max-value-bytes`) whose default comes from the
environment variable `SHARDSTATE_MAX_VALUE_BYTES`, then from the dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_type_hints

from shardstate.errors import InvalidArgumentError

T = TypeVar("T")
MiB = 1024 * 1024
COMPRESSIONS = ("none", "snappy")


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field: its default and what it means (and risks)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Limits:
    """What one request or session may hold. Beyond a limit the caller gets INVALID_ARGUMENT
    or RESOURCE_EXHAUSTED naming the limit; nothing is written."""

    max_session_id_bytes: int = opt(256, "longest session id, in UTF-8 bytes")
    max_namespace_bytes: int = opt(256, "longest namespace, in UTF-8 bytes (\"\" is the namespace \"default\")")
    max_key_bytes: int = opt(1024, "longest key, in UTF-8 bytes")
    max_stream_name_bytes: int = opt(256, "longest log stream name, in UTF-8 bytes")
    max_value_bytes: int = opt(1 * MiB, "largest value or log entry")
    max_request_bytes: int = opt(4 * MiB, "largest request message (gRPC max receive size)")
    max_keys_per_session: int = opt(100_000, "keys one session may hold")
    max_session_bytes: int = opt(64 * MiB, "bytes (keys + values + log entries) one session may hold")
    max_batch_ops: int = opt(1000, "ops in one Batch or Txn, entries in one Append")
    max_page: int = opt(1000, "largest page of Scan, ReadLog and ListSessions")

    def validate(self) -> None:
        for f in dataclasses.fields(Limits):  # not self: subclasses add non-numeric fields
            if getattr(self, f.name) <= 0:
                raise InvalidArgumentError(f"{f.name} must be positive, got {getattr(self, f.name)}")
        if self.max_value_bytes > self.max_request_bytes:
            raise InvalidArgumentError(
                f"max_value_bytes ({self.max_value_bytes}) cannot exceed max_request_bytes ({self.max_request_bytes})"
            )


@dataclass
class ShardConfig(Limits):
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
    changelog_retention: int = opt(100_000, "change-log entries kept for replicas, watches and migration")
    changelog_retention_s: int = opt(3600, "oldest change-log entry age kept, seconds")
    idempotency_window_s: int = opt(600, "how long a request_id's response is kept for retries")
    sweep_interval_s: float = opt(1.0, "how often the expiry sweeper runs")
    grace_s: float = opt(10.0, "graceful shutdown: time in-flight requests get to finish")
    port_file: str = opt("", "write the bound port to this file once serving (for tests and dev)")
    cluster: str = opt("", "cluster file (TOML) to adopt at start")
    background_replica: bool = opt(False, "while this node is a replica, run its threads at the lowest CPU priority (Linux SCHED_IDLE): catching up uses only CPU the primaries and routers on the same machine leave idle (shardstate dev sets it). Replication lag grows while the machine is saturated (shown by admin status). A promotion returns the node to normal priority, which needs root, CAP_SYS_NICE or RLIMIT_NICE; without, it logs a warning and stays in the background until restarted")

    def validate(self) -> None:
        super().validate()
        if not self.id:
            raise InvalidArgumentError("--id is required: the shard id the cluster map knows it by")
        if ":" not in self.listen:
            raise InvalidArgumentError(f"--listen must be HOST:PORT, got {self.listen!r}")
        if self.min_replica_acks < 0:
            raise InvalidArgumentError("--min-replica-acks cannot be negative")
        if not 0 <= self.compaction_nice <= 19:
            raise InvalidArgumentError(f"--compaction-nice must be 0..19 (a nice value), got {self.compaction_nice}")
        if self.compression not in COMPRESSIONS:
            raise InvalidArgumentError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")


@dataclass
class RouterConfig:
    """One router process: holds only the cluster map."""

    listen: str = opt("127.0.0.1:7400", "host:port to serve on; port 0 picks a free one")
    seeds: str = opt("", "comma-separated node addresses to learn the cluster map from")
    cluster: str = opt("", "cluster file (TOML); its map is published to the shards if newer")
    max_hops: int = opt(3, "WrongShard redirects followed per request before giving up")
    refresh_interval_s: float = opt(5.0, "how often the router re-reads the cluster map from the shards")
    max_batch_ops: int = opt(1000, "ops in one Batch (checked before splitting it across shards)")
    shard_pipeline: bool = opt(True, "send sub-batches over one long-lived Pipeline stream per shard (off: unary Batch)")
    forward_timeout_s: float = opt(10.0, "deadline for a forwarded call when the caller set none")
    max_request_bytes: int = opt(4 * MiB, "largest request message")
    grace_s: float = opt(10.0, "graceful shutdown: time in-flight requests get to finish")
    port_file: str = opt("", "write the bound port to this file once serving")

    def validate(self) -> None:
        if ":" not in self.listen:
            raise InvalidArgumentError(f"--listen must be HOST:PORT, got {self.listen!r}")
        if not self.seeds and not self.cluster:
            raise InvalidArgumentError("give --seeds ADDR[,ADDR...] or --cluster FILE")
        if self.max_hops < 1:
            raise InvalidArgumentError("--max-hops must be at least 1")


def env_name(name: str) -> str:
    return "SHARDSTATE_" + name.upper()


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """One flag per field of the config dataclass `cls`, defaulting to its env variable."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        env = env_name(f.name)
        default = f.default
        if env in os.environ:
            default = _parse_bool(os.environ[env]) if typ is bool else typ(os.environ[env])
        helptext = f"{f.metadata.get('help', '')} [env {env}; default {f.default!r}]"
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, type=typ, default=default, help=helptext)


def from_args(cls: type[T], ns: argparse.Namespace) -> T:
    vals = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}  # type: ignore[arg-type]
    return cls(**vals)
