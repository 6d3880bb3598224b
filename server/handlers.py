"""Registers a servicer's methods on a grpc.aio server straight from the service descriptor,
with request deserializers that never raise: malformed bytes become INVALID_ARGUMENT.

grpc itself answers a deserializer exception with INTERNAL ("Exception deserializing
request!"); here the deserializer returns a `Malformed` marker and the wrapper aborts with
INVALID_ARGUMENT naming the message type (or the string field that is not UTF-8), and the
server keeps serving.

A Batch or Pipeline message carries many callers' ops (a router coalesces them): when it does
not parse whole, it is taken apart op by op (`Partial`), so each bad op fails alone and the
good ones run. A Pipeline message that cannot be taken apart fails only its own id.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor

from shardstate import errors
from shardstate.protowire import WireError, read_fields
from shardstate.v1 import state_pb2

from .storage.validation import utf8


class Malformed:
    """What a request deserializer returns for bytes that are not the expected message;
    `id` is the PipelineRequest id when one could be read (0 otherwise)."""

    __slots__ = ("id", "message")

    def __init__(self, message: str, id: int = 0) -> None:
        self.message = message
        self.id = id

    def error(self) -> errors.InvalidArgumentError:
        return errors.InvalidArgumentError(self.message)


class Partial:
    """A BatchRequest (or the batch of a PipelineRequest `id`) some of whose ops do not parse:
    `batch` holds every op (an empty BatchOp in place of a bad one), `bad` each bad op's error."""

    __slots__ = ("bad", "batch", "id")

    def __init__(self, batch: state_pb2.BatchRequest, bad: dict[int, errors.InvalidArgumentError], id: int = 0) -> None:
        self.batch = batch
        self.bad = bad
        self.id = id


def diagnose(desc: Descriptor, data: bytes, e: Exception) -> str:
    """Why `data` is not a `desc` message: the first top-level string field that is not UTF-8
    (the same words a router uses for the same bytes), else the parser's complaint."""
    try:
        for number, value in read_fields(data):
            f = desc.fields_by_number.get(number)
            if f is not None and f.type == FieldDescriptor.TYPE_STRING and isinstance(value, bytes):
                utf8(value, f.name)
    except errors.InvalidArgumentError as bad:
        return bad.message
    except WireError:
        pass
    return f"malformed request: not a valid {desc.full_name} ({e})"


def _deserializer(cls: Any) -> Callable[[bytes], Any]:
    parse = cls.FromString
    desc = cls.DESCRIPTOR

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:
            return Malformed(diagnose(desc, data, e))

    return deserialize


_OP_DESC = state_pb2.BatchOp.DESCRIPTOR


def op_error(i: int, raw: bytes, e: Exception) -> errors.InvalidArgumentError:
    """The error of op `i` of a batch whose bytes are not a BatchOp, naming what is wrong."""
    try:
        fields = [(n, v) for n, v in read_fields(raw) if n in _OP_DESC.fields_by_number]
    except WireError as w:
        return errors.InvalidArgumentError(f"ops[{i}] is not a valid {_OP_DESC.full_name} ({w})")
    for n, v in reversed(fields):  # the last op field on the wire is the one set
        if isinstance(v, bytes):
            f = _OP_DESC.fields_by_number[n]
            return errors.InvalidArgumentError(f"ops[{i}].{f.name}: {diagnose(f.message_type, v, e)}")
    return errors.InvalidArgumentError(f"ops[{i}] is not a valid {_OP_DESC.full_name} ({e})")


def split_batch(data: bytes) -> Partial:
    """A BatchRequest that failed to parse whole, op by op (raises WireError when even its
    framing is broken)."""
    batch = state_pb2.BatchRequest()
    bad: dict[int, errors.InvalidArgumentError] = {}
    for number, raw in read_fields(data):
        if number != 1:
            continue  # an unknown field, kept out of the way
        if not isinstance(raw, bytes):
            raise WireError("ops must be length-delimited")
        op = batch.ops.add()
        try:
            op.ParseFromString(raw)
        except Exception as e:
            op.Clear()
            bad[len(batch.ops) - 1] = op_error(len(batch.ops) - 1, raw, e)
    return Partial(batch, bad)


def _batch_deserializer(data: bytes) -> Any:
    try:
        return state_pb2.BatchRequest.FromString(data)
    except Exception as e:
        try:
            return split_batch(data)
        except WireError:
            return Malformed(f"malformed request: not a valid shardstate.v1.BatchRequest ({e})")


def _pipeline_deserializer(data: bytes) -> Any:
    try:
        return state_pb2.PipelineRequest.FromString(data)
    except Exception as e:
        fields: list[tuple[int, int | bytes]] = []
        try:
            read_fields(data, fields)
            framed = True
        except WireError:
            framed = False  # `fields` holds what came before the break
        ids = [v for n, v in fields if n == 1 and isinstance(v, int)]
        rid = ids[-1] if ids else 0
        try:
            batches = [v for n, v in fields if n == 2 and isinstance(v, bytes)]
            if not framed or len(ids) + len(batches) != sum(1 for n, _ in fields if n in (1, 2)):
                raise WireError("id must be a varint and batch a message")
            part = split_batch(b"".join(batches))  # repeated embedded messages merge
            part.id = rid
            return part
        except WireError:
            return Malformed(f"malformed request: not a valid shardstate.v1.PipelineRequest ({e})", rid)


SPECIAL = {"shardstate.v1.BatchRequest": _batch_deserializer, "shardstate.v1.PipelineRequest": _pipeline_deserializer}


def _unary_unary(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    async def handler(request: Any, context: Any) -> Any:
        if type(request) is Malformed:
            await errors.abort(context, request.error())
        return await fn(request, context)

    return handler


def _unary_stream(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handler(request: Any, context: Any) -> AsyncIterator[Any]:
        if type(request) is Malformed:
            await errors.abort(context, request.error())
        out = fn(request, context)
        if inspect.isawaitable(out):  # a coroutine that aborts or writes with context.write
            await out
            return
        async for response in out:
            yield response

    return handler


def register(server: grpc.aio.Server, service: ServiceDescriptor, behaviors: dict[str, Callable[..., Any]]) -> None:
    """Serve `service` with behaviors[method name](request or request_iterator, context).
    Stream-request behaviors see `Malformed` items in their iterator and must check."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for m in service.methods:
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        fn = behaviors[m.name]
        kw: dict[str, Any] = {
            "request_deserializer": SPECIAL.get(m.input_type.full_name) or _deserializer(req),
            "response_serializer": resp.SerializeToString,
        }
        if m.client_streaming and m.server_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(fn, **kw)
        elif m.client_streaming:
            handlers[m.name] = grpc.stream_unary_rpc_method_handler(fn, **kw)
        elif m.server_streaming:
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(_unary_stream(fn), **kw)
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(_unary_unary(fn), **kw)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def register_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any) -> None:
    """`register` for a servicer object whose methods are named like the RPCs (a generated
    *Servicer subclass): its requests get the same never-raising deserializers."""
    register(server, service, {m.name: getattr(servicer, m.name) for m in service.methods})
