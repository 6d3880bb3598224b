"""The Prometheus endpoint of a shard or router (`--metrics-port`): the process's one
`metrics.Registry` adapted to a prometheus-client collector, served over HTTP on the event loop.

Served from the loop, not from prometheus-client's thread: the registry is updated without
locks on the loop's thread, and the collect hooks (sizes, lag) read loop-owned state. A scrape
runs the hooks, then renders; nothing is computed between scrapes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import portfile
from .metrics import Histogram, Registry

log = logging.getLogger("shardstate.metrics")
READ_LIMIT = 64 * 1024


class RegistryCollector:
    """prometheus_client collector over a `Registry` (read as it is at collect time)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        import prometheus_client.metrics_core as core

        for m in self.registry:
            names = list(m.labelnames)
            if isinstance(m, Histogram):
                h = core.HistogramMetricFamily(m.name, m.help, labels=names)
                for key, cell in list(m.cells.items()):
                    buckets = [(_bound(b), n) for b, n in cell.cumulative()]
                    h.add_metric([v for _, v in key], buckets, cell.sum)
                yield h
                continue
            if m.kind == "counter":
                # prometheus_client appends _total itself
                fam: Any = core.CounterMetricFamily(m.name.removesuffix("_total"), m.help, labels=names)
            else:
                fam = core.GaugeMetricFamily(m.name, m.help, labels=names)
            for key, value in list(m.samples()):
                if not names or len(key) == len(names):
                    fam.add_metric([v for _, v in key], value)
            yield fam


def _bound(b: float) -> str:
    return "+Inf" if b == float("inf") else repr(float(b))


def render(registry: Registry) -> bytes:
    """The text exposition of `registry` (call `await registry.refresh()` first)."""
    import prometheus_client

    reg = prometheus_client.CollectorRegistry(auto_describe=False)
    reg.register(RegistryCollector(registry))  # type: ignore[arg-type]
    return bytes(prometheus_client.generate_latest(reg))


class MetricsServer:
    """GET /metrics (any path) on host:port; port 0 picks one (`port` after `start`)."""

    def __init__(self, registry: Registry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None

    async def start(self, port_file: str | Path = "") -> int:
        """Bind and serve; writes the bound port to `port_file` when given."""
        import prometheus_client  # noqa: F401  (fail at start, not at the first scrape)

        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        if port_file:
            portfile.write(port_file, self.port)
        log.info("metrics serving", extra={"fields": {"metrics_address": f"{self.host}:{self.port}"}})
        return self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import prometheus_client

        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            method, path = [*head.split(b" ", 2), b"", b""][:2]
            if method not in (b"GET", b"HEAD"):
                status, ctype, body = b"405 Method Not Allowed", "text/plain", b"GET /metrics\n"
            elif path.split(b"?")[0] not in (b"/", b"/metrics"):
                status, ctype, body = b"404 Not Found", "text/plain", b"GET /metrics\n"
            else:
                await self.registry.refresh()
                status, ctype, body = b"200 OK", prometheus_client.CONTENT_TYPE_LATEST, render(self.registry)
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype.encode()
                         + b"\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n" + (body if method != b"HEAD" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("serving /metrics failed")
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def metrics_port_file(port_file: str) -> str:
    """Where a node started with --port-file P writes its metrics port: P.metrics."""
    return f"{port_file}.metrics" if port_file else ""


async def start_for(registry: Registry, metrics_port: int, host: str, port_file: str) -> MetricsServer | None:
    """The endpoint a process's flags ask for (None with --metrics-port -1)."""
    if metrics_port < 0:
        return None
    server = MetricsServer(registry, host, metrics_port)
    await server.start(metrics_port_file(port_file))
    return server
