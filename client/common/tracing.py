"""OpenTelemetry tracing, off unless asked for (`--otel` / SHARDSTATE_OTEL=1; the `[otel]`
extra): W3C `traceparent` in gRPC metadata from the client to the router to the shard.

Free when off: nothing here imports opentelemetry until `setup()` (servers) or
`client_interceptors()` (the client library) finds tracing on, and the servers choose their
traced handlers once at start-up, so an untraced call runs no tracing code at all.
The exporter: SHARDSTATE_OTEL_FILE=PATH appends finished spans to PATH as JSON lines (one
`os.write` per span, so processes can share the file); otherwise OTLP when
opentelemetry-exporter-otlp is installed (it reads the standard OTEL_EXPORTER_OTLP_*
variables), else spans go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

ENV = "SHARDSTATE_OTEL"
FILE_ENV = "SHARDSTATE_OTEL_FILE"
TRACEPARENT = "traceparent"

ON = False  # set by setup(); read by the servers when they build their handlers
_tracer: Any = None


def wanted() -> bool:
    """SHARDSTATE_OTEL is set to a true value (1, true, yes, on)."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


class JsonLinesExporter:
    """A SpanExporter writing one JSON object per finished span (for tests and `jq`)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        for s in spans:
            ctx, parent = s.get_span_context(), s.parent
            line = {
                "name": s.name, "service": s.resource.attributes.get("service.name", ""),
                "trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}",
                "parent_span_id": f"{parent.span_id:016x}" if parent is not None else "",
                "start_ns": s.start_time, "end_ns": s.end_time,
                "attributes": {k: v for k, v in (s.attributes or {}).items()},
            }
            os.write(self.fd, (json.dumps(line, default=str) + "\n").encode())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def setup(service: str) -> None:
    """A server process with tracing on: a tracer provider named `service`, its exporter."""
    global ON, _tracer
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError as e:
        raise ImportError(f"--otel needs OpenTelemetry: pip install 'shardstate[otel]' ({e})") from None

    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)}))
    path = os.environ.get(FILE_ENV, "")
    if path:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))  # type: ignore[arg-type]
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("shardstate")
    ON = True


def shutdown() -> None:
    """Flush what the exporter holds (at process exit)."""
    if ON:
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
        if hasattr(provider, "shutdown"):
            provider.shutdown()


def incoming(metadata: Sequence[tuple[str, Any]] | None) -> Any:
    """The otel context named by a call's `traceparent` metadata (None without)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {k: v for k, v in (metadata or ()) if k in (TRACEPARENT, "tracestate")}
    return TraceContextTextMapPropagator().extract(carrier) if carrier else None


def in_span() -> bool:
    """The caller runs inside a span (a call it makes has a trace to continue). Only once
    `client_interceptors()` found tracing on: it imports opentelemetry."""
    from opentelemetry import trace

    return bool(trace.get_current_span().get_span_context().is_valid)


def outgoing() -> tuple[tuple[str, str], ...]:
    """Metadata carrying the current span's context to the next hop."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return tuple(carrier.items())


@contextlib.contextmanager
def server_span(name: str, metadata: Sequence[tuple[str, Any]] | None, **attrs: Any) -> Iterator[Any]:
    """A span for an incoming call, child of the caller's span when it sent one."""
    from opentelemetry import trace

    with _tracer.start_as_current_span(name, context=incoming(metadata), kind=trace.SpanKind.SERVER,
                                       attributes=attrs) as s:
        yield s


@contextlib.contextmanager
def span(name: str, **attrs: Any) -> Iterator[Any]:
    """A child of the current span."""
    with _tracer.start_as_current_span(name, attributes=attrs) as s:
        yield s


def ended_span(name: str, traceparent: str, start_ns: int, **attrs: Any) -> None:
    """A span `name`, child of the span `traceparent` names, from `start_ns` until now (work
    whose caller's context came in a message rather than in a call's metadata)."""
    parent = incoming(((TRACEPARENT, traceparent),))
    _tracer.start_span(name, context=parent, start_time=start_ns, attributes=attrs).end()


def client_interceptors(aio: bool = False) -> list[Any]:
    """Interceptors adding the caller's current trace context to every unary call of the
    client library; [] unless SHARDSTATE_OTEL is on and opentelemetry is installed."""
    if not wanted():
        return []
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return []
    import grpc

    if aio:
        class AioInject(grpc.aio.UnaryUnaryClientInterceptor):
            async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
                return await continuation(_Details(details, [*(details.metadata or ()), *outgoing()]), request)

        return [AioInject()]

    class Inject(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return continuation(_Details(details, [*(details.metadata or ()), *outgoing()]), request)

    return [Inject()]


class _Details:
    """ClientCallDetails with other metadata (the gRPC type is a namedtuple-like interface)."""

    def __init__(self, d: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = d.method
        self.timeout = d.timeout
        self.metadata = metadata
        self.credentials = d.credentials
        self.wait_for_ready = d.wait_for_ready
        self.compression = getattr(d, "compression", None)


def traced(fn: Any, name: str) -> Any:
    """The coroutine function `fn`, each call in a span `name` (child of the current one)."""

    async def call(*args: Any, **kw: Any) -> Any:
        with span(name):
            return await fn(*args, **kw)

    return call


def traced_handler(handler: Any, name: str) -> Any:
    """A unary gRPC handler `(request, context)`, each call in a server span `name`, child of
    the span its caller sent in `traceparent`."""

    async def call(request: Any, context: Any) -> Any:
        with server_span(name, context.invocation_metadata()):
            return await handler(request, context)

    return call
