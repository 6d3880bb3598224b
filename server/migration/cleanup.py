"""Dropping sessions a shard holds but no longer owns, once a rebalance has ended and
`--moved-data-grace-s` passed (docs/design.md §6.4). Only under a map with no rebalance
running: during one, a target holds sessions it does not own yet."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..node import Node
from ..storage import encoding as enc
from ..storage.engine import Engine
from .keys import SessionFilter

log = logging.getLogger("shardstate.migration.cleanup")
CHUNK = 2000


async def drop_unowned(node: Node, engine: Engine, still: Callable[[], bool]) -> int:
    """Delete every key of a session the node's map gives another shard; `still()` False
    stops it (a rebalance started). Returns the keys deleted."""
    epoch = node.epoch
    view = node.view
    if not view.epoch or not view.ring or view.pb.migrations:
        return 0
    me = node.shard_id
    pick = SessionFilter(lambda ns, sid: view.ring.owner(ns, sid) != me)
    skip = (enc.CHANGE[0], enc.NODE[0])
    n = 0
    batch: list[tuple[bytes, bytes | None]] = []
    for k in engine.store.db.iterator(include_value=False):
        if k[0] in skip or not pick.pick(k):
            continue
        batch.append((k, None))
        if len(batch) >= CHUNK:
            if not still() or node.epoch != epoch:
                return n
            await engine.write_raw(batch)
            n += len(batch)
            batch = []
            await asyncio.sleep(0)
    if batch and still() and node.epoch == epoch:
        await engine.write_raw(batch)
        n += len(batch)
    if n:
        log.info("dropped sessions that moved away", extra={"fields": {"keys": n, "epoch": epoch}})
    return n
