"""The auth flags every server process takes (shard and router alike): the token file and the
cluster token (docs/design.md §15); auth is off unless a token file or SHARDSTATE_TOKENS is given.
And the client side's: `--token` / `--token-file`, taken by every command that calls a cluster
(get/put/ls, admin, bench)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from . import auth
from .config import opt


@dataclass
class AuthOptions:
    auth_file: str = opt("", "token file (TOML: [[token]] sha256/role/namespaces, [namespace.NAME] limits); with it (or SHARDSTATE_TOKENS holding the same text) every call needs 'authorization: Bearer TOKEN'. Re-read when it changes (checked at most once a second)")
    cluster_token_file: str = opt("", "file holding the cluster token (or SHARDSTATE_CLUSTER_TOKEN): routers and replicas send it to shards; with auth on, shards take node-to-node calls (Replication, PublishClusterMap, SwapClusterMap) only with it. The same on every node")


def add_token_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=None,
                   help=f"bearer token to send [env {auth.CLIENT_TOKEN_ENV}] (a file keeps it out of `ps`: --token-file)")
    p.add_argument("--token-file", default=None, help="read the token from this file's first line")


def token_of(args: argparse.Namespace) -> str | None:
    if getattr(args, "token_file", None):
        try:
            return Path(args.token_file).read_text().splitlines()[0].strip() or None
        except (OSError, IndexError) as e:
            raise SystemExit(f"error: cannot read a token from {args.token_file}: {e}") from None
    return getattr(args, "token", None) or os.environ.get(auth.CLIENT_TOKEN_ENV) or None
