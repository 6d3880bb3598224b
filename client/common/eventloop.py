"""The event loop shardstate processes run on: uvloop when it is installed (less CPU per
callback, future and socket event than asyncio's own loop), else asyncio's.

SHARDSTATE_UVLOOP=0 forces asyncio's loop (for comparisons and debugging).
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def uvloop_wanted() -> bool:
    if os.environ.get("SHARDSTATE_UVLOOP", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def tune_gc() -> None:
    """Servers allocate many short-lived container objects per request (protobuf wrappers,
    coroutines, futures): collect the young generation less often, and leave the objects of
    start-up (modules, descriptors) out of every collection."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on uvloop when available."""
    tune_gc()
    if uvloop_wanted():
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
