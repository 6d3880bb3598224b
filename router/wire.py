"""Partial views of shardstate.v1 messages, so the router forwards bytes without decoding them.

Each view declares only the fields the router acts on and keeps the rest as unknown fields:

    SessionRef          = namespace(1) session_id(2)   -- every session-scoped request
    OpRef               = oneof op: SessionRef at 1..10 -- a BatchOp: which op, which session
    RawBatch            = ops(1)*: bytes max_response_bytes(2) -- a BatchRequest, each op left encoded
    RawBatchResponse    = header(1): bytes, results(2)*: bytes
    ResultRef           = code(1) wrong_shard(13): Opaque not_primary(14): Opaque unprocessed(16)
    RawPipelineRequest  = id(1) batch(2): RawBatch
    RawPipelineResponse = id(1) batch(2): RawBatchResponse code(3) message(4)
    WatchRef            = events(2)*: {revision(2)} progress_revision(3)
    ResultBody          = code(1) message(2) r3..r12: bytes (the response) details(13..15): Opaque

Namespaces and ids are declared `bytes` so the view never fails on them; the router checks
their UTF-8 itself (server/storage/validation.py, the checks the shard makes) before routing:
a request that would make the shard refuse a coalesced message is answered here, alone. The
limits (lengths, values) are the shard's: it answers them per op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from shardstate.common.errors import InvalidArgumentError, ShardstateError, to_code_int
from shardstate.common.protowire import field_head, utf8, varint
from shardstate.v1 import state_pb2, types_pb2

_F = descriptor_pb2.FieldDescriptorProto
_PKG = "shardstate.router.wire"


def _build() -> dict[str, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="shardstate/router/wire.proto", package=_PKG, syntax="proto3"
    )

    def msg(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, typ, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=typ, label=label)
            if type_name:
                f.type_name = f".{_PKG}.{type_name}"
        if name == "OpRef":  # BatchOp's oneof: the last op field on the wire wins, as on the shard
            m.oneof_decl.add(name="op")
            for f in m.field:
                f.oneof_index = 0

    one, many = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
    msg("Opaque")  # a message kept whole as unknown fields; present or not
    msg("SessionRef", ("namespace", 1, _F.TYPE_BYTES, one, ""), ("session_id", 2, _F.TYPE_BYTES, one, ""))
    msg("OpRef", *[(f"op{i}", i, _F.TYPE_MESSAGE, one, "SessionRef") for i in range(1, 11)])
    msg("RawBatch", ("ops", 1, _F.TYPE_BYTES, many, ""), ("max_response_bytes", 2, _F.TYPE_UINT64, one, ""))
    msg("RawBatchResponse", ("header", 1, _F.TYPE_BYTES, one, ""), ("results", 2, _F.TYPE_BYTES, many, ""))
    msg(
        "ResultRef",
        ("code", 1, _F.TYPE_INT32, one, ""),
        ("wrong_shard", 13, _F.TYPE_MESSAGE, one, "Opaque"),
        ("not_primary", 14, _F.TYPE_MESSAGE, one, "Opaque"),
        ("unprocessed", 16, _F.TYPE_BOOL, one, ""),
    )
    msg("RawPipelineRequest", ("id", 1, _F.TYPE_UINT64, one, ""), ("batch", 2, _F.TYPE_MESSAGE, one, "RawBatch"))
    msg(
        "RawPipelineResponse",
        ("id", 1, _F.TYPE_UINT64, one, ""),
        ("batch", 2, _F.TYPE_MESSAGE, one, "RawBatchResponse"),
        ("code", 3, _F.TYPE_INT32, one, ""),
        ("message", 4, _F.TYPE_STRING, one, ""),
    )
    msg(
        "ResultBody",
        ("code", 1, _F.TYPE_INT32, one, ""),
        ("message", 2, _F.TYPE_BYTES, one, ""),
        *[(f"r{i}", i, _F.TYPE_BYTES, one, "") for i in range(3, 13)],
        ("wrong_shard", 13, _F.TYPE_MESSAGE, one, "Opaque"),
        ("not_primary", 14, _F.TYPE_MESSAGE, one, "Opaque"),
        ("limit_exceeded", 15, _F.TYPE_MESSAGE, one, "Opaque"),
    )
    msg("EventRef", ("revision", 2, _F.TYPE_UINT64, one, ""))
    msg("WatchRef", ("events", 2, _F.TYPE_MESSAGE, many, "EventRef"), ("progress_revision", 3, _F.TYPE_UINT64, one, ""))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PKG}.{m.name}"))
            for m in fdp.message_type}


_CLASSES = _build()
SessionRef: Any = _CLASSES["SessionRef"]
OpRef: Any = _CLASSES["OpRef"]
RawBatch: Any = _CLASSES["RawBatch"]
RawBatchResponse: Any = _CLASSES["RawBatchResponse"]
ResultRef: Any = _CLASSES["ResultRef"]
RawPipelineRequest: Any = _CLASSES["RawPipelineRequest"]
RawPipelineResponse: Any = _CLASSES["RawPipelineResponse"]
WatchRef: Any = _CLASSES["WatchRef"]
ResultBody: Any = _CLASSES["ResultBody"]

# A unary State call that is also a BatchOp, and the field its request and response take in
# BatchOp / BatchResult (the response field is the request field + 2).
BATCH_FIELD = {
    "Get": 1, "Put": 2, "Delete": 3, "Increment": 4, "Append": 5, "ReadLog": 6, "Txn": 7,
    "Scan": 8, "Touch": 9, "GetSession": 10,
}

FAILED_PRECONDITION = 9


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def session_of(request: bytes) -> tuple[str, str]:
    """(namespace, session_id) of an encoded session-scoped request; namespace "" = default.
    Raises DecodeError (not a message) or InvalidArgumentError (a name is not UTF-8)."""
    ref = SessionRef.FromString(request)
    return utf8(ref.namespace, "namespace") or "default", utf8(ref.session_id, "session_id")


_OP_NAMES = {f"op{f.number}": f.name for f in state_pb2.BatchOp.DESCRIPTOR.fields}


def op_session(op: bytes, i: int = 0) -> tuple[str, str] | None:
    """(namespace, session_id) of encoded BatchOp `ops[i]`, or None when no op is set.
    Raises InvalidArgumentError naming the op when it does not parse or a name is not UTF-8."""
    target = op_target(op, i)
    return None if target is None else (target[0], target[1])


def op_target(op: bytes, i: int = 0) -> tuple[str, str, int] | None:
    """op_session and the op's BatchOp field number (1 get ... 10 get_session)."""
    try:
        ref = OpRef.FromString(op)
    except DecodeError as e:
        raise InvalidArgumentError(f"ops[{i}] is not a valid shardstate.v1.BatchOp ({e})") from None
    name = ref.WhichOneof("op")
    if name is None:
        return None
    inner = getattr(ref, name)
    try:
        return utf8(inner.namespace, "namespace") or "default", utf8(inner.session_id, "session_id"), int(name[2:])
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"ops[{i}].{_OP_NAMES[name]}: {e.message}") from None


