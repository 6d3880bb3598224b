"""Input checks of the State API against config.Limits, with the messages callers see.

Empty or oversize names -> InvalidArgumentError naming the field and the limit; values, batches
and sessions over a size limit -> LimitExceededError (RESOURCE_EXHAUSTED) naming the limit.

The shard runs every check here before its ownership check, so an invalid request gets the same
answer from the owning shard and from any other shard; a router (which reads raw bytes) checks
UTF-8 with shardstate.common.protowire.utf8 and decodes ListSessions page tokens with
shardstate.common.pagetoken, the same code the shard uses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from shardstate.common.config import Limits
from shardstate.common.errors import InvalidArgumentError, LimitExceededError
from shardstate.v1 import state_pb2, types_pb2

from . import encoding

DEFAULT_NAMESPACE = "default"
DEFAULT_PAGE = 100
# A TTL beyond this is a mistake (and now + ttl must fit in a u64 with room to spare).
MAX_TTL_MS = 100 * 365 * 24 * 3600 * 1000


class SessionRef(NamedTuple):
    """A validated (namespace, session): the strings, their UTF-8 bytes, the meta key, and
    the encoded (ns, session) key components (encoding.session_part)."""

    ns: str
    sid: str
    nsb: bytes
    sidb: bytes
    mkey: bytes
    part: bytes

    @classmethod
    def of(cls, ns: str, sid: str, nsb: bytes, sidb: bytes) -> SessionRef:
        return cls(ns, sid, nsb, sidb, encoding.meta_key(nsb, sidb), encoding.session_part(nsb, sidb))


def _name(value: str, field: str, limit_name: str, limit: int) -> bytes:
    b = value.encode()
    if not b or len(b) > limit:
        what = "empty" if not b else f"{len(b)} bytes"
        raise InvalidArgumentError(f"{field} must be 1-{limit} UTF-8 bytes ({limit_name}={limit}), got {what}")
    return b


def session_ref(namespace: str, session_id: str, limits: Limits) -> SessionRef:
    ns, nsb = namespace_bytes(namespace, limits)
    sidb = _name(session_id, "session_id", "max_session_id_bytes", limits.max_session_id_bytes)
    return SessionRef.of(ns, session_id, nsb, sidb)


def namespace_bytes(namespace: str, limits: Limits | None = None) -> tuple[str, bytes]:
    """"" is the namespace "default"; longer than max_namespace_bytes is invalid (checked when
    `limits` is given)."""
    ns = namespace or DEFAULT_NAMESPACE
    nsb = ns.encode()
    if limits is not None and len(nsb) > limits.max_namespace_bytes:
        _name(ns, "namespace", "max_namespace_bytes", limits.max_namespace_bytes)
    return ns, nsb


CONSISTENCIES = {v.number: v.name for v in types_pb2.Consistency.DESCRIPTOR.values}
COMPARE_RESULTS = {v.number: v.name for v in state_pb2.Compare.Result.DESCRIPTOR.values}


def _enum(value: int, field: str, known: dict[int, str]) -> int:
    if value not in known:
        names = ", ".join(f"{n} ({v})" for v, n in sorted(known.items()))
        raise InvalidArgumentError(f"{field} {value} is not one of {names}")
    return value


def consistency(value: int) -> int:
    """A read's `consistency`: an enum value this server knows, else InvalidArgumentError (an
    unknown value must not be served as some other level)."""
    return _enum(value, "consistency", CONSISTENCIES)


def compares(cmps: Any) -> None:
    """Every Txn compare's `result` is a Compare.Result this server knows."""
    for i, c in enumerate(cmps):
        _enum(c.result, f"compares[{i}].result", COMPARE_RESULTS)


def key_bytes(key: str, limits: Limits, field: str = "key") -> bytes:
    return _name(key, field, "max_key_bytes", limits.max_key_bytes)


def stream_bytes(stream: str, limits: Limits) -> bytes:
    return _name(stream, "stream", "max_stream_name_bytes", limits.max_stream_name_bytes)


def check_value(value: bytes, limits: Limits, what: str = "value") -> None:
    if len(value) > limits.max_value_bytes:
        raise LimitExceededError.of("max_value_bytes", limits.max_value_bytes, len(value), f"{what} size")


def check_ops(n: int, limits: Limits, what: str) -> None:
    if n > limits.max_batch_ops:
        raise LimitExceededError.of("max_batch_ops", limits.max_batch_ops, n, what)


# A page of Scan or ReadLog and a Watch message stay within max_request_bytes, what a default
# gRPC client accepts (a lone item goes whole): each item counts its serialized size plus
# ITEM_FRAMING, and REPLY_ROOM is left for the rest of the reply (header, page token, stream).
ITEM_FRAMING = 16
REPLY_ROOM = 4096


def page_budget(limits: Limits) -> int:
    return max(limits.max_request_bytes - REPLY_ROOM, 0)


def page_limit(limit: int, limits: Limits) -> int:
    """0 = the default page; anything above max_page is served as max_page."""
    if limit <= 0:
        return min(DEFAULT_PAGE, limits.max_page)
    return min(limit, limits.max_page)


def ttl(ms: int, field: str) -> int:
    if ms > MAX_TTL_MS:
        raise InvalidArgumentError(f"{field} is {ms} ms, over the maximum {MAX_TTL_MS} ms (100 years)")
    return ms
