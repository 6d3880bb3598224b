"""shardstate: the client library for the sharded session-state server.

`Client("router:port").session("agent-42")` is the whole entry point; see README.md.
"""

from shardstate.errors import (
    ConflictError,
    InvalidArgumentError,
    LimitExceededError,
    NotFoundError,
    ShardstateError,
    UnavailableError,
)
from shardstate.records import Entry, Record, SessionInfo

__all__ = [
    "ConflictError",
    "Entry",
    "InvalidArgumentError",
    "LimitExceededError",
    "NotFoundError",
    "Record",
    "SessionInfo",
    "ShardstateError",
    "UnavailableError",
]
