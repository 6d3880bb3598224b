"""Tokens, roles and per-namespace limits: the token file, its reload, and the one check that
routers and shards make of every call (docs/design.md §15). Standard library and the errors table only.

The token file (TOML; `--auth-file`, or the same text in SHARDSTATE_TOKENS):

    token      = "[[token]]" sha256 role namespaces? name?
    sha256     = 64 hex digits: sha256 of the token's UTF-8 bytes (the file holds no token)
    role       = "read" | "write" | "admin"        ; write implies read; admin both, and admin RPCs
    namespaces = [ pattern* ]                        ; "NAME" exactly, "PREFIX*" by prefix, "*" all
    name       = a label for operators (never checked, never a secret)
    limits     = "[namespace.NAME]" max_sessions? max_bytes? max_ops_per_s?   ; NAME exact; 0 = none

A caller sends `authorization: Bearer TOKEN`. The file is looked at again at most once a second,
when a call needs it, and re-read when its mtime, size or inode changed; a file that no longer
parses keeps the last good table (logged, without its contents).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shardstate.common.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    RateLimitedError,
    ShardstateError,
    UnauthenticatedError,
)
from shardstate.common.metrics import Registry
from shardstate.v1 import types_pb2

log = logging.getLogger("shardstate.auth")

READ, WRITE, ADMIN = 1, 2, 3
ROLES = {"read": READ, "write": WRITE, "admin": ADMIN}
ROLE_NAMES = {v: k for k, v in ROLES.items()}
TOKENS_ENV = "SHARDSTATE_TOKENS"  # token-file text (hashed entries), for processes without a file
CLUSTER_TOKEN_ENV = "SHARDSTATE_CLUSTER_TOKEN"  # the node-to-node token itself
CLIENT_TOKEN_ENV = "SHARDSTATE_TOKEN"  # what Client(token=None) and the CLI send
RELOAD_CHECK_S = 1.0
MIN_CLUSTER_TOKEN_CHARS = 16
MAX_BUCKETS = 100_000
LIMIT_KEYS = ("max_sessions", "max_bytes", "max_ops_per_s")
REFUSAL_REASONS = ("unauthenticated", "permission_denied", "rate_limited")

# What each State method and each BatchOp needs.
METHOD_ROLE = {
    "Get": READ, "Scan": READ, "ReadLog": READ, "GetSession": READ, "ListSessions": READ, "Watch": READ,
    "Put": WRITE, "Delete": WRITE, "Txn": WRITE, "Increment": WRITE, "Append": WRITE, "TrimLog": WRITE,
    "PopLast": WRITE, "Touch": WRITE, "DeleteSession": WRITE,
}
OP_ROLE = {  # BatchOp field name -> role
    "get": READ, "read_log": READ, "scan": READ, "get_session": READ,
    "put": WRITE, "delete": WRITE, "increment": WRITE, "append": WRITE, "txn": WRITE, "touch": WRITE,
}
OP_FIELD_ROLE = {1: READ, 2: WRITE, 3: WRITE, 4: WRITE, 5: WRITE, 6: READ, 7: WRITE, 8: READ, 9: WRITE, 10: READ}
OP_FIELD_NAME = {1: "get", 2: "put", 3: "delete", 4: "increment", 5: "append", 6: "read_log", 7: "txn",
                 8: "scan", 9: "touch", 10: "get_session"}

# Method-level policy (the server interceptor): who may call an RPC at all.
OPEN, ANY, CLUSTER = -1, 0, 4
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ANY_ADMIN = ("GetClusterMap", "Status")  # no session data: any valid token (direct mode fetches the map)
NODE_ONLY_ADMIN = ("PublishClusterMap", "SwapClusterMap")  # on a shard: the cluster token only


def method_role(method: str, node: bool) -> int:
    """What calling `/package.Service/Method` needs: OPEN (health, reflection), ANY valid token
    (State: its handler checks namespaces and roles), ADMIN, or CLUSTER (node-to-node; on a
    shard, `node=True`: Replication.* and the map's publication and swap)."""
    if method.startswith(OPEN_SERVICES):
        return OPEN
    if method.startswith("/shardstate.v1.State/"):
        return ANY
    if method.startswith("/shardstate.v1.Admin/"):
        name = method.rsplit("/", 1)[-1]
        if name in ANY_ADMIN:
            return ANY
        if node and name in NODE_ONLY_ADMIN:
            return CLUSTER
        return ADMIN
    if method.startswith("/shardstate.v1.Replication/"):
        return CLUSTER
    return ADMIN


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits), recognisable by its prefix."""
    return "sst_" + secrets.token_urlsafe(32)


def token_entry(token_hash: str, role: str, namespaces: Sequence[str], name: str = "") -> str:
    """A `[[token]]` entry of the token file, as TOML text."""
    lines = ["[[token]]"]
    if name:
        lines.append(f"name = {_toml_str(name)}")
    lines.append(f'sha256 = "{token_hash}"')
    lines.append(f'role = "{role}"')
    lines.append("namespaces = [" + ", ".join(_toml_str(n) for n in namespaces) + "]")
    return "\n".join(lines) + "\n"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---- the table ----


@dataclass(frozen=True)
class Grant:
    """What one token may do. `cluster`: the node-to-node token (everything, no ops/s limit)."""

    role: int
    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    name: str = ""
    cluster: bool = False

    def covers(self, namespace: str) -> bool:
        if namespace in self.exact:
            return True
        return any(namespace.startswith(p) for p in self.prefixes)


CLUSTER_GRANT = Grant(ADMIN, prefixes=("",), name="cluster", cluster=True)


@dataclass(frozen=True)
class NamespaceLimits:
    max_sessions: int = 0
    max_bytes: int = 0
    max_ops_per_s: float = 0.0

    @property
    def stored(self) -> bool:
        """Whether it limits what the namespace holds (checked by the shards)."""
        return bool(self.max_sessions or self.max_bytes)


@dataclass(frozen=True)
class Table:
    grants: Mapping[str, Grant] = field(default_factory=dict)  # sha256 hex -> grant
    limits: Mapping[str, NamespaceLimits] = field(default_factory=dict)  # exact namespace -> limits


def parse(text: str, source: str = "the token file") -> Table:
    """The token table in `text`; InvalidArgumentError naming the entry and field otherwise
    (never echoing a value that could be a secret)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgumentError(f"{source} is not valid TOML: {e}") from None
    unknown = sorted(set(doc) - {"token", "namespace"})
    if unknown:
        raise InvalidArgumentError(f"{source}: unknown top-level key(s) {', '.join(unknown)} (expected [[token]] and [namespace.NAME])")
    tokens = doc.get("token", [])
    if not isinstance(tokens, list):
        raise InvalidArgumentError(f"{source}: `token` must be an array of tables: write [[token]]")
    grants: dict[str, Grant] = {}
    for i, entry in enumerate(tokens, 1):
        where = f"{source}: [[token]] #{i}"
        if not isinstance(entry, dict):
            raise InvalidArgumentError(f"{where} is not a table")
        extra = sorted(set(entry) - {"sha256", "role", "namespaces", "name"})
        if extra:
            raise InvalidArgumentError(f"{where}: unknown key(s) {', '.join(extra)} (keys: sha256, role, namespaces, name)")
        digest = entry.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise InvalidArgumentError(
                f"{where}: sha256 must be the 64 hex digits of the token's sha256 (shardstate auth hash-token), "
                "never the token itself")
        digest = digest.lower()
        if digest in grants:
            raise InvalidArgumentError(f"{where}: the same sha256 appears twice")
        role = entry.get("role")
        if role not in ROLES:
            raise InvalidArgumentError(f"{where}: role must be one of read, write, admin, got {role!r}")
        patterns = entry.get("namespaces", [])
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            raise InvalidArgumentError(f"{where}: namespaces must be a list of non-empty strings (NAME or PREFIX*)")
        name = entry.get("name", "")
        if not isinstance(name, str):
            raise InvalidArgumentError(f"{where}: name must be a string")
        exact = frozenset(p for p in patterns if not p.endswith("*"))
        prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))
        if any("*" in p for p in (*exact, *prefixes)):
            raise InvalidArgumentError(f"{where}: '*' may only end a namespace pattern")
        grants[digest] = Grant(ROLES[role], exact, prefixes, name or f"token #{i}")
    spaces = doc.get("namespace", {})
    if not isinstance(spaces, dict):
        raise InvalidArgumentError(f"{source}: `namespace` must be tables: write [namespace.NAME]")
    limits: dict[str, NamespaceLimits] = {}
    for ns, entry in spaces.items():
        where = f"{source}: [namespace.{ns}]"
        if not isinstance(entry, dict):
            raise InvalidArgumentError(f"{where} is not a table")
        extra = sorted(set(entry) - set(LIMIT_KEYS))
        if extra:
            raise InvalidArgumentError(f"{where}: unknown key(s) {', '.join(extra)} (keys: {', '.join(LIMIT_KEYS)})")
        vals: dict[str, Any] = {}
        for k in LIMIT_KEYS:
            v = entry.get(k, 0)
            ok = isinstance(v, int) if k != "max_ops_per_s" else isinstance(v, (int, float)) and math.isfinite(v)
            if isinstance(v, bool) or not ok or v < 0:
                raise InvalidArgumentError(f"{where}: {k} must be a number >= 0 (0 = no limit), got {v!r}")
            vals[k] = v
        limits[ns] = NamespaceLimits(vals["max_sessions"], vals["max_bytes"], float(vals["max_ops_per_s"]))
    return Table(grants, limits)


