"""shardstate: the client library for the sharded session-state server.

`Client("router:port").session("agent-42")` is the whole entry point; see README.md.
"""

# First: grpcio reads its transport settings when it is imported (see grpc_env).
import shardstate.grpc_env  # noqa: F401

# isort: split
from shardstate.aio import AsyncClient, AsyncSession
from shardstate.batch import Batch
from shardstate.client import Client, Session
from shardstate.errors import (
    ClientClosedError,
    ConflictError,
    DeadlineExceededError,
    HistoryCompactedError,
    InvalidArgumentError,
    LimitExceededError,
    NotFoundError,
    ShardstateError,
    TransientError,
    UnavailableError,
)
from shardstate.records import Change, Entry, Record, SessionInfo
from shardstate.retry import NO_RETRY, ConstantBackoff, ExponentialBackoff, NoBackoff, Retry
from shardstate.txn import Txn, TxnResult

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
    "Record",
    "Retry",
    "Session",
    "SessionInfo",
    "ShardstateError",
    "TransientError",
    "Txn",
    "TxnResult",
    "UnavailableError",
]
