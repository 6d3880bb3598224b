"""The router process's configuration: one flag (and SHARDSTATE_ variable) per field."""

from __future__ import annotations

from dataclasses import dataclass

from shardstate.common.authconfig import AuthOptions
from shardstate.common.config import MiB, opt
from shardstate.common.errors import InvalidArgumentError
from shardstate.common.obsconfig import Observability
from shardstate.common.tlsconfig import TlsConfig


@dataclass
class RouterConfig(Observability, TlsConfig, AuthOptions):
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
    max_response_bytes: int = opt(16 * MiB, "byte budget of the answer to one Batch or Pipeline message when the caller asks for none (BatchRequest.max_response_bytes = 0), and the most a caller may ask for: split in equal shares over the shards a batch goes to; ops past a shard's share are answered unprocessed (not run), for the caller to send again")
    grace_s: float = opt(10.0, "graceful shutdown: time in-flight requests get to finish")
    port_file: str = opt("", "write the bound port to this file once serving")

    def validate(self) -> None:
        if ":" not in self.listen:
            raise InvalidArgumentError(f"--listen must be HOST:PORT, got {self.listen!r}")
        if not self.seeds and not self.cluster:
            raise InvalidArgumentError("give --seeds ADDR[,ADDR...] or --cluster FILE")
        if self.max_hops < 1:
            raise InvalidArgumentError("--max-hops must be at least 1")
        if self.max_response_bytes < 1:
            raise InvalidArgumentError(f"--max-response-bytes must be positive, got {self.max_response_bytes}")
        self.validate_tls()
