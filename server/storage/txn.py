"""Txn: compares on one session's keys and logs, then the success or the failure ops, all in
one WriteBatch at one revision (etcd's Txn). Later ops see the writes of earlier ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shardstate.common.errors import InvalidArgumentError, LimitExceededError
from shardstate.v1 import state_pb2

from . import keys, logs
from .context import WriteContext
from .validation import check_ops, check_value, key_bytes, ttl

Compare = state_pb2.Compare

# TxnOp field -> (op function, TxnOpResult field)
_OPS: dict[str, Callable[[WriteContext, Any], Any]] = {
    "get": keys.op_get,
    "put": keys.op_put,
    "delete": keys.op_delete,
    "increment": keys.op_increment,
    "append": logs.op_append,
}


def _holds(result: int, cmp: int) -> bool:
    """`cmp` is -1/0/1 for actual vs target."""
    if result == Compare.EQUAL:
        return cmp == 0
    if result == Compare.NOT_EQUAL:
        return cmp != 0
    if result == Compare.GREATER:
        return cmp > 0
    if result == Compare.LESS:
        return cmp < 0
    raise InvalidArgumentError(f"unknown compare result {result}")


def _sign(a: Any, b: Any) -> int:
    return (a > b) - (a < b)


def check_compare(c: state_pb2.Compare, limits: Any) -> None:
    """A compare's input checks, made for every compare before any is evaluated."""
    target = c.WhichOneof("target")
    if target == "log_length":
        if not c.key:
            raise InvalidArgumentError("compare on log_length needs the stream name in key")
        return
    key_bytes(c.key, limits, "compare key")
    if target is None:
        raise InvalidArgumentError(f"compare on key {c.key!r} has no target")
    if target == "exists" and c.result not in (Compare.EQUAL, Compare.NOT_EQUAL):
        raise InvalidArgumentError("compare on exists takes EQUAL or NOT_EQUAL only")


def compare(ctx: WriteContext, c: state_pb2.Compare) -> bool:
    """Whether the compare holds (its input passed check_compare)."""
    target = c.WhichOneof("target")
    if target == "log_length":
        s = ctx.stream(c.key)
        return _holds(c.result, _sign(s.count if s is not None else 0, c.log_length))
    rec = ctx.record(ctx.data_key(c.key.encode()))
    if target == "version":
        return _holds(c.result, _sign(rec.version if rec is not None else 0, c.version))
    if target == "value":
        if rec is None:  # an absent key never matches EQUAL, GREATER or LESS
            return c.result == Compare.NOT_EQUAL
        return _holds(c.result, _sign(rec.value, c.value))
    return _holds(c.result, 0 if (rec is not None) == c.exists else 1)


def _check_op(kind: str, op: Any) -> None:
    if op.namespace or op.session_id:
        raise InvalidArgumentError(f"Txn {kind} op must not name a namespace or session_id; it inherits the Txn's")
    if getattr(op, "request_id", ""):
        raise InvalidArgumentError(f"Txn {kind} op must not carry a request_id; give it on the Txn")
    if kind in ("put", "delete") and op.HasField("expected_version"):
        raise InvalidArgumentError(f"Txn {kind} op must not set expected_version; use a compare")


def check_op_input(kind: str, op: Any, limits: Any) -> None:
    """The op's own input checks (names, sizes, TTLs): an op of the branch that does not run
    is bad input all the same (as in etcd), never accepted because it is not reached."""
    if kind == "append":
        logs.check_append(op, limits)
    else:
        key_bytes(op.key, limits)
    if kind == "put":
        check_value(op.value, limits)
    if kind in ("put", "increment"):
        ttl(op.ttl_ms, "ttl_ms")
    if kind in ("put", "increment", "append"):
        ttl(op.session_ttl_ms, "session_ttl_ms")


def validate(req: state_pb2.TxnRequest, limits: Any) -> None:
    for name, items in (("compares", req.compares), ("success ops", req.success), ("failure ops", req.failure)):
        check_ops(len(items), limits, f"Txn {name}")
    ttl(req.session_ttl_ms, "session_ttl_ms")
    for c in req.compares:
        check_compare(c, limits)
    for op in (*req.success, *req.failure):
        kind = op.WhichOneof("op")
        if kind is None:
            raise InvalidArgumentError("Txn op is empty")
        inner = getattr(op, kind)
        _check_op(kind, inner)
        check_op_input(kind, inner, limits)


def op_txn(ctx: WriteContext, req: state_pb2.TxnRequest) -> state_pb2.TxnResponse:
    validate(req, ctx.limits)
    succeeded = all(compare(ctx, c) for c in req.compares)
    resp = state_pb2.TxnResponse(succeeded=succeeded)
    reads = False
    for op in req.success if succeeded else req.failure:
        kind = op.WhichOneof("op")
        assert kind is not None
        result = _OPS[kind](ctx, getattr(op, kind))
        getattr(resp.results.add(), kind).CopyFrom(result)
        reads = reads or kind == "get"
    if reads:
        # Its gets could answer max_batch_ops values. Kept within max_request_bytes, as a Scan
        # or ReadLog page is (refused before anything is written): every op's answer is, so
        # a batch's answer passes its byte budget by one such result at most.
        size = resp.ByteSize()
        if size > ctx.limits.max_request_bytes:
            raise LimitExceededError.of("max_request_bytes", ctx.limits.max_request_bytes, size,
                                        "the Txn's answer (bytes), which one op's answer stays within,")
    if req.session_ttl_ms and ctx.writes:
        ctx.session_ttl_ms = ttl(req.session_ttl_ms, "session_ttl_ms")
    if ctx.writes:
        resp.revision = ctx.revision()
    return resp