# ---- ops/s ----


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; `take` never waits."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self.tokens = self.burst
        self.at = now

    def take(self, now: float, n: float = 1.0) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if tokens >= n:
            self.tokens = tokens - n
            return True
        self.tokens = tokens
        return False


def over_rate(namespace: str, rate: float) -> RateLimitedError:
    shown = int(rate) if rate == int(rate) else rate
    return RateLimitedError(
        f"namespace {namespace!r} is over its limit max_ops_per_s={shown} (ops per second, on this "
        "router or shard); nothing was done, retry later",
        detail=types_pb2.LimitExceeded(limit=RateLimitedError.RATE_LIMIT, value=int(rate), actual=int(rate) + 1))


# ---- the source: file and environment, reloaded on change ----


class TokenSource:
    """The table from a file (reloaded when it changes) and/or SHARDSTATE_TOKENS text."""

    def __init__(self, path: str = "", env_text: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.env_text = env_text
        self.clock = clock
        self._env_table = parse(env_text, TOKENS_ENV) if env_text else Table()
        self._stat: tuple[int, int, int] | None = None
        self._checked = clock()
        self.generation = 0
        self.table = self._merge(self._read_file() if path else Table())

    def _read_file(self) -> Table:
        st = os.stat(self.path)
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        table = parse(text, self.path)
        self._stat = (st.st_mtime_ns, st.st_size, st.st_ino)
        return table

    def _merge(self, file_table: Table) -> Table:
        env = self._env_table
        if not env.grants and not env.limits:
            return file_table
        return Table({**env.grants, **file_table.grants}, {**env.limits, **file_table.limits})

    def current(self) -> Table:
        """The table, after looking at the file again if a second has passed."""
        if self.path:
            now = self.clock()
            if now - self._checked >= RELOAD_CHECK_S:
                self._checked = now
                self._maybe_reload()
        return self.table

    def _maybe_reload(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self._stat is not None:
                log.error("token file unreadable; keeping the last tokens", extra={"fields": {"path": self.path, "error": e.strerror}})
                self._stat = None
            return
        if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stat:
            return
        try:
            table = self._read_file()
        except (OSError, ShardstateError) as e:
            self._stat = (st.st_mtime_ns, st.st_size, st.st_ino)  # logged once per change
            why = e.message if isinstance(e, ShardstateError) else str(e.strerror)
            log.error("token file not reloaded; keeping the last tokens", extra={"fields": {"path": self.path, "error": why}})
            return
        self.table = self._merge(table)
        self.generation += 1
        log.info("token file reloaded", extra={"fields": {"path": self.path, "tokens": len(table.grants),
                                                          "limited_namespaces": len(table.limits)}})


# ---- the checks ----


class Authorizer:
    """One process's tokens, limits and ops/s buckets: `gate(metadata)` for a caller,
    `gate.op(namespace, role, what)` for each op."""

    def __init__(self, source: TokenSource, cluster_token: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.clock = clock
        self._cluster_hash = hash_token(cluster_token) if cluster_token else ""
        self._seen: dict[str, Grant] = {}  # token -> grant, for the current table
        self._seen_table: Table | None = None
        self._buckets: dict[str, TokenBucket] = {}
        # calls and ops refused here, by reason (shardstate_auth_refusals_total; never a
        # token, a token's name or a namespace as a label)
        self.refusals: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)

    def refused(self, reason: str) -> None:
        self.refusals[reason] += 1

    @property
    def has_cluster_token(self) -> bool:
        return bool(self._cluster_hash)

    def grant(self, token: str | None) -> Grant:
        """The grant of `token`; UNAUTHENTICATED when there is none or it is unknown."""
        if not token:
            self.refused("unauthenticated")
            raise UnauthenticatedError("this call needs a token: send 'authorization: Bearer TOKEN' "
                                       "(Client(token=...) or SHARDSTATE_TOKEN)")
        table = self.source.current()
        if table is not self._seen_table:
            self._seen.clear()
            self._seen_table = table
        g = self._seen.get(token)
        if g is not None:
            return g
        digest = hash_token(token)
        if self._cluster_hash and secrets.compare_digest(digest, self._cluster_hash):
            g = CLUSTER_GRANT
        else:
            found = table.grants.get(digest)
            if found is None:
                self.refused("unauthenticated")
                raise UnauthenticatedError("the token is not known here (revoked, mistyped, or for another cluster)")
            g = found
        if len(self._seen) >= 10_000:
            self._seen.clear()
        self._seen[token] = g
        return g

    def gate(self, metadata: Iterable[tuple[str, Any]] | None) -> Gate:
        return Gate(self, self.grant(bearer(metadata)))

    def limits(self, namespace: str) -> NamespaceLimits | None:
        return self.source.current().limits.get(namespace)

    def admit(self, namespace: str, n: float = 1.0) -> RateLimitedError | None:
        """None, or the error for an op over the namespace's ops/s in this process."""
        lim = self.source.table.limits.get(namespace)  # current() ran in grant()
        if lim is None or not lim.max_ops_per_s:
            return None
        now = self.clock()
        b = self._buckets.get(namespace)
        if b is None or b.rate != lim.max_ops_per_s:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets.clear()
            b = self._buckets[namespace] = TokenBucket(lim.max_ops_per_s, now)
        return None if b.take(now, n) else over_rate(namespace, lim.max_ops_per_s)


def export_refusals(registry: Registry, authorizer: Authorizer | None) -> None:
    """shardstate_auth_refusals_total{reason} of a router or shard with auth on: calls and
    ops refused UNAUTHENTICATED, PERMISSION_DENIED, or RESOURCE_EXHAUSTED over max_ops_per_s
    (each op of a Batch or Pipeline message counts one)."""
    if authorizer is None:
        return
    c = registry.counter("shardstate_auth_refusals_total",
                         "calls and ops refused here: unauthenticated, permission_denied, rate_limited", ("reason",))

    def collect() -> None:
        for reason, n in authorizer.refusals.items():
            c.values[(("reason", reason),)] = float(n)

    collect()
    registry.on_collect(collect)


def denied(grant: Grant, namespace: str, role: int, what: str) -> PermissionDeniedError | None:
    """None when `grant` allows `what` (an RPC or op needing `role`) in `namespace`."""
    if not grant.covers(namespace):
        return PermissionDeniedError(f"{what}: the token does not grant namespace {namespace!r}; nothing was done")
    if grant.role < role:
        return PermissionDeniedError(
            f"{what} needs the {ROLE_NAMES[role]} role in namespace {namespace!r}; the token's role is "
            f"{ROLE_NAMES[grant.role]}; nothing was done")
    return None


class Gate:
    """One caller's grant, checked op by op (a Batch's or a Pipeline message's ops one at a time)."""

    __slots__ = ("auth", "grant")

    def __init__(self, auth: Authorizer, grant: Grant) -> None:
        self.auth = auth
        self.grant = grant

    @property
    def cluster(self) -> bool:
        return self.grant.cluster

    def op(self, namespace: str, role: int, what: str) -> ShardstateError | None:
        """None when the op may run: its namespace and role granted, and within the namespace's
        ops/s (counted here, once the rest allows it). The cluster token is never limited."""
        g = self.grant
        if g.cluster:
            return None
        namespace = namespace or "default"
        err = denied(g, namespace, role, what)
        if err is not None:
            self.auth.refused("permission_denied")
            return err
        over = self.auth.admit(namespace)
        if over is not None:
            self.auth.refused("rate_limited")
        return over

    def call(self, namespace: str, role: int, what: str) -> None:
        err = self.op(namespace, role, what)
        if err is not None:
            raise err

    def method(self, need: int, method: str) -> None:
        """The method-level check (`method_role`): raises PERMISSION_DENIED naming the role."""
        g = self.grant
        if need == CLUSTER and not g.cluster:
            self.auth.refused("permission_denied")
            raise PermissionDeniedError(f"{method} is a node-to-node call: only the cluster token may make it")
        if need > ANY and g.role < need and not g.cluster:
            self.auth.refused("permission_denied")
            raise PermissionDeniedError(
                f"{method} needs the {ROLE_NAMES[need]} role; the token's role is {ROLE_NAMES[g.role]}; nothing was done")


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer TOKEN` entry, or None."""
    for k, v in metadata or ():
        if k == "authorization":
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            scheme, _, token = v.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return str(token.strip())
    return None


def metadata_for(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# ---- configuration ----


def read_cluster_token(path: str, env: Mapping[str, str] | None = None) -> str:
    """The cluster token from `path` (first line) or SHARDSTATE_CLUSTER_TOKEN; "" when neither."""
    env = os.environ if env is None else env
    token = ""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as e:
            raise InvalidArgumentError(f"cannot read the cluster token file {path}: {e.strerror}") from None
        if not token:
            raise InvalidArgumentError(f"the cluster token file {path} is empty")
    else:
        token = env.get(CLUSTER_TOKEN_ENV, "").strip()
    if token and len(token) < MIN_CLUSTER_TOKEN_CHARS:
        raise InvalidArgumentError(f"the cluster token must be at least {MIN_CLUSTER_TOKEN_CHARS} characters")
    return token


def from_config(auth_file: str, cluster_token_file: str, env: Mapping[str, str] | None = None) -> tuple[Authorizer | None, str]:
    """(the process's Authorizer, or None when auth is off; its cluster token, "" when none).
    Auth is on with --auth-file or SHARDSTATE_TOKENS; then a cluster token is required, since
    routers and replicas reach the shards with it."""
    env = os.environ if env is None else env
    cluster = read_cluster_token(cluster_token_file, env)
    text = env.get(TOKENS_ENV, "")
    if not auth_file and not text:
        return None, cluster
    if not cluster:
        raise InvalidArgumentError(
            "auth is on (--auth-file or SHARDSTATE_TOKENS) but there is no cluster token: give "
            "--cluster-token-file FILE or SHARDSTATE_CLUSTER_TOKEN (the same on every node), which "
            "routers and replicas send to the shards")
    try:
        source = TokenSource(auth_file, text)
    except OSError as e:
        raise InvalidArgumentError(f"cannot read the token file {auth_file}: {e.strerror}") from None
    return Authorizer(source, cluster), cluster
