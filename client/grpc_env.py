"""The grpcio transport shardstate asks for, set in the environment before grpcio loads.

grpcio 1.85 moves every TCP read and write of a call through EventEngine threads, which hand
each completion to the completion-queue poller thread, which wakes the asyncio loop: about
nine thread switches per message round trip on a bidi stream. Its poll-based endpoints (the
`event_engine_client` and `event_engine_listener` experiments turned off) let the poller do
the socket I/O itself. Measured with a bare grpc.aio bidi echo between two processes (12 KB
messages, one in flight): CPU per round trip 165 -> 110 us on each side, 9 -> 6 context
switches, 280 -> 165 us wall; in `benchmarks/compare` (step workload) the router's CPU per
step fell 16% and steps/s rose 5-10%.

grpcio reads GRPC_EXPERIMENTS once, when it is imported, so this module runs before anything
imports grpc: `import shardstate` (every shardstate process, and a program using the client
library) sets it, imports grpc, and removes it again, so the programs this process starts
(other gRPC implementations among them) do not inherit it; shardstate's own child processes
set it themselves. Nothing changes when GRPC_EXPERIMENTS is already set - an empty value keeps
grpcio's defaults - or when grpc was imported first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, MutableMapping

EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def _load_grpc() -> None:
    import grpc  # noqa: F401  (grpcio reads GRPC_EXPERIMENTS now)


def tune(environ: MutableMapping[str, str] = os.environ,
         loaded: Callable[[], bool] = lambda: "grpc" in sys.modules,
         load: Callable[[], None] = _load_grpc) -> bool:
    """Load grpc with EXPERIMENTS when GRPC_EXPERIMENTS is unset and grpc is not loaded yet,
    then unset the variable again; True when it did."""
    if "GRPC_EXPERIMENTS" in environ or loaded():
        return False
    environ["GRPC_EXPERIMENTS"] = EXPERIMENTS
    try:
        load()
    finally:
        del environ["GRPC_EXPERIMENTS"]
    return True


# The experiments this process's grpcio was loaded with ("": grpcio's own defaults or the
# caller's GRPC_EXPERIMENTS).
applied = EXPERIMENTS if tune() else ""
