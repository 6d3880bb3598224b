"""`shardstate router`: the router process (grpc.aio), its wiring, start-up and graceful stop.

Serving order: bind, learn the cluster map (health NOT_SERVING meanwhile), report SERVING and
write the port file; on SIGTERM/SIGINT report NOT_SERVING, let in-flight calls finish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardstate.common import (
    auth,
    authwire,
    config,
    errors,
    eventloop,
    jsonlog,
    portfile,
    promexport,
    tls,
    tracing,
)
from shardstate.common.grpcserve import register_servicer
from shardstate.common.jsonlog import fields
from shardstate.common.metrics import Registry
from shardstate.common.supervision import die_with_supervisor
from shardstate.router.admin import RouterAdmin
from shardstate.router.batching import BatchRunner
from shardstate.router.config import RouterConfig
from shardstate.router.forward import Forwarder
from shardstate.router.listing import Lister
from shardstate.router.maps import MapHolder
from shardstate.router.metrics import RouterMetrics
from shardstate.router.nodes import NodePool
from shardstate.router.pipeline import PipelineHandler
from shardstate.router.service import SERVICE, StateService
from shardstate.router.shardlink import ShardLinks
from shardstate.router.watch import WatchProxy
from shardstate.v1 import admin_pb2

log = logging.getLogger("shardstate.router")

class Router:
    """Everything one router process holds, wired together."""

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.auth, cluster_token = auth.from_config(cfg.auth_file, cfg.cluster_token_file)
        authwire.set_cluster_token(cluster_token)  # sent to every node (router/nodes.py)
        self.nodes = NodePool()
        seeds = [s.strip() for s in cfg.seeds.split(",") if s.strip()]
        self.maps = MapHolder(self.nodes, seeds, cfg.cluster, cfg.refresh_interval_s)
        self.metrics = Registry()  # the process's one registry (docs/design.md §9)
        auth.export_refusals(self.metrics, self.auth)
        self.links = ShardLinks(self.nodes, self.metrics, use_pipeline=cfg.shard_pipeline,
                                max_ops=cfg.max_batch_ops, max_bytes=cfg.max_request_bytes,
                                max_response_bytes=cfg.max_response_bytes)
        self.fwd = Forwarder(self.maps, self.nodes, cfg.max_hops, cfg.forward_timeout_s,
                             links=self.links if cfg.shard_pipeline else None)
        self.health = health.aio.HealthServicer()
        self.server = aio.server(interceptors=authwire.server_interceptors(self.auth, node=False), options=[
            ("grpc.max_receive_message_length", cfg.max_request_bytes + errors.RECEIVE_SLACK_BYTES),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ])
        # TLS on: plain TLS for the router's clients (no client certificate asked for); its
        # own channels to the shards present its (cluster) certificate.
        self.port = tls.add_port(self.server, cfg.listen, cfg.tls_files(), require_client_auth=False)
        host = cfg.listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        self.serving = False
        runner = BatchRunner(self.fwd, self.links, cfg.max_batch_ops, self.address, cfg.max_response_bytes)
        calls = RouterMetrics(self.metrics)
        self.state = StateService(
            self.fwd, runner, Lister(self.fwd, self.address), WatchProxy(self.fwd),
            PipelineHandler(runner, calls, self.auth), calls, self.auth,
        )
        self.admin = RouterAdmin(self.maps, self.nodes, self.address, self.metrics, lambda: self.serving)
        self.server.add_generic_rpc_handlers((self.state.handler(),))
        register_servicer(self.server, admin_pb2.DESCRIPTOR.services_by_name["Admin"], self.admin)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE, admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
             health.SERVICE_NAME, reflection.SERVICE_NAME],
            self.server,
        )

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def run(self, stop: asyncio.Event) -> None:
        await self.set_serving(False)
        await self.server.start()
        cfg = self.cfg
        metrics = await promexport.start_for(self.metrics, cfg.metrics_port, cfg.metrics_host, cfg.port_file)
        log.info("router listening", extra=fields(address=self.address, auth=self.auth is not None))
        boot = asyncio.ensure_future(self.maps.bootstrap())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({boot, stopper}, return_when=asyncio.FIRST_COMPLETED)
        periodic = None
        if boot.done():
            if boot.exception() is not None:
                await self.server.stop(0)
                if metrics is not None:
                    await metrics.stop()
                await self.nodes.close()
                boot.result()  # raises: e.g. an unreadable cluster file
            await self.set_serving(True)
            if self.cfg.port_file:
                portfile.write(self.cfg.port_file, self.port)
            log.info("router serving", extra=fields(address=self.address, epoch=self.maps.view.epoch))
            periodic = asyncio.ensure_future(self.maps.run_periodic())
            resume = asyncio.ensure_future(self.admin.rebalancer.watch())
            await stopper
            resume.cancel()
        else:
            boot.cancel()
        log.info("router draining", extra=fields(grace_s=self.cfg.grace_s))
        await self.set_serving(False)
        self.state.drain()
        if periodic is not None:
            periodic.cancel()
        await self.server.stop(self.cfg.grace_s)
        if metrics is not None:
            await metrics.stop()
        await self.links.close()
        await self.nodes.close()
        log.info("router stopped", extra=fields(**self.metrics.snapshot()))


async def serve(cfg: RouterConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if cfg.otel:
        try:
            tracing.setup("shardstate-router")
        except ImportError as e:
            raise RuntimeError(str(e)) from None
    router = Router(cfg)
    await router.run(stop)
    tracing.shutdown()


def main(argv: list[str] | None = None) -> int:
    die_with_supervisor()
    parser = argparse.ArgumentParser(prog="shardstate router", description="Run one shardstate router.")
    config.add_arguments(parser, RouterConfig)
    ns = parser.parse_args(argv)
    cfg = config.from_args(RouterConfig, ns)
    jsonlog.setup(component="router")
    tls.use(cfg.tls_files())
    try:
        cfg.validate()
        eventloop.run(serve(cfg))
    except errors.ShardstateError as e:
        log.error("router cannot start", extra=fields(error=e.message))
        print(f"shardstate router: {e.message}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        # grpc raises RuntimeError when the listen address cannot be bound (OSError: --metrics-port).
        log.error("router cannot start", extra=fields(error=str(e)))
        return 2
    with contextlib.suppress(Exception):
        logging.shutdown()
    return 0
