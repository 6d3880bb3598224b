"""Batch across shards: split ops by owner, run the sub-batches concurrently, reassemble in order.

Ops stay encoded. An op whose shard answered WrongShard/NotPrimary is re-split after a map
refresh and retried (bounded hops); a sub-batch that failed whole gives each of its ops that
error, so the other shards' results still reach the caller.

The answer's byte budget (BatchRequest.max_response_bytes, or the router's
--max-response-bytes) is shared equally by the sub-batches sent at once (budget.share); a later
round (redirected ops, reads a replica could not serve) shares what the answers so far left.
Results come back as the shards gave them: an op a shard left unprocessed stays unprocessed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from shardstate.common import budget, errors
from shardstate.common.auth import OP_FIELD_NAME, OP_FIELD_ROLE, Gate
from shardstate.common.clustermap import ClusterView
from shardstate.router.forward import Forwarder, Route
from shardstate.router.replicas import from_replicas, replica_reads
from shardstate.router.shardlink import ShardLinks, SubBatchError, expire_at
from shardstate.router.wire import (
    RawBatchResponse,
    error_result,
    limit_result,
    op_target,
    redirect_of,
)
from shardstate.v1 import types_pb2

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


# ---- pure logic ----


def split(
    sessions: Sequence[tuple[str, str] | None], indexes: Sequence[int], owner: Callable[[str, str], str]
) -> tuple[dict[str, list[int]], list[int]]:
    """Group op indexes by owning shard id, keeping request order within each group.
    Returns (groups, indexes of ops with no operation set)."""
    groups: dict[str, list[int]] = {}
    empty: list[int] = []
    for i in indexes:
        s = sessions[i]
        if s is None:
            empty.append(i)
        else:
            groups.setdefault(owner(*s), []).append(i)
    return groups, empty


def sessions_of(ops: Sequence[bytes], results: list[bytes | None],
                gate: Gate | None = None) -> tuple[list[tuple[str, str] | None], set[int]]:
    """Each op's (namespace, session_id) (None: no op set), checked at the edge: an op that
    does not parse or names a session in bad UTF-8 gets its INVALID_ARGUMENT result here and
    is never sent, so it cannot fail the shard message it would share with other callers' ops.
    With a `gate` (auth on), an op whose namespace or role the caller's token does not grant,
    or over its namespace's ops/s, gets that error the same way, alone.
    Returns the sessions and the indexes of those bad ops."""
    sessions: list[tuple[str, str] | None] = []
    bad: set[int] = set()
    for i, op in enumerate(ops):
        try:
            target = op_target(op, i)
        except errors.InvalidArgumentError as e:
            sessions.append(None)
            bad.add(i)
            results[i] = error_result(INVALID_ARGUMENT, e.message)
            continue
        if target is None:
            sessions.append(None)
            continue
        ns, sid, field = target
        if gate is not None:
            err = gate.op(ns, OP_FIELD_ROLE[field], f"ops[{i}] {OP_FIELD_NAME[field]}")
            if err is not None:
                sessions.append(None)
                bad.add(i)
                results[i] = limit_result(err)
                continue
        sessions.append((ns, sid))
    return sessions, bad


def place(results: list[bytes | None], indexes: Sequence[int], sub_results: Sequence[bytes]) -> list[int]:
    """Put a sub-batch's results at their ops' positions; return the indexes to retry
    (redirected ops), leaving those unset."""
    retry: list[int] = []
    for i, r in zip(indexes, sub_results, strict=True):
        if redirect_of(r) is not None:
            retry.append(i)
        else:
            results[i] = r
    return retry


def assemble(header: bytes, results: Sequence[bytes | None]) -> bytes:
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise errors.InternalError(f"batch results missing for ops {missing[:10]}")
    return bytes(RawBatchResponse(header=header, results=results).SerializeToString())


def router_header(view: ClusterView, node: str) -> bytes:
    return bytes(types_pb2.ResponseHeader(epoch=view.epoch, node=node).SerializeToString())


# ---- running a batch ----


class BatchRunner:
    def __init__(self, fwd: Forwarder, links: ShardLinks, max_batch_ops: int, node: str,
                 max_response_bytes: int = budget.DEFAULT_MAX_RESPONSE_BYTES) -> None:
        self.fwd = fwd
        self.links = links
        self.max_batch_ops = max_batch_ops
        self.node = node
        self.max_response_bytes = max_response_bytes
        self._by_id: tuple[ClusterView | None, dict[str, Any]] = (None, {})

    def _shards(self, view: ClusterView) -> dict[str, Any]:
        """The view's shards by id (remembered for the current view: a map's shard list is
        searched per group otherwise)."""
        seen, by_id = self._by_id
        if seen is not view:
            by_id = {}
            for s in view.pb.shards:
                by_id.setdefault(s.id, s)  # the first, as ClusterView.shard
            self._by_id = (view, by_id)
        return by_id

    def check(self, n: int) -> None:
        if n > self.max_batch_ops:
            raise errors.LimitExceededError.of("max_batch_ops", self.max_batch_ops, n, "ops in the batch")

    async def run(self, ops: Sequence[bytes], deadline: float, replicas: bool = True, gate: Gate | None = None,
                  max_response_bytes: int = 0) -> bytes:
        """Encoded BatchResponse for encoded ops; `gate`: the caller's token, checked per op;
        `max_response_bytes`: the caller's byte budget for the answer (0: the router's)."""
        self.check(len(ops))
        limit = budget.effective(max_response_bytes, self.max_response_bytes)
        results: list[bytes | None] = [None] * len(ops)
        sessions, bad = sessions_of(ops, results, gate)
        # EVENTUAL / min_revision reads go to replicas meanwhile (router/replicas.py).
        view0 = self.fwd.maps.view
        relaxed = replica_reads(view0, ops, self.fwd.replicas) if replicas and any(s.replicas for s in view0.pb.shards) else {}
        if bad and relaxed:
            relaxed = {i: a for i, a in relaxed.items() if i not in bad}
        on_replicas = None
        reserved = 0  # of the budget, what the replicas' sub-batches were given
        used = 0  # bytes of the results placed so far
        pending = [i for i in range(len(ops)) if i not in relaxed and i not in bad]
        headers: dict[str, bytes] = {}
        last_redirect = ""
        for _ in range(self.fwd.max_hops + 1):
            view = self.fwd.maps.view
            if not view.pb.shards:
                raise errors.UnavailableError("the router has no cluster map yet; try again shortly")
            groups, empty = split(sessions, pending, view.ring.owner)
            for i in empty:
                results[i] = error_result(INVALID_ARGUMENT, f"ops[{i}] has no operation set")
            if relaxed and on_replicas is None:
                replica_parts = len(set(relaxed.values()))
                share = budget.share(limit, len(groups) + replica_parts)
                reserved = share * replica_parts
                on_replicas = asyncio.ensure_future(
                    from_replicas(self.links, self.fwd.replicas, ops, relaxed, deadline, share))
            else:
                share = budget.share(limit - used - reserved, len(groups))
            by_id = self._shards(view)
            shard_of = {sid: by_id.get(sid) for sid in groups}
            outcomes = await self._subs(
                [(shard_of[sid], [ops[i] for i in idx] if len(idx) < len(ops) else list(ops)) for sid, idx in groups.items()],
                deadline, share,
            )
            pending = []
            redirects: list[tuple[Route, Any]] = []
            for (sid, idx), outcome in zip(groups.items(), outcomes, strict=True):
                shard = shard_of[sid]
                assert shard is not None
                if isinstance(outcome, SubBatchError):
                    moved = outcome.code == grpc.StatusCode.UNAVAILABLE and await self.fwd.after_unavailable(Route(view, shard))
                    if moved:
                        pending.extend(idx)
                        continue
                    msg = outcome.message
                    if outcome.code == grpc.StatusCode.UNAVAILABLE:
                        msg = f"shard {shard.id} at {shard.primary} is unavailable: {outcome.message}"
                    failed = (error_result(outcome.code.value[0], msg) if outcome.error is None
                              else limit_result(outcome.error))
                    for i in idx:
                        results[i] = failed
                    continue
                header, subs = outcome
                headers[sid] = header
                if len(subs) != len(idx):
                    for i in idx:
                        results[i] = error_result(UNAVAILABLE, f"shard {sid} answered {len(subs)} results for {len(idx)} ops")
                    continue
                retry = place(results, idx, subs)
                used += sum([len(r) for r in subs])
                if retry:
                    redirect = redirect_of(subs[idx.index(retry[0])])
                    redirects.append((Route(view, shard), redirect))
                    last_redirect = f"shard {sid}: {str(redirect).strip()}"
                    pending.extend(retry)
            if not pending:
                break
            for route_, redirect in redirects:
                await self.fwd.after_redirect(route_, redirect)
            pending.sort()
        for i in pending:
            results[i] = error_result(
                UNAVAILABLE, f"routing did not settle after {self.fwd.max_hops} redirects (last: {last_redirect})"
            )
        if on_replicas is not None:
            served, leftover = await on_replicas
            for i, r in served.items():
                results[i] = r
            if leftover:  # the primary answers what the replicas could not, within what is left
                left = max(1, limit - used - sum([len(r) for r in served.values()]))
                sub = RawBatchResponse.FromString(await self.run([ops[i] for i in leftover], deadline, replicas=False,
                                                                 max_response_bytes=left))
                for i, r in zip(leftover, sub.results, strict=True):
                    results[i] = r
        header = next(iter(headers.values())) if len(headers) == 1 else router_header(self.fwd.maps.view, self.node)
        return assemble(header, results)

    async def _subs(self, parts: list[tuple[Any, list[bytes]]], deadline: float,
                    share: int) -> list[tuple[bytes, list[bytes]] | SubBatchError]:
        """Each (shard, ops) sent to its shard's primary at once, each with `share` bytes of
        answer budget; the outcomes in order, one timer bounding them all."""
        loop = asyncio.get_running_loop()
        if deadline <= loop.time():
            late = SubBatchError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the shard answered")
            return [late] * len(parts)
        waiting = [(shard.primary, self.links.submit(shard.primary, ops, deadline, share)) for shard, ops in parts]
        timer = expire_at(deadline, waiting)
        outcomes: list[tuple[bytes, list[bytes]] | SubBatchError] = []
        try:
            for _, fut in waiting:
                try:
                    outcomes.append(await fut)
                except SubBatchError as e:
                    outcomes.append(e)
        finally:
            timer.cancel()
            for _, fut in waiting:
                fut.cancel()  # only those not answered: the caller gave up (cancelled)
        return outcomes
