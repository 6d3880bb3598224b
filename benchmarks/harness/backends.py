"""The one interface every store is benchmarked through, and how a target picks a backend.

The harness (workloads, timing, reports) is the same code for shardstate, Redis and etcd; only
these calls differ. A step's compare-and-swap that loses returns False: a conflict, not an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

STATE_KEY = "state"  # the key holding a session's state in every store
LOG_STREAM = "events"  # the log stream the append workload writes
LOAD_PARALLELISM = 64  # concurrent writes while loading sessions before the run
BACKENDS = ("shardstate", "shardstate-direct", "redis", "etcd")  # -direct: AsyncClient(direct=True)

# How a step reads before its compare-and-swap:
#   read-cas: read the state from the store, then CAS on the version read (two round trips);
#   cached:   CAS on the version this client saw last for the session (its own last write or
#             the current version a lost CAS returned); it reads only when it has seen nothing.
#             A CAS still fails when anyone else wrote in between, so the guarantee is the same;
#             a lost CAS is retried once from the version it returned (CACHED_ATTEMPTS).
#   auto:     cached for shardstate (session handles' update(), the documented way to do a step),
#             read-cas for Redis and etcd (their usual optimistic-locking pattern).
STEP_IMPLS = ("auto", "cached", "read-cas")
CACHED_ATTEMPTS = 2  # cached: the CAS, and one retry from the current version a lost CAS returned


def resolve_step_impl(backend: str, step_impl: str) -> str:
    if step_impl not in STEP_IMPLS:
        raise ValueError(f"unknown step implementation {step_impl!r}; one of {', '.join(STEP_IMPLS)}")
    if step_impl == "auto":
        return "cached" if backend.startswith("shardstate") else "read-cas"
    return step_impl


class Backend(Protocol):
    """One store under test. Every method is a coroutine except `describe`."""

    name: str

    async def setup(self, session_ids: Sequence[str], value: bytes,
                    progress: Callable[[int], None]) -> None:
        """Connect, and write every session's initial state (reporting each written count);
        with no session ids, only connect (the sessions are there from an earlier run)."""

    async def step(self, session_id: str, value: bytes) -> bool:
        """Read the session's state, then compare-and-swap `value` in; False = the CAS lost."""

    async def read(self, session_id: str) -> bool:
        """Read the session's state; True when it was there."""

    async def append(self, session_id: str, entry: bytes, last: int) -> int:
        """Append one entry to the session's log, then read its newest `last`; returns how many."""

    async def close(self) -> None:
        """Release connections (the store keeps running)."""

    def describe(self) -> dict[str, Any]:
        """What a report should say about how this store was driven (client, call pattern)."""


def make_backend(kind: str, address: str, concurrency: int, step_impl: str = "auto", tls: Any = None,
                 token: str | None = None) -> Backend:
    """`kind` is shardstate, shardstate-direct, redis or etcd; `address` is host:port of the
    router / server; `tls` and `token` (shardstate only) the client's TlsFiles and bearer token."""
    impl = resolve_step_impl(kind, step_impl)
    if kind in ("shardstate", "shardstate-direct"):
        from shardstate.bench.shardstate_backend import ShardstateBackend

        return ShardstateBackend(address, impl, direct=kind == "shardstate-direct", tls=tls, token=token)
    if kind == "redis":
        from shardstate.bench.redis_backend import RedisBackend

        return RedisBackend(address, concurrency, impl)
    if kind == "etcd":
        from shardstate.bench.etcd_backend import EtcdBackend

        return EtcdBackend(address, impl)
    raise ValueError(f"unknown backend {kind!r} ({', '.join(BACKENDS)})")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)
