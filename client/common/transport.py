"""The gRPC transport settings of shardstate's processes: `tune()`, the process-wide grpcio
transport the shard, router and bench entry points choose before grpcio loads, and
`channel_options()`, the options of every channel the client, routers and replicas open.

grpcio 1.85 moves every TCP read and write of a call through EventEngine threads, which hand
each completion to the completion-queue poller thread, which wakes the asyncio loop: about
nine thread switches per message round trip on a bidi stream. Its poll-based endpoints (the
`event_engine_client` and `event_engine_listener` experiments turned off) let the poller do
the socket I/O itself. Measured with a bare grpc.aio bidi echo between two processes (12 KB
messages, one in flight): CPU per round trip 165 -> 110 us on each side, 9 -> 6 context
switches, 280 -> 165 us wall; in `benchmarks/compare` (step workload) the router's CPU per
step fell 16% and steps/s rose 5-10%.

grpcio reads GRPC_EXPERIMENTS once, when it is imported, so `tune()` runs before anything
imports grpc, in the entry points of shardstate's own processes (the `shardstate` command,
which runs every shard, router and dev supervisor, and the bench harness): it sets the variable, imports
grpc and removes it again, so the programs the process starts (other gRPC implementations
among them) do not inherit it; shardstate's own child processes tune themselves. Nothing
changes when GRPC_EXPERIMENTS is already set - an empty value keeps grpcio's defaults - or
when grpc was imported first. Importing the client library never calls it: an agent's process
keeps grpcio's defaults unless it sets GRPC_EXPERIMENTS itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

EXPERIMENTS = "-event_engine_client,-event_engine_listener"
# The experiments tune() loaded grpcio with in this process ("": it did not run, or grpcio kept
# its own defaults or the caller's GRPC_EXPERIMENTS).
applied = ""


def _load_grpc() -> None:
    import grpc  # noqa: F401  (grpcio reads GRPC_EXPERIMENTS now)


def tune(environ: MutableMapping[str, str] = os.environ,
         loaded: Callable[[], bool] = lambda: "grpc" in sys.modules,
         load: Callable[[], None] = _load_grpc) -> bool:
    """Load grpc with EXPERIMENTS when GRPC_EXPERIMENTS is unset and grpc is not loaded yet,
    then unset the variable again; True when it did."""
    if "GRPC_EXPERIMENTS" in environ or loaded():
        return False
    global applied
    environ["GRPC_EXPERIMENTS"] = EXPERIMENTS
    try:
        load()
    finally:
        del environ["GRPC_EXPERIMENTS"]
    applied = EXPERIMENTS
    return True


MiB = 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB  # above the server's request limit, so the server names it


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # gRPC's reconnect backoff grows to 120 s by default; a restarted node must be found
        # again within about a second, or every retry in between fails fast.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        *extra,
    ]
