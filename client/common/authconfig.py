"""The auth flags every server process takes (shard and router alike): the token file and the
cluster token (docs/design.md §15); auth is off unless a token file or SHARDSTATE_TOKENS is given."""

from __future__ import annotations

from dataclasses import dataclass

from .config import opt


@dataclass
class AuthOptions:
    auth_file: str = opt("", "token file (TOML: [[token]] sha256/role/namespaces, [namespace.NAME] limits); with it (or SHARDSTATE_TOKENS holding the same text) every call needs 'authorization: Bearer TOKEN'. Re-read when it changes (checked at most once a second)")
    cluster_token_file: str = opt("", "file holding the cluster token (or SHARDSTATE_CLUSTER_TOKEN): routers and replicas send it to shards; with auth on, shards take node-to-node calls (Replication, PublishClusterMap, SwapClusterMap) only with it. The same on every node")
