"""Registers a servicer's methods on a grpc.aio server straight from the service descriptor,
with request deserializers that never raise: malformed bytes become INVALID_ARGUMENT.

grpc itself answers a deserializer exception with INTERNAL ("Exception deserializing
request!"); here the deserializer returns a `Malformed` marker and the wrapper aborts with
INVALID_ARGUMENT naming the message type, and the server keeps serving.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from shardstate import errors


class Malformed:
    """What a request deserializer returns for bytes that are not the expected message."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def error(self) -> errors.InvalidArgumentError:
        return errors.InvalidArgumentError(self.message)


def _deserializer(cls: Any) -> Callable[[bytes], Any]:
    parse = cls.FromString
    name = cls.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:
            return Malformed(f"malformed request: not a valid {name} ({e})")

    return deserialize


def _unary_unary(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    async def handler(request: Any, context: Any) -> Any:
        if type(request) is Malformed:
            await errors.abort(context, request.error())
        return await fn(request, context)

    return handler


def _unary_stream(fn: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handler(request: Any, context: Any) -> AsyncIterator[Any]:
        if type(request) is Malformed:
            await errors.abort(context, request.error())
        async for response in fn(request, context):
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
            "request_deserializer": _deserializer(req),
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
