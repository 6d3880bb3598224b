"""The byte budget of a batch's answer (`BatchRequest.max_response_bytes`, docs/design.md §8.6),
the arithmetic every hop shares: the shard applies it, a router splits it over the shards a
batch touches, the client library asks for a share of what it can receive.

One Pipeline message or Batch call carries many callers' ops; without a budget their answers
could add up to more than the caller can receive, failing every one of them. With it, the ops
whose turn comes after the budget is reached are answered `unprocessed` (not run) and the
client library sends them again in its next message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from shardstate.common.config import Limits, MiB
from shardstate.common.protowire import varint
from shardstate.v1 import state_pb2, types_pb2

LIMIT = "max_response_bytes"
DEFAULT_MAX_RESPONSE_BYTES = Limits().max_response_bytes  # a shard's and a router's default (16 MiB)
# A client asks for this fraction of its max_message_bytes: the answer may pass the budget by
# one op's result per shard it went to (each op's answer stays within the server's
# max_request_bytes: a value, a Scan or ReadLog page, a Txn's answer), so 3/4 is left for those.
CLIENT_SHARE = 4
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def effective(asked: int, cap: int) -> int:
    """The budget a server applies: the ask capped by its own limit; 0 asks for the limit."""
    return min(asked, cap) if asked > 0 else cap


def client_budget(max_message_bytes: int) -> int:
    """What a client receiving at most `max_message_bytes` asks for (0 when it accepts any
    size: the server's default)."""
    if max_message_bytes <= 0:
        return 0
    return max(1, max_message_bytes // CLIENT_SHARE)


def for_channel(options: Sequence[tuple[str, Any]]) -> int:
    """client_budget for a channel with these options (the last
    grpc.max_receive_message_length given wins, as in gRPC; none: gRPC's 4 MiB)."""
    return client_budget(int(dict(options).get("grpc.max_receive_message_length", 4 * MiB)))


def share(budget: int, parts: int) -> int:
    """Each part's share when a router sends a batch with this `budget` to `parts` shards (or
    replicas): sent to different shards, the parts' answers together stay within `budget` plus
    one result per part. Equal shares, at least 1 byte each (0 is "the default" on the wire):
    a part's share is also the budget of the shard message that carries it with other
    callers' ops, so a part of few ops gets no smaller share than a big one."""
    return max(1, budget // max(1, parts))


def wire_tail(budget: int) -> bytes:
    """The encoded BatchRequest field asking for an answer within `budget` bytes, to append
    to a BatchRequest's encoded ops (b"" for 0: the server's default)."""
    return b"\x10" + varint(budget) if budget > 0 else b""  # max_response_bytes = 2


def unprocessed_result(budget: int, used: int) -> state_pb2.BatchResult:
    """The result of an op not run because the answer's `used` bytes reached `budget`."""
    return state_pb2.BatchResult(
        code=RESOURCE_EXHAUSTED,
        message=(f"not run: this batch's answer reached its byte budget ({used} bytes of results, "
                 f"over the limit {LIMIT}={budget}); nothing was changed, send the op again"),
        limit_exceeded=types_pb2.LimitExceeded(limit=LIMIT, value=budget, actual=used),
        unprocessed=True,
    )