def redirect_of(result: bytes) -> types_pb2.WrongShard | types_pb2.NotPrimary | None:
    """The WrongShard/NotPrimary detail of an encoded BatchResult, if it carries one.

    A result with code 0 omits field 1, so it never starts with its tag (0x08): the common
    case costs one byte comparison.
    """
    if result[:1] != b"\x08":
        return None
    ref = ResultRef.FromString(result)
    if ref.code != FAILED_PRECONDITION:
        return None
    if ref.HasField("wrong_shard"):
        return types_pb2.WrongShard.FromString(ref.wrong_shard.SerializeToString())
    if ref.HasField("not_primary"):
        return types_pb2.NotPrimary.FromString(ref.not_primary.SerializeToString())
    return None


_UNPROCESSED_HEAD = b"\x08\x08"  # code = 8, RESOURCE_EXHAUSTED


def unprocessed(result: bytes) -> bool:
    """Whether an encoded BatchResult is `unprocessed` (not run: its batch's answer reached
    its byte budget). Any other result costs a two-byte comparison."""
    return result[:2] == _UNPROCESSED_HEAD and bool(ResultRef.FromString(result).unprocessed)


def error_result(code: int, message: str) -> bytes:
    return bytes(state_pb2.BatchResult(code=code, message=message).SerializeToString())


def limit_result(e: ShardstateError) -> bytes:
    """The BatchResult of an op the router refused itself, typed details included."""
    r = state_pb2.BatchResult(code=to_code_int(e), message=e.message)
    if isinstance(e.detail, types_pb2.LimitExceeded):
        r.limit_exceeded.CopyFrom(e.detail)
    return bytes(r.SerializeToString())


def watch_position(response: bytes) -> int:
    """Highest revision a WatchResponse proves delivered (events or progress), 0 if none."""
    ref = WatchRef.FromString(response)
    top = int(ref.progress_revision)
    for ev in ref.events:
        top = max(top, int(ev.revision))
    return top



def repeated_bytes(field: int, items: Sequence[bytes]) -> tuple[list[bytes], int]:
    """The parts (to join) and total size of a repeated length-delimited `field` (< 16) over
    already encoded `items`: the router frames forwarded ops without copying them twice."""
    parts: list[bytes] = []
    size = 0
    for item in items:
        head = field_head(field, len(item))
        parts.append(head)
        parts.append(item)
        size += len(head) + len(item)
    return parts, size


def length_delimited(field: int, payload: bytes) -> bytes:
    """One length-delimited field (a sub-message already encoded) of a message."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def as_batch_op(method: str, request: bytes) -> bytes:
    """An encoded unary request as the encoded BatchOp carrying it."""
    return length_delimited(BATCH_FIELD[method], request)


def unpack_result(result: bytes, method: str) -> tuple[bytes, int, str, list[Any]]:
    """(encoded response, code, message, typed details) of the BatchResult of a `method` op."""
    body = ResultBody.FromString(result)
    if not body.code:
        return getattr(body, f"r{BATCH_FIELD[method] + 2}"), 0, "", []
    details: list[Any] = []
    for name, cls in (("wrong_shard", types_pb2.WrongShard), ("not_primary", types_pb2.NotPrimary),
                      ("limit_exceeded", types_pb2.LimitExceeded)):
        if body.HasField(name):
            details.append(cls.FromString(getattr(body, name).SerializeToString()))
    return b"", int(body.code), _text(body.message), details
