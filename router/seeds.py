"""Seeds by DNS: a `--seeds` entry `host:port` whose host resolves to several addresses (a
Kubernetes headless Service resolves to every pod behind it) stands for all of them.

Resolved again at each bootstrap attempt, so pods that appear later are found. A name that
resolves to one address, or to none yet, is kept as given (gRPC resolves it when it dials;
bootstrap waits for a seed that does not answer). Only one address family is used, IPv4 when
the name has any: `localhost` is one node, not two.

`SHARDSTATE_HOSTS_FILE` names an /etc/hosts-style file (`ADDRESS NAME...` per line, `#`
comments) consulted before DNS; a name on several lines has every address given, and a name
found there is always replaced by its addresses (gRPC, which dials the seeds, does not read
that file). Tests use it to give the manifests' DNS names 127.0.0.x addresses
(docs/design.md §12).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence
from pathlib import Path

HOSTS_FILE_ENV = "SHARDSTATE_HOSTS_FILE"


def split(seed: str) -> tuple[str, str]:
    """`host:port` or `[v6]:port` → (host, port); the host without brackets."""
    host, _, port = seed.rpartition(":")
    return host.strip("[]"), port


def join(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def read_hosts(path: str | Path) -> dict[str, list[str]]:
    """name → addresses, in the file's order."""
    out: dict[str, list[str]] = {}
    for line in Path(path).read_text().splitlines():
        words = line.split("#", 1)[0].split()
        for name in words[1:]:
            out.setdefault(name.lower(), []).append(words[0])
    return out


def resolve(host: str, hosts: dict[str, list[str]] | None = None) -> list[str]:
    """Every address of `host` in one family (IPv4 when there is any), first seen first;
    [] when it does not resolve."""
    if hosts is not None and host.lower() in hosts:
        found = hosts[host.lower()]
    else:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            return []
        found = [str(info[4][0]) for info in infos]
    v4 = [a for a in found if ipaddress.ip_address(a).version == 4]
    return list(dict.fromkeys(v4 or found))


def expand(seeds: Sequence[str], hosts_file: str | None = None) -> list[str]:
    """The seeds with every name that resolves to several addresses replaced by them all."""
    path = os.environ.get(HOSTS_FILE_ENV, "") if hosts_file is None else hosts_file
    hosts = read_hosts(path) if path else None
    out: list[str] = []
    for seed in seeds:
        host, port = split(seed)
        addrs = [] if is_literal(host) else resolve(host, hosts)
        listed = hosts is not None and host.lower() in hosts
        for a in [join(a, port) for a in addrs] if len(addrs) > 1 or listed else [seed]:
            if a not in out:
                out.append(a)
    return out
