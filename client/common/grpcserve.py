"""Registers a servicer's methods on a grpc.aio server straight from the service descriptor,
with request deserializers that never raise: malformed bytes become INVALID_ARGUMENT.

grpc itself answers a deserializer exception with INTERNAL ("Exception deserializing
request!"); here the deserializer returns a `Malformed` marker and the wrapper aborts with
INVALID_ARGUMENT naming the message type (or the string field that is not UTF-8), and the
server keeps serving. Shards and routers both serve through it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor

from shardstate.common import errors
from shardstate.common.protowire import WireError, read_fields, utf8


class Malformed:
    """What a request deserializer returns for bytes that are not the expected message;
    `id` is the PipelineRequest id when one could be read (0 otherwise)."""

    __slots__ = ("id", "message")

    def __init__(self, message: str, id: int = 0) -> None:
        self.message = message
        self.id = id

    def error(self) -> errors.InvalidArgumentError:
        return errors.InvalidArgumentError(self.message)


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


def register(server: grpc.aio.Server, service: ServiceDescriptor, behaviors: dict[str, Callable[..., Any]],
             special: Mapping[str, Callable[[bytes], Any]] | None = None) -> None:
    """Serve `service` with behaviors[method name](request or request_iterator, context).
    Stream-request behaviors see `Malformed` items in their iterator and must check.
    `special` maps a request message's full name to its own never-raising deserializer."""
    special = special or {}
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for m in service.methods:
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        fn = behaviors[m.name]
        kw: dict[str, Any] = {
            "request_deserializer": special.get(m.input_type.full_name) or _deserializer(req),
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


def unary(fn: Callable[[Any, Any], Any], request: Any, response: Any) -> grpc.RpcMethodHandler:
    """One unary method outside a registered service (e.g. added to the Replication service
    by another module), with the same never-raising deserializer."""
    return grpc.unary_unary_rpc_method_handler(
        _unary_unary(fn), request_deserializer=_deserializer(request), response_serializer=response.SerializeToString)


def register_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any) -> None:
    """`register` for a servicer object whose methods are named like the RPCs (a generated
    *Servicer subclass): its requests get the same never-raising deserializers."""
    register(server, service, {m.name: getattr(servicer, m.name) for m in service.methods})
