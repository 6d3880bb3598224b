"""Changing the cluster map: every change is a compare-and-swap on the keeper shard's primary
(`Admin.SwapClusterMap`, docs/design.md §6.2), then the new map is offered to every node.

Used by routers (admin changes, promotion, dead-node removal) and by shards (a replica's
registration, a node back under a new address). Of two changes computed from one epoch, the
keeper takes one; the other is computed again from the keeper's map, where it may no longer
apply (its `mutate` raises, or returns False).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from shardstate.common.clustermap import node_addresses
from shardstate.common.errors import FailedPreconditionError, UnavailableError, from_rpc_error
from shardstate.common.rebalance import keeper_address, keeper_id
from shardstate.v1 import admin_pb2

log = logging.getLogger("shardstate.mapswap")

SWAP_TIMEOUT_S = 3.0
ATTEMPTS = 8

Stub = Callable[[str], Any]  # address -> AdminStub
Mutate = Callable[[admin_pb2.ClusterMap], bool | None]  # False: nothing to do; raises: refused


async def _swap_at(stub: Stub, address: str, expected: int, new: admin_pb2.ClusterMap) -> admin_pb2.SwapClusterMapResponse:
    try:
        return await stub(address).SwapClusterMap(
            admin_pb2.SwapClusterMapRequest(expected_epoch=expected, map=new), timeout=SWAP_TIMEOUT_S)
    except grpc.RpcError as e:
        err = from_rpc_error(e)
        if isinstance(err, FailedPreconditionError):
            raise
        raise UnavailableError(
            f"the keeper of the cluster map (shard {keeper_id(new)}'s primary at {address}) did not "
            f"take the change: {err.message}; if that node is gone, promote a replica of shard "
            f"{keeper_id(new)}; nothing changed") from None


async def swap(stub: Stub, base: admin_pb2.ClusterMap, mutate: Mutate,
               publish: Callable[[admin_pb2.ClusterMap, Sequence[str]], Awaitable[Any]],
               also: Sequence[str] = ()) -> admin_pb2.ClusterMap | None:
    """Apply `mutate` to the authoritative map at the next epoch. `base` is the caller's newest
    map (the keeper's may be newer: then the change is computed again from it). Returns the
    new map (published to every node it names, plus `also`), None when `mutate` found
    nothing to do."""
    for attempt in range(ATTEMPTS):
        new = admin_pb2.ClusterMap()
        new.CopyFrom(base)
        if mutate(new) is False:
            return None
        new.epoch = base.epoch + 1
        # The keeper shard of the current map decides; at its primary as the new map names it
        # (a promotion of the keeper shard is decided by the promoted node, which holds the map).
        same = keeper_id(base) == keeper_id(new)
        keeper = keeper_address(new) if same else keeper_address(base)
        got = await _swap_at(stub, keeper, base.epoch, new)
        if got.swapped:
            await publish(new, [*node_addresses(new), *[a for a in also if a]])
            return new
        current = got.current
        if current.epoch < base.epoch:
            # The keeper missed a map every change before went through (it was down, or it
            # is a new keeper): give it ours, then try again.
            await publish(base, [keeper])
        else:
            base = current
        await asyncio.sleep(random.uniform(0.0, 0.02 * (attempt + 1)))
    raise UnavailableError(f"the cluster map kept changing under {ATTEMPTS} attempts; try again; nothing changed")
