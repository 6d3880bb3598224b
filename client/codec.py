"""Client-side validation, request building and response decoding, shared by Client and
AsyncClient (pure functions: no I/O, no state).

Validation raises InvalidArgumentError naming the field before any RPC is made.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from shardstate.common import errors
from shardstate.common.config import Limits
from shardstate.common.errors import ConflictError, InvalidArgumentError, ShardstateError
from shardstate.common.records import Entry, Record
from shardstate.v1 import state_pb2, types_pb2

_LIMITS = Limits()
Value = bytes | bytearray | memoryview | str
Seconds = int | float | timedelta


# ---- validation ----


def _request_ids() -> Iterator[str]:
    """32 hex digits: 64 random bits drawn per process, then a counter. As unique as
    uuid4().hex, without a getrandom() system call per id (and all of it in C)."""
    return map(f"{os.urandom(8).hex()}%016x".__mod__, itertools.count(1))


_request_id_iter = _request_ids()


def _new_request_ids_after_fork() -> None:
    global _request_id_iter
    _request_id_iter = _request_ids()


os.register_at_fork(after_in_child=_new_request_ids_after_fork)


def new_request_id() -> str:
    return next(_request_id_iter)


def _utf8(value: str, what: str) -> bytes:
    """`value` as UTF-8; a str that has none (a lone surrogate) is the caller's mistake."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(f"{what} is not valid UTF-8: {e.reason} at index {e.start}") from None


def _name(value: Any, what: str, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a str, got {type(value).__name__}")
    n = len(value) if value.isascii() else len(_utf8(value, what))
    if n == 0:
        raise InvalidArgumentError(f"{what} must not be empty")
    if n > max_bytes:
        raise InvalidArgumentError(f"{what} is {n} bytes, over the limit of {max_bytes} bytes")
    return value


def session_id(value: Any) -> str:
    return _name(value, "session_id", _LIMITS.max_session_id_bytes)


def key(value: Any) -> str:
    return _name(value, "key", _LIMITS.max_key_bytes)


def stream(value: Any) -> str:
    return _name(value, "stream", _LIMITS.max_stream_name_bytes)


def namespace(value: Any) -> str:
    if value is None or value == "":
        return "default"
    return _name(value, "namespace", _LIMITS.max_session_id_bytes)


def prefix(value: Any, what: str = "prefix") -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a str, got {type(value).__name__}")
    if not value.isascii():
        _utf8(value, what)
    return value


def to_bytes(value: Any, what: str = "value") -> bytes:
    """bytes-like as is, str as UTF-8; anything else is a caller's mistake."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8") if value.isascii() else _utf8(value, what)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise InvalidArgumentError(
        f"{what} must be bytes or str, got {type(value).__name__}"
        " (use put_json/get_json for other objects)"
    )


def entries(values: Any, what: str = "entries") -> list[bytes]:
    """One entry (bytes or str) or an iterable of them."""
    if isinstance(values, bytes | bytearray | memoryview | str):
        return [to_bytes(values, what)]
    try:
        items = list(values)
    except TypeError:
        raise InvalidArgumentError(
            f"{what} must be bytes, str or a list of them, got {type(values).__name__}"
        ) from None
    if not items:
        raise InvalidArgumentError(f"{what} must not be empty")
    return [to_bytes(v, f"{what}[{i}]") for i, v in enumerate(items)]


def ms(seconds: Any, what: str = "ttl") -> int:
    """A duration in seconds (int, float or timedelta) as whole milliseconds; None is 0."""
    if seconds is None:
        return 0
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise InvalidArgumentError(f"{what} must be seconds (int, float or timedelta), got {type(seconds).__name__}")
    if seconds < 0:
        raise InvalidArgumentError(f"{what} must not be negative, got {seconds}")
    out = round(seconds * 1000)
    if seconds > 0 and out == 0:
        out = 1  # a positive ttl never means "no ttl"
    return int(out)


def timeout(seconds: Any, what: str = "timeout") -> float | None:
    if seconds is None:
        return None
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
        raise InvalidArgumentError(f"{what} must be a positive number of seconds, got {seconds!r}")
    return float(seconds)


def count(value: Any, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"{what} must be a non-negative int, got {value!r}")
    return value


def version(value: Any, what: str = "expect") -> int:
    return count(value, what)


_CONSISTENCY = {
    None: types_pb2.CONSISTENCY_UNSPECIFIED,
    "strong": types_pb2.STRONG,
    "eventual": types_pb2.EVENTUAL,
}


def consistency(value: Any) -> types_pb2.Consistency.ValueType:
    if isinstance(value, str):
        value = value.lower()
    try:
        return _CONSISTENCY[value]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"consistency must be 'strong' or 'eventual', got {value!r}") from None


def json_bytes(obj: Any) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"value is not JSON-serializable: {e}") from e


def json_value(data: bytes, key: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as e:
        raise InvalidArgumentError(f"value of key {key!r} is not JSON: {e}") from e


# ---- decoding ----


def record(pb: types_pb2.Record) -> Record | None:
    """A record, or None for the empty/absent one (version 0 means absent)."""
    return Record.from_pb(pb) if pb.version else None


def entry_list(pbs: Any) -> list[Entry]:
    return [Entry.from_pb(e) for e in pbs]


def written(key: str, value: bytes, ver: int, create_version: int, ttl_ms: int) -> Record:
    """The record a successful write left behind, as far as the client knows it (0 where it
    does not). Revisions are hybrid logical clocks (`wall_ms << 20`), so the server's write
    time is `version >> 20`."""
    at = ver >> 20
    return Record(key, value, ver, create_version, at + ttl_ms if ttl_ms else 0, at)


def conflict(op: str, key: str, expected: int, current: Record | None) -> ConflictError:
    now = f"its version is {current.version}" if current is not None else "it does not exist"
    want = f"version {expected}" if expected else "absent"
    return ConflictError(f"{op} of key {key!r} expected it {want}, but {now}", current=current)


_TXN_RESULT: dict[str, Any] = {
    "get": lambda r: record(r.record) if r.found else None,
    "put": lambda r: int(r.version),
    "delete": lambda r: bool(r.existed),
    "increment": lambda r: int(r.value),
    "append": lambda r: list(r.seqs),
}


def txn_result(r: state_pb2.TxnOpResult) -> Any:
    """One op's outcome in a Txn: get -> Record | None, put -> version, delete -> existed,
    increment -> new value, append -> seqs."""
    kind = r.WhichOneof("result")
    return _TXN_RESULT[kind](getattr(r, kind)) if kind else None


def revision_of(resp: Any) -> int:
    """The header revision of any State response (0 when it has none)."""
    header = getattr(resp, "header", None)
    return int(header.revision) if header is not None else 0


def batch_error(result: state_pb2.BatchResult) -> ShardstateError:
    details: list[Any] = []
    for name in ("wrong_shard", "not_primary", "limit_exceeded"):
        if result.HasField(name):
            details.append(getattr(result, name))
    return errors.from_status(result.code, result.message, details)


def batch_response(result: state_pb2.BatchResult, field: str) -> Any:
    """The response message of one Batch op, or raise its error."""
    if result.code != 0:
        raise batch_error(result)
    if result.WhichOneof("result") != field:
        raise errors.InternalError(
            f"batch result holds {result.WhichOneof('result')!r}, expected {field!r}"
        )
    return getattr(result, field)


def pipeline_error(resp: state_pb2.PipelineResponse) -> ShardstateError:
    return errors.from_status(resp.code, resp.message or "pipeline batch failed")
