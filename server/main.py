"""`shardstate shard`: one shard server process (State + Admin + health + reflection on
grpc.aio), from flags/env to a serving, drainable process.

Process contract: binds --listen (port 0 picks one), writes the bound port to --port-file
atomically once serving, JSON logs on stderr, SIGTERM/SIGINT drain within --grace-s, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shardstate.common import (
    auth,
    authwire,
    config,
    eventloop,
    jsonlog,
    portfile,
    promexport,
    tls,
    tracing,
)
from shardstate.common.clustermap import load_cluster_file
from shardstate.common.errors import RECEIVE_SLACK_BYTES, InvalidArgumentError
from shardstate.common.supervision import (
    DirectoryInUse,
    describe_pid,
    die_with_supervisor,
    lock_holder,
)
from shardstate.server.config import ShardConfig
from shardstate.v1 import admin_pb2, state_pb2

from . import handlers, opmetrics
from .admin import AdminService
from .migration import Migrations
from .node import Node
from .nodegate import NodeGate
from .quota import Quota
from .replication import Replication
from .replication.manager import ADDRESS_META
from .service import StateService
from .storage.engine import Engine

log = logging.getLogger("shardstate.shard")
SETTLE_QUIET_S = 0.05  # shutdown: no new call for this long means the queue is empty
SETTLE_QUIET_MAX_S = 1.0  # ... but clients that keep retrying cannot hold shutdown longer
STATE_SERVICE = state_pb2.DESCRIPTOR.services_by_name["State"]
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"]


class StartupError(Exception):
    pass


def advertised(listen: str, port: int) -> str:
    host = listen.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = socket.getfqdn()
    return f"{host}:{port}"


def make_server(cfg: ShardConfig, authorizer: auth.Authorizer | None = None) -> grpc.aio.Server:
    # TLS on: node-to-node calls need a cluster certificate (server/nodegate.py); auth on:
    # every call a token, node-to-node calls the cluster token (client/common/authwire.py).
    interceptors = [NodeGate(cfg.tls_node_name)] if cfg.tls_files() is not None else []
    interceptors += authwire.server_interceptors(authorizer, node=True) or []
    return grpc.aio.server(interceptors=interceptors or None, options=[
        ("grpc.max_receive_message_length", cfg.max_request_bytes + RECEIVE_SLACK_BYTES),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),  # a second process on the same port must fail, not share it
    ])


async def serve(cfg: ShardConfig) -> int:
    try:
        engine = Engine.open(cfg)
    except Exception as e:
        # LevelDB's LOCK is an fcntl lock: EAGAIN means another process holds the directory.
        if "LOCK" in str(e) and "temporarily unavailable" in str(e):
            raise DirectoryInUse(Path(cfg.data_dir), lock_holder(Path(cfg.data_dir) / "LOCK")) from None
        raise StartupError(f"cannot open the data directory {cfg.data_dir!r}: {e}") from e
    try:
        return await _serve(cfg, engine)
    finally:
        await engine.close()


async def _serve(cfg: ShardConfig, engine: Engine) -> int:
    if cfg.otel:
        try:
            tracing.setup(f"shardstate-shard-{cfg.id}")
        except ImportError as e:
            raise StartupError(str(e)) from None
    authorizer, cluster_token = auth.from_config(cfg.auth_file, cfg.cluster_token_file)
    authwire.set_cluster_token(cluster_token)  # node-to-node channels send it
    node = Node(cfg.id, engine)
    if cfg.cluster:
        node.adopt(load_cluster_file(cfg.cluster))
    server = make_server(cfg, authorizer)
    try:
        # mTLS: every caller (router, peer shard, direct-mode client) presents a certificate of the CA.
        port = tls.add_port(server, cfg.listen, cfg.tls_files(), require_client_auth=True)
    except RuntimeError as e:
        raise StartupError(f"cannot listen on {cfg.listen}: {e}") from e
    if not port:
        raise StartupError(f"cannot listen on {cfg.listen}")
    node.address = advertised(cfg.listen, port)
    state = StateService(engine, node, authorizer)
    handlers.register(server, STATE_SERVICE, state.behaviors())
    quota = Quota(authorizer, node, engine, cfg.usage_poll_s) if authorizer is not None else None
    if quota is not None:
        quota.register(server)
    repl = Replication(cfg, node, engine, state)
    repl.register(server)
    moves = Migrations(cfg, node, engine, repl)
    moves.register(server)
    state.fence = moves.fences
    admin = AdminService(node, state).behaviors()
    repl.wire_admin(admin)
    handlers.register(server, ADMIN_SERVICE, admin)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (STATE_SERVICE.full_name, ADMIN_SERVICE.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for name in ("", STATE_SERVICE.full_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    opmetrics.data_gauges(node, node.metrics)
    auth.export_refusals(node.metrics, authorizer)
    engine.on_sweep = opmetrics.sweep_counters(node.metrics)
    try:
        metrics = await promexport.start_for(node.metrics, cfg.metrics_port, cfg.metrics_host, cfg.port_file)
    except OSError as e:
        raise StartupError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: {e}") from e
    previous = (engine.node_meta(ADDRESS_META) or b"").decode()  # repl.start() records the new one
    # A replica serves once it has caught up with its primary (Admin answers meanwhile).
    await repl.start()
    await moves.start()
    await asyncio.wait([asyncio.ensure_future(repl.ready()), asyncio.ensure_future(stop.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        # Back under a new address (port 0): take the old one's place in the map before
        # reporting ready, so routers and replicas find this node again (docs/design.md §6).
        try:
            await repl.maps.announce(previous)
        except Exception:
            log.exception("announcing the new address in the cluster map failed")
    for name in ("", STATE_SERVICE.full_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    node.serving = True
    if cfg.port_file and not stop.is_set():
        portfile.write(cfg.port_file, port)
    sweeper = asyncio.create_task(engine.run_sweeper())
    poller = asyncio.create_task(quota.run()) if quota is not None else None
    log.info("serving", extra={"fields": {
        "shard_id": cfg.id, "address": node.address, "port": port, "data_dir": cfg.data_dir,
        "revision": engine.revision(), "epoch": node.epoch, "fsync": cfg.fsync,
        "role": "replica" if node.is_replica else "primary", "primary": node.primary,
        "auth": authorizer is not None,
    }})
    await stop.wait()

    log.info("draining", extra={"fields": {"grace_s": cfg.grace_s}})
    node.serving = False
    await health_servicer.enter_graceful_shutdown()
    state.drain()
    await settle(state, loop.time() + cfg.grace_s)
    await moves.stop()
    await repl.stop()
    await server.stop(cfg.grace_s)
    if metrics is not None:
        await metrics.stop()
    for task in (sweeper, poller):
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
    if quota is not None:
        await quota.close()
    tracing.shutdown()
    log.info("stopped", extra={"fields": {"revision": engine.revision()}})
    return 0


async def settle(state: StateService, deadline: float) -> None:
    """Keep serving while draining: in-flight calls finish, and calls gRPC has queued but not
    yet handed to a handler get UNAVAILABLE (server.stop would cancel them: CANCELLED, which
    a client cannot safely retry). Bounded by the grace period and SETTLE_QUIET_MAX_S."""
    loop = asyncio.get_running_loop()
    quiet_until = min(deadline, loop.time() + SETTLE_QUIET_MAX_S)
    while loop.time() < deadline:
        if state.in_flight.value():
            await asyncio.sleep(0.005)
            continue
        seen = state.received.value()
        await asyncio.sleep(SETTLE_QUIET_S)
        if (state.received.value() == seen and not state.in_flight.value()) or loop.time() >= quiet_until:
            return


def main(argv: list[str]) -> int:
    die_with_supervisor()
    parser = argparse.ArgumentParser(prog="shardstate shard", description="Run one shard server.")
    config.add_arguments(parser, ShardConfig)
    cfg = config.from_args(ShardConfig, parser.parse_args(argv))
    try:
        cfg.validate()
    except InvalidArgumentError as e:
        print(f"shardstate shard: {e.message}", file=sys.stderr)
        return 2
    jsonlog.setup(component="shard", shard_id=cfg.id)
    tls.use(cfg.tls_files())  # this shard's channels to its peers present its certificate
    try:
        return eventloop.run(serve(cfg))
    except DirectoryInUse as e:
        who = describe_pid(e.pid) if e.pid else "another process"
        print(f"shardstate shard: the data directory {e.path} is in use: {who} holds its lock; "
              "stop it first or use another --data-dir", file=sys.stderr)
        return 1
    except (StartupError, InvalidArgumentError) as e:
        log.error("cannot start", extra={"fields": {"error": str(e)}})
        print(f"shardstate shard: {e}", file=sys.stderr)
        return 1
