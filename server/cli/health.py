"""`shardstate health ADDRESS`: exit 0 when the node at ADDRESS answers grpc.health.v1 SERVING,
1 (saying what it answered) otherwise: the kubelet's `grpc:` probe in a command, for where that
probe cannot go. It speaks no TLS, so the secure Kubernetes overlay (deploy/k8s/secure) probes
with this (`exec:`), given the pod's own certificate files.

Health needs no token. A shard asks for a client certificate of its CA (give --tls-cert and
--tls-key), a router only for the CA.
"""

from __future__ import annotations

import argparse
import sys

from shardstate.server import launch

from . import tlsopts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardstate health", description=(
        "Exit 0 when ADDRESS answers grpc.health.v1 SERVING, else 1: a probe command."))
    p.add_argument("address", help="HOST:PORT of a shard or router (the name its certificate carries, with TLS)")
    p.add_argument("--service", default="", help="the health service name to ask about ['': the whole process]")
    p.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the check [%(default)s]")
    tlsopts.add(p)
    return p


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    if not tlsopts.use("health", a):
        return 2
    status = launch.health(a.address, a.service, a.timeout_s)
    if status != launch.SERVING:
        print(f"shardstate health: {a.address}: {status}", file=sys.stderr)
        return 1
    return 0
