"""shardstate: the client library for the sharded session-state server.

`Client("router:port").session("agent-42")` is the whole entry point; see README.md.

`import shardstate` loads nothing but this file and changes no process-wide setting: each name
below is imported from its module on first use (`from shardstate import Client` loads the sync
client, grpcio and the generated protobuf code). The shard server, router, CLI and bench harness
are other packages (`shardstate.server`, `shardstate.router`, `shardstate.bench`) that this
library never imports.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy and ruff know the name)

# name -> the module that defines it
_EXPORTS = {
    "AsyncClient": "shardstate.aio",
    "AsyncSession": "shardstate.aio",
    "Batch": "shardstate.batch",
    "Client": "shardstate.client",
    "Session": "shardstate.client",
    "ClientClosedError": "shardstate.common.errors",
    "ConflictError": "shardstate.common.errors",
    "DeadlineExceededError": "shardstate.common.errors",
    "HistoryCompactedError": "shardstate.common.errors",
    "InvalidArgumentError": "shardstate.common.errors",
    "LimitExceededError": "shardstate.common.errors",
    "NotFoundError": "shardstate.common.errors",
    "PermissionDeniedError": "shardstate.common.errors",
    "RateLimitedError": "shardstate.common.errors",
    "ShardstateError": "shardstate.common.errors",
    "TransientError": "shardstate.common.errors",
    "UnauthenticatedError": "shardstate.common.errors",
    "UnavailableError": "shardstate.common.errors",
    "Change": "shardstate.common.records",
    "Entry": "shardstate.common.records",
    "Record": "shardstate.common.records",
    "SessionInfo": "shardstate.common.records",
    "NO_RETRY": "shardstate.retry",
    "ConstantBackoff": "shardstate.retry",
    "ExponentialBackoff": "shardstate.retry",
    "NoBackoff": "shardstate.retry",
    "Retry": "shardstate.retry",
    "Txn": "shardstate.txn",
    "TxnResult": "shardstate.txn",
}

__all__ = [
    "NO_RETRY",
    "AsyncClient",
    "AsyncSession",
    "Batch",
    "Change",
    "Client",
    "ClientClosedError",
    "ConflictError",
    "ConstantBackoff",
    "DeadlineExceededError",
    "Entry",
    "ExponentialBackoff",
    "HistoryCompactedError",
    "InvalidArgumentError",
    "LimitExceededError",
    "NoBackoff",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitedError",
    "Record",
    "Retry",
    "Session",
    "SessionInfo",
    "ShardstateError",
    "TransientError",
    "Txn",
    "TxnResult",
    "UnauthenticatedError",
    "UnavailableError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shardstate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from typing import Any

    from shardstate.aio import AsyncClient, AsyncSession
    from shardstate.batch import Batch
    from shardstate.client import Client, Session
    from shardstate.common.errors import (
        ClientClosedError,
        ConflictError,
        DeadlineExceededError,
        HistoryCompactedError,
        InvalidArgumentError,
        LimitExceededError,
        NotFoundError,
        PermissionDeniedError,
        RateLimitedError,
        ShardstateError,
        TransientError,
        UnauthenticatedError,
        UnavailableError,
    )
    from shardstate.common.records import Change, Entry, Record, SessionInfo
    from shardstate.retry import NO_RETRY, ConstantBackoff, ExponentialBackoff, NoBackoff, Retry
    from shardstate.txn import Txn, TxnResult
