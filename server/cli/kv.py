"""`shardstate get/put/ls --router ADDR ...`: poke at data from a shell with plain stubs.

Values are printed as they are stored (bytes to stdout); errors print their status code and
message on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from shardstate.common import errors, tls
from shardstate.common.authconfig import add_token_arguments, token_of
from shardstate.common.authwire import with_token
from shardstate.v1 import state_pb2, state_pb2_grpc

from . import tlsopts

TIMEOUT_S = 30.0
DEFAULT_ROUTER = "127.0.0.1:7400"


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"shardstate {prog}", description=description)
    p.add_argument("--router", default=os.environ.get("SHARDSTATE_ROUTER", DEFAULT_ROUTER),
                   help=f"router address [env SHARDSTATE_ROUTER; default {DEFAULT_ROUTER}]")
    p.add_argument("--namespace", "-n", default="", help="namespace (default: 'default')")
    tlsopts.add(p)
    add_token_arguments(p)
    return p


def _run(prog: str, a: argparse.Namespace, fn: Callable[[state_pb2_grpc.StateStub], int]) -> int:
    if not tlsopts.use(prog, a):
        return 2
    token = token_of(a)
    with tls.channel(a.router) as ch:
        try:
            return fn(state_pb2_grpc.StateStub(with_token(ch, token)))
        except grpc.RpcError as e:
            err = errors.from_rpc_error(e)
            print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
            return 1


def _out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    if not data.endswith(b"\n") and sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


def get_main(argv: list[str]) -> int:
    p = _parser("get", "Print the value of one key of a session.")
    p.add_argument("session")
    p.add_argument("key")
    p.add_argument("--meta", action="store_true", help="print version and expiry on stderr too")
    a = p.parse_args(argv)

    def call(st: state_pb2_grpc.StateStub) -> int:
        resp = st.Get(state_pb2.GetRequest(namespace=a.namespace, session_id=a.session, key=a.key), timeout=TIMEOUT_S)
        if not resp.found:
            print(f"not found: {a.session}/{a.key}", file=sys.stderr)
            return 1
        if a.meta:
            r = resp.record
            print(f"version={r.version} expires_at_ms={r.expires_at_ms} shard={resp.header.shard_id}", file=sys.stderr)
        _out(resp.record.value)
        return 0

    return _run("get", a, call)


def put_main(argv: list[str]) -> int:
    p = _parser("put", "Write one key of a session; prints the new version.")
    p.add_argument("session")
    p.add_argument("key")
    p.add_argument("value", help="the value; '-' reads it from stdin")
    p.add_argument("--ttl-ms", type=int, default=0, help="key TTL in milliseconds")
    p.add_argument("--session-ttl-ms", type=int, default=0, help="session expires this long after the write")
    p.add_argument("--expect", type=int, default=None,
                   help="compare-and-swap: write only if the current version is this (0 = only if absent)")
    a = p.parse_args(argv)
    value = sys.stdin.buffer.read() if a.value == "-" else a.value.encode()

    def call(st: state_pb2_grpc.StateStub) -> int:
        req = state_pb2.PutRequest(namespace=a.namespace, session_id=a.session, key=a.key, value=value,
                                   ttl_ms=a.ttl_ms, session_ttl_ms=a.session_ttl_ms)
        if a.expect is not None:
            req.expected_version = a.expect
        resp = st.Put(req, timeout=TIMEOUT_S)
        if not resp.applied:
            cur = resp.current.version if resp.HasField("current") else 0
            print(f"conflict: the current version is {cur}, not {a.expect}", file=sys.stderr)
            return 1
        print(resp.version)
        return 0

    return _run("put", a, call)


def _sessions(st: state_pb2_grpc.StateStub, ns: str, prefix: str) -> Iterator[Any]:
    token = ""
    while True:
        resp = st.ListSessions(state_pb2.ListSessionsRequest(namespace=ns, prefix=prefix, limit=1000, page_token=token),
                               timeout=TIMEOUT_S)
        yield from resp.sessions
        token = resp.next_page_token
        if not token:
            return


def _records(st: state_pb2_grpc.StateStub, ns: str, sid: str, prefix: str) -> Iterator[Any]:
    token = ""
    while True:
        resp = st.Scan(state_pb2.ScanRequest(namespace=ns, session_id=sid, prefix=prefix, limit=1000, page_token=token),
                       timeout=TIMEOUT_S)
        yield from resp.records
        token = resp.next_page_token
        if not token:
            return


def _preview(v: bytes, n: int = 60) -> str:
    text = v.decode("utf-8", "backslashreplace")
    return text if len(text) <= n else text[: n - 1] + "…"


def ls_main(argv: list[str]) -> int:
    p = _parser("ls", "List the sessions of a namespace, or the keys of one session.")
    p.add_argument("session", nargs="?", help="list this session's keys instead of sessions")
    p.add_argument("--prefix", default="", help="only session ids (or keys) starting with this")
    p.add_argument("--plain", action="store_true", help="one id (or key) per line, no table")
    a = p.parse_args(argv)

    def call(st: state_pb2_grpc.StateStub) -> int:
        rows: list[tuple[str, ...]]
        header: tuple[str, ...]
        if a.session is None:
            rows = [(s.session_id, str(s.key_count), str(s.bytes), s.shard_id, str(s.expires_at_ms or ""))
                    for s in _sessions(st, a.namespace, a.prefix)]
            header = ("session", "keys", "bytes", "shard", "expires_at_ms")
        else:
            rows = [(r.key, str(r.version), str(len(r.value)), _preview(r.value))
                    for r in _records(st, a.namespace, a.session, a.prefix)]
            header = ("key", "version", "bytes", "value")
        if a.plain or not sys.stdout.isatty():
            for row in rows:
                print("\t".join(row) if not a.plain else row[0])
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table(*header)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        print(f"{len(rows)} {'sessions' if a.session is None else 'keys'}")
        return 0

    return _run("ls", a, call)
