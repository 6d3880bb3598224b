"""Shards and a router with tokens on, as real processes, for the auth and limits tests: a token
file (hashed) and a cluster token in the test's directory, the tokens themselves kept here."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from shardstate.common import auth
from tests.procs import Proc, Procs

CLUSTER_TOKEN = "cluster-" + "x" * 24  # what the test's nodes share (a test never prints it)


def write_token_file(path: Path, tokens: Mapping[str, tuple[str, Sequence[str]]], limits: str = "") -> None:
    """tokens: token -> (role, namespace patterns); `limits`: [namespace.X] tables as TOML."""
    entries = [auth.token_entry(auth.hash_token(token), role, list(ns), f"t{i}")
               for i, (token, (role, ns)) in enumerate(tokens.items())]
    text = "\n".join(entries)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n" + limits)
    os.replace(tmp, path)  # atomic: a server never reads half of it


class AuthCluster:
    """`shards` primaries (s1..), `replicas` replicas of s1, one router; all with auth on."""

    def __init__(self, procs: Procs, tokens: Mapping[str, tuple[str, Sequence[str]]], limits: str = "",
                 shards: int = 2, replicas: int = 0, shard_args: Sequence[str] = (),
                 router_args: Sequence[str] = ()) -> None:
        self.procs = procs
        self.tokens = dict(tokens)
        self.limits = limits
        self.token_file = procs.tmp / "tokens.toml"
        self.cluster_file = procs.tmp / "cluster-token"
        self.cluster_file.write_text(CLUSTER_TOKEN + "\n")
        self.write()
        args = ["--auth-file", str(self.token_file), "--cluster-token-file", str(self.cluster_file)]
        self.args = args
        self.shards: list[Proc] = [procs.shard(f"s{i}", *args, *shard_args) for i in range(1, shards + 1)]
        self.replicas: list[Proc] = [procs.shard("s1", "--replica-of", self.shards[0].address, *args, *shard_args)
                                     for _ in range(replicas)]
        self.router = procs.router([s.address for s in self.shards + self.replicas], *args, *router_args)

    def write(self) -> None:
        write_token_file(self.token_file, self.tokens, self.limits)
