"""The TLS flags: `TlsFlags` (--tls-ca, --tls-cert, --tls-key, each with its SHARDSTATE_TLS_
variable) for every command that opens channels, and `TlsConfig`, which adds the node name the
shard and router processes recognise cluster certificates by."""

from __future__ import annotations

from dataclasses import dataclass

from .config import opt
from .errors import InvalidArgumentError
from .tls import DEFAULT_NODE_NAME, TlsFiles


@dataclass
class TlsFlags:
    tls_ca: str = opt("", "TLS: PEM file of the CA that signs the cluster's certificates (peers are verified against it)")
    tls_cert: str = opt("", "TLS: PEM certificate (chain) this process presents, as a server and to the nodes it calls")
    tls_key: str = opt("", "TLS: PEM private key of --tls-cert. Certificate files are re-read when they change, without a restart")

    def tls_files(self) -> TlsFiles | None:
        """The files, None when TLS is off (no flag given)."""
        if not (self.tls_ca or self.tls_cert or self.tls_key):
            return None
        return TlsFiles(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key)


@dataclass
class TlsConfig(TlsFlags):
    """A server process: TLS needs all three files; shards then require client certificates."""

    tls_node_name: str = opt(DEFAULT_NODE_NAME, "TLS: subject CN of a cluster (node) certificate; only peers presenting one may make node-to-node calls (replication, map publication, migration) to a shard")

    def validate_tls(self) -> None:
        files = self.tls_files()
        if files is None:
            return
        files.validate(server=True)
        if not self.tls_node_name:
            raise InvalidArgumentError("--tls-node-name cannot be empty with TLS on")
