"""The observability flags every server process takes (shard and router alike): the
Prometheus endpoint and OpenTelemetry tracing; both off unless asked for."""

from __future__ import annotations

from dataclasses import dataclass

from .config import opt

METRICS_OFF = -1


@dataclass
class Observability:
    metrics_port: int = opt(METRICS_OFF, "serve Prometheus metrics at http://METRICS_HOST:PORT/metrics; 0 picks a free port (written to PORT_FILE.metrics and logged); -1 = no endpoint")
    metrics_host: str = opt("127.0.0.1", "address the metrics endpoint binds (0.0.0.0 for a scraper on another machine)")
    otel: bool = opt(False, "OpenTelemetry tracing (pip install 'shardstate[otel]'): spans for forwards, storage writes and semi-sync waits, W3C traceparent propagated; the exporter follows the standard OTEL_ variables (OTLP by default, SHARDSTATE_OTEL_FILE=PATH writes JSON lines)")
