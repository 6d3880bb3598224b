"""The long-lived streams of the State service: Pipeline (batches tagged with ids, answered
out of order) and Watch (a session's changes from the change log, resumable by revision).

A Pipeline message that does not parse fails alone: its bad ops get their own results
(handlers.Partial), or, when it cannot be taken apart, its id gets INVALID_ARGUMENT; the stream
and the other messages on it carry on (a router's stream carries many callers' ops).

Both end promptly at shutdown: Pipeline answers what it has read, Watch sends what it has,
then each ends with UNAVAILABLE so the client reconnects elsewhere or later.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from shardstate.common import errors
from shardstate.common.auth import READ
from shardstate.v1 import replication_pb2, state_pb2, types_pb2

from .handlers import Malformed, Partial, authorized
from .storage.entries import events_of
from .storage.validation import ITEM_FRAMING, page_budget

if TYPE_CHECKING:
    from .service import StateService

EOF_ = object()  # the client half-closed its stream
DRAIN = object()  # the server is shutting down
PROGRESS_S = 0.9  # idle watches get a progress message at least every second
WATCH_BATCH = 256
SESSION_EVENTS = (types_pb2.SESSION_DELETE, types_pb2.SESSION_EXPIRE)
KEY_EVENTS = (types_pb2.PUT, types_pb2.DELETE, types_pb2.KEY_EXPIRE)


def shutting_down() -> errors.UnavailableError:
    return errors.UnavailableError("shard is shutting down; retry on another node or later")


async def _answer(svc: StateService, req: state_pb2.PipelineRequest | Partial) -> state_pb2.PipelineResponse:
    resp = state_pb2.PipelineResponse(id=req.id)
    try:
        await svc.batch(req if type(req) is Partial else req.batch, out=resp.batch)
    except Exception as e:
        err = errors.as_shardstate_error(e)
        resp = state_pb2.PipelineResponse(id=req.id, code=errors.to_code_int(err), message=err.message)
    return resp


async def _read_into(requests: AsyncIterator[Any], inbox: asyncio.Queue[Any]) -> None:
    try:
        async for req in requests:
            inbox.put_nowait(req)
    except Exception:
        pass  # the stream broke; the handler ends as if the client half-closed
    finally:
        inbox.put_nowait(EOF_)


def pipeline_behavior(svc: StateService) -> Callable[[AsyncIterator[Any], Any], AsyncIterator[Any]]:
    async def pipeline(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        if svc.draining:
            await errors.abort(context, shutting_down())
        auth = svc.auth
        metadata = context.invocation_metadata() if auth is not None else None
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        reader = asyncio.create_task(_read_into(requests, inbox))
        svc.streams.add(inbox)
        workers: set[asyncio.Task[state_pb2.PipelineResponse]] = set()
        ending: object | None = None

        def done(task: asyncio.Task[state_pb2.PipelineResponse]) -> None:
            workers.discard(task)
            if not task.cancelled():
                inbox.put_nowait(task.result())

        try:
            while ending is None or workers:
                item = await inbox.get()
                if type(item) is state_pb2.PipelineResponse:
                    yield item
                elif type(item) is state_pb2.PipelineRequest or type(item) is Partial:
                    if ending is not None:
                        continue  # read after DRAIN: not accepted
                    if auth is not None:  # per message: a token removed from the file stops here
                        try:
                            item = authorized(auth.gate(metadata), item)
                        except errors.ShardstateError as e:
                            yield state_pb2.PipelineResponse(id=item.id, code=errors.to_code_int(e), message=e.message)
                            continue
                    if not svc.concurrent:
                        yield await _answer(svc, item)  # nothing suspends: answer in order
                    else:
                        task = asyncio.create_task(_answer(svc, item))
                        workers.add(task)
                        task.add_done_callback(done)
                elif type(item) is Malformed:
                    if ending is None:
                        yield state_pb2.PipelineResponse(
                            id=item.id, code=errors.to_code_int(item.error()), message=item.message)
                elif ending is None:
                    ending = item  # EOF_ or DRAIN: answer what is in flight, then end
            if ending is DRAIN:
                await errors.abort(context, shutting_down())
        finally:
            svc.streams.discard(inbox)
            reader.cancel()

    return pipeline


def _matches(ev: types_pb2.Event, prefix: str) -> bool:
    if ev.type in KEY_EVENTS:
        return ev.record.key.startswith(prefix)
    return ev.type in SESSION_EVENTS


async def _acknowledged(svc: StateService, resp: state_pb2.WatchResponse) -> None:
    """With --min-replica-acks, a Watch message shows no write a failover could lose, as no
    read does (docs/design.md §5.4): it waits until its last event is acknowledged."""
    barrier = svc.ack_barrier
    if barrier is None or not resp.events:
        return
    revision = resp.events[-1].revision
    try:
        await barrier(revision)
    except errors.UnavailableError:
        raise errors.UnavailableError(
            f"this watch would show a write (revision {revision}) that fewer replicas acknowledged "
            "than --min-replica-acks requires, so a failover could lose it; resume after the last "
            "progress_revision once a replica has caught up"
        ) from None


def watch_behavior(svc: StateService) -> Callable[[state_pb2.WatchRequest, Any], AsyncIterator[Any]]:
    async def watch(req: state_pb2.WatchRequest, context: Any) -> AsyncIterator[Any]:
        engine = svc.engine
        try:
            if svc.draining:
                raise shutting_down()
            ref = engine.ref(req.namespace, req.session_id)
            if svc.auth is not None:
                svc.auth.gate(context.invocation_metadata()).call(req.namespace, READ, "Watch")
            svc.node.check_owner(req.namespace, req.session_id)
            start = req.from_revision or engine.revision() + 1
            oldest = engine.oldest_revision()
            if start < oldest:
                raise errors.HistoryCompactedError.of(start, oldest)
        except Exception as e:
            await errors.abort(context, e)
            return
        prefix = req.prefix
        max_bytes = page_budget(engine.limits)
        parse = replication_pb2.ChangeEntry.FromString
        loop = asyncio.get_running_loop()
        # First message: the watch is in place; everything from `start` on will follow.
        yield svc.header(state_pb2.WatchResponse(progress_revision=start - 1))
        last_sent = loop.time()
        node, ns, sid = svc.node, req.namespace, req.session_id
        while not svc.draining:
            # Moved by a rebalance: what this shard still has of the session is sent, then
            # WrongShard; the router resumes on the new owner after the last revision shown.
            moved = not node.owns(ns, sid)
            try:
                batch = engine.changes_since_raw(start, WATCH_BATCH)
            except errors.HistoryCompactedError as e:  # the watcher fell behind retention
                await errors.abort(context, e)
                return
            resp = state_pb2.WatchResponse()
            # Whether more is already there: a full batch, or one cut short to keep the message
            # within what a default client accepts (as Scan and ReadLog pages; a lone entry goes
            # whole). Without the cut, a run of large writes made a message no client could
            # take, and a resumed watch asked for the same message again.
            more = len(batch) >= WATCH_BATCH
            budget = max_bytes
            for rev, raw in batch:
                entry = parse(raw)
                if entry.session_id == ref.sid and entry.namespace == ref.ns:
                    events = events_of(entry)
                    if prefix:
                        events = [ev for ev in events if _matches(ev, prefix)]
                    size = sum(ev.ByteSize() + ITEM_FRAMING for ev in events)
                    if resp.events and budget < size:
                        more = True
                        break
                    budget -= size
                    resp.events.extend(events)
                start = rev + 1
            try:
                await _acknowledged(svc, resp)
            except errors.UnavailableError as e:
                await errors.abort(context, e)
                return
            if moved:
                if resp.events:
                    resp.progress_revision = resp.events[-1].revision
                    yield svc.header(resp)
                if not more:
                    try:
                        node.check_owner(ns, sid)
                    except Exception as e:
                        await errors.abort(context, e)
                        return
                continue
            resp.progress_revision = start - 1 if more else max(start - 1, engine.revision())
            fence = svc.fence.active() if svc.fence is not None else None
            if fence is not None and fence.holds(ns, sid):
                # Handing over: the new owner's revisions for this session start above the
                # fence's, so progress shown here must not pass it.
                resp.progress_revision = min(resp.progress_revision, fence.revision)
            now = loop.time()
            if resp.events or now - last_sent >= PROGRESS_S:
                yield svc.header(resp)
                last_sent = now
            if not more:
                await engine.wait_for_change(max(0.0, PROGRESS_S - (loop.time() - last_sent)))
        await errors.abort(context, shutting_down())

    return watch
