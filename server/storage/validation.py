"""Input checks of the State API against config.Limits, with the messages callers see.

Empty or oversize names -> InvalidArgumentError naming the field and the limit; values, batches
and sessions over a size limit -> LimitExceededError (RESOURCE_EXHAUSTED) naming the limit.
"""

from __future__ import annotations

from typing import NamedTuple

from shardstate.config import Limits
from shardstate.errors import InvalidArgumentError, LimitExceededError

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
    ns = namespace or DEFAULT_NAMESPACE
    nsb = ns.encode()
    sidb = _name(session_id, "session_id", "max_session_id_bytes", limits.max_session_id_bytes)
    return SessionRef.of(ns, session_id, nsb, sidb)


def namespace_bytes(namespace: str) -> tuple[str, bytes]:
    ns = namespace or DEFAULT_NAMESPACE
    return ns, ns.encode()


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


def page_limit(limit: int, limits: Limits) -> int:
    """0 = the default page; anything above max_page is served as max_page."""
    if limit <= 0:
        return min(DEFAULT_PAGE, limits.max_page)
    return min(limit, limits.max_page)


def ttl(ms: int, field: str) -> int:
    if ms > MAX_TTL_MS:
        raise InvalidArgumentError(f"{field} is {ms} ms, over the maximum {MAX_TTL_MS} ms (100 years)")
    return ms
