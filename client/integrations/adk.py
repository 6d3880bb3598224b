"""Google ADK sessions on shardstate: `ShardStateSessionService`, a `BaseSessionService` whose
sessions, events and app/user state live in shardstate sessions. Needs `shardstate[adk]`.

Layout (each name part percent-encoded, so "/" only separates):
    adk/APP/USER/SID   key "meta": {"state": session-scoped state, "t": last_update_time,
                       "n": events}; stream "events": one ADK Event (JSON) per entry, seqs 1..n
    adk.user/APP/USER  key "s/NAME" per user: state key (JSON)
    adk.app/APP        key "s/NAME" per app: state key (JSON)
An event is one Txn on its session (the meta CAS, the new meta and the event together): the
version of "meta" is the session's revision marker, so a writer holding an older copy gets
StaleSessionError, in any process. list_sessions reads the sessions of one user (or app) as
one id range (ListSessions by prefix) and their metas in batches.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote

from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.platform import time as platform_time
from google.adk.platform import uuid as platform_uuid
from google.adk.sessions import _session_util
from google.adk.sessions.base_session_service import (
    BaseSessionService,
    GetSessionConfig,
    ListSessionsResponse,
)
from google.adk.sessions.session import Session
from google.adk.sessions.state import State
from typing_extensions import override

from shardstate import AsyncSession, Record
from shardstate.integrations._async_client import async_client

META, EVENTS, SCOPED = "meta", "events", "s/"
BATCH = 1000  # keys per multi_get / Txn: the server's default max_batch_ops
READS_IN_FLIGHT = 4  # list_sessions: meta batches read at once
KNOWN_SESSIONS = 10_000  # (version, meta) of sessions this service last read or wrote

STALE = ("The session has been modified in storage since it was loaded (its revision is "
         "{have}, storage has {now}). Reload it with get_session and retry.")


def _part(name: str) -> str:
    return quote(name, safe="")


def session_key(app_name: str, user_id: str, session_id: str) -> str:
    return f"adk/{_part(app_name)}/{_part(user_id)}/{_part(session_id)}"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class ShardStateSessionService(BaseSessionService):
    """ADK's session service on a shardstate cluster. `client_or_address`: a
    shardstate.AsyncClient to share, or a router address (or list) for which the service
    makes its own AsyncClient, closed by `close()` / `async with`.

    Matches InMemorySessionService call for call (app: and user: state shared across
    sessions, temp: never stored), across processes: every instance on the same cluster
    sees the same sessions. State values are stored as JSON (as DatabaseSessionService
    does): tuples come back as lists. Not atomic across scopes: an event's app: and user:
    deltas are written right after its session Txn, not in it."""

    def __init__(self, client_or_address: Any) -> None:
        self.client, self._owns_client = async_client(client_or_address, "ShardStateSessionService")
        self._known: OrderedDict[str, tuple[int, dict[str, Any]]] = OrderedDict()

    # ---- the handles ----

    def _session(self, app_name: str, user_id: str, session_id: str) -> AsyncSession:
        return self.client.session(session_key(app_name, user_id, session_id))

    def _user(self, app_name: str, user_id: str) -> AsyncSession:
        return self.client.session(f"adk.user/{_part(app_name)}/{_part(user_id)}")

    def _app(self, app_name: str) -> AsyncSession:
        return self.client.session(f"adk.app/{_part(app_name)}")

    def _remember(self, key: str, version: int, meta: dict[str, Any]) -> None:
        self._known[key] = (version, meta)
        self._known.move_to_end(key)
        while len(self._known) > KNOWN_SESSIONS:
            self._known.popitem(last=False)

    # ---- scoped (app: / user:) state ----

    @staticmethod
    async def _scoped(s: AsyncSession) -> dict[str, Any]:
        return {r.key[len(SCOPED):]: json.loads(r.value)
                for r in await s.scan(SCOPED, limit=None)}

    @staticmethod
    async def _write_scoped(s: AsyncSession, delta: dict[str, Any]) -> None:
        items = list(delta.items())
        for i in range(0, len(items), BATCH):
            txn = s.txn()
            for name, value in items[i:i + BATCH]:
                txn.put(SCOPED + name, _dumps(value))
            await txn.commit()

    async def _write_deltas(self, app_name: str, user_id: str,
                            deltas: dict[str, dict[str, Any]]) -> None:
        writes = []
        if deltas["app"]:
            writes.append(self._write_scoped(self._app(app_name), deltas["app"]))
        if deltas["user"]:
            writes.append(self._write_scoped(self._user(app_name, user_id), deltas["user"]))
        await asyncio.gather(*writes)

    @staticmethod
    def _to_session(app_name: str, user_id: str, session_id: str, version: int,
                    meta: dict[str, Any], events: list[Event], app_state: dict[str, Any],
                    user_state: dict[str, Any]) -> Session:
        state = dict(meta["state"])
        state.update((State.APP_PREFIX + k, v) for k, v in app_state.items())
        state.update((State.USER_PREFIX + k, v) for k, v in user_state.items())
        # model_construct: these fields are ours, read back; validating them costs about
        # as much as the rest of a listing.
        session = Session.model_construct(id=session_id, app_name=app_name, user_id=user_id,
                                          state=state, events=events,
                                          last_update_time=float(meta["t"]))
        session._storage_update_marker = str(version)
        return session

    # ---- BaseSessionService ----

    @override
    async def create_session(self, *, app_name: str, user_id: str,
                             state: dict[str, Any] | None = None,
                             session_id: str | None = None) -> Session:
        sid = (session_id.strip() if session_id else None) or platform_uuid.new_uuid()
        deltas = _session_util.extract_json_safe_state_delta(state or {})
        meta = {"state": deltas["session"], "t": platform_time.get_time(), "n": 0}
        s = self._session(app_name, user_id, sid)
        r = await s.txn().if_missing(META).put(META, _dumps(meta)).commit()
        if not r:
            raise AlreadyExistsError(f"Session with id {sid} already exists.")
        self._remember(s.session_id, r[0], meta)
        await self._write_deltas(app_name, user_id, deltas)
        app_state, user_state = await asyncio.gather(
            self._scoped(self._app(app_name)), self._scoped(self._user(app_name, user_id)))
        return self._to_session(app_name, user_id, sid, r[0], meta, [], app_state, user_state)

    @override
    async def get_session(self, *, app_name: str, user_id: str, session_id: str,
                          config: GetSessionConfig | None = None) -> Session | None:
        sid = session_id.strip() if session_id else session_id
        s = self._session(app_name, user_id, sid)
        rec = await s.get(META)
        if rec is None:
            return None
        meta = json.loads(rec.value)
        recent = config.num_recent_events if config else None
        # The events this meta counts (1..n), not any appended since it was read.
        events: Any = (s.read(EVENTS, to_seq=meta["n"], last=recent or 0)
                       if meta["n"] and recent != 0 else _nothing())
        entries, app_state, user_state = await asyncio.gather(
            events, self._scoped(self._app(app_name)), self._scoped(self._user(app_name, user_id)))
        evs = [Event.model_validate_json(e.data) for e in entries]
        if config and config.after_timestamp is not None:
            # As InMemorySessionService: the events after the last one older than the bound.
            i = len(evs) - 1
            while i >= 0 and evs[i].timestamp >= config.after_timestamp:
                i -= 1
            evs = evs[i + 1:]
        self._remember(s.session_id, rec.version, meta)
        return self._to_session(app_name, user_id, sid, rec.version, meta, evs, app_state,
                                user_state)

    @override
    async def list_sessions(self, *, app_name: str,
                            user_id: str | None = None) -> ListSessionsResponse:
        """Sessions without events, oldest update first. Reads the ids of one user's (or the
        app's) sessions as one range, and their metas 1 000 per batch while it pages."""
        prefix = f"adk/{_part(app_name)}/" + (f"{_part(user_id)}/" if user_id is not None else "")
        gate = asyncio.Semaphore(READS_IN_FLIGHT)

        async def metas(ids: list[str]) -> list[Record | None]:
            async with gate:
                return await self.client.multi_get([(i, META) for i in ids])

        ids: list[str] = []
        reads: list[asyncio.Task[list[Record | None]]] = []
        page: list[str] = []
        async for info in self.client.list_sessions(prefix, page_size=BATCH):
            page.append(info.session_id)
            if len(page) == BATCH:
                reads.append(asyncio.ensure_future(metas(page)))
                ids.extend(page)
                page = []
        if page:
            reads.append(asyncio.ensure_future(metas(page)))
            ids.extend(page)
        records = [r for batch in await asyncio.gather(*reads) for r in batch]

        owners = [tuple(unquote(p) for p in i[len(prefix):].split("/"))
                  if user_id is None else (user_id, unquote(i[len(prefix):])) for i in ids]
        users = sorted({u for u, _ in owners})
        app_state, *user_states = await asyncio.gather(
            self._scoped(self._app(app_name)),
            *(self._scoped(self._user(app_name, u)) for u in users))
        by_user = dict(zip(users, user_states, strict=True))
        sessions = [
            self._to_session(app_name, uid, sid, rec.version, json.loads(rec.value), [],
                             app_state, by_user[uid])
            for (uid, sid), rec in zip(owners, records, strict=True)
            if rec is not None  # deleted while listing
        ]
        sessions.sort(key=lambda x: (x.last_update_time, x.user_id, x.id))
        return ListSessionsResponse(sessions=sessions)

    @override
    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        sid = session_id.strip() if session_id else session_id
        s = self._session(app_name, user_id, sid)
        await s.drop()
        self._known.pop(s.session_id, None)

    @override
    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        return await self._scoped(self._user(app_name, user_id))

    @override
    async def append_event(self, session: Session, event: Event) -> Event:
        """Stores the event and its state delta in one Txn that holds only if the session's
        revision is still the one `session` was read at; else StaleSessionError (or
        SessionNotFoundError when it was deleted). Returns the event; `session` gets it."""
        if event.partial:
            return event
        if any(e == event for e in session.events if e.id == event.id):
            return event  # an equal re-delivery, as InMemorySessionService: stored once
        s = self._session(session.app_name, session.user_id, session.id)
        marker = session._storage_update_marker
        known = self._known.get(s.session_id)
        if marker is not None and known is not None and str(known[0]) == marker:
            expect, base = known
        else:
            rec = await s.get(META)
            if rec is None:
                raise SessionNotFoundError(f"Session {session.id} not found.")
            expect, base = rec.version, json.loads(rec.value)
            if marker is not None and marker != str(expect):
                raise StaleSessionError(STALE.format(have=marker, now=expect))
            if marker is None and base["n"] > len(session.events):
                # A session object not read from this service: stale when storage holds
                # events it does not.
                raise StaleSessionError(STALE.format(have=f"{len(session.events)} events",
                                                     now=f"{base['n']} events"))

        delta = event.actions.state_delta if event.actions and event.actions.state_delta else {}
        kept = {k: v for k, v in delta.items() if not k.startswith(State.TEMP_PREFIX)}
        stored = event if len(kept) == len(delta) else event.model_copy(
            update={"actions": event.actions.model_copy(update={"state_delta": kept})})
        deltas = _session_util.extract_json_safe_state_delta(kept)
        meta = {"state": {**base["state"], **deltas["session"]}, "t": event.timestamp,
                "n": base["n"] + 1}
        r = await (s.txn().if_version(META, expect)
                   .put(META, _dumps(meta)).append(EVENTS, [stored.model_dump_json(exclude_none=True)])
                   .otherwise().get(META).commit())
        if not r:
            self._known.pop(s.session_id, None)
            current = r[0]
            if current is None:
                raise SessionNotFoundError(f"Session {session.id} not found.")
            raise StaleSessionError(STALE.format(have=expect, now=current.version))
        self._remember(s.session_id, r[0], meta)
        await self._write_deltas(session.app_name, session.user_id, deltas)
        # As BaseSessionService.append_event: temp: state reaches the session object only.
        self._apply_temp_state(session, event)
        event = self._trim_temp_delta_state(event)
        self._commit_event_to_session(session, event)
        session.last_update_time = event.timestamp
        session._storage_update_marker = str(r[0])
        return event

    # ---- lifetime ----

    async def close(self) -> None:
        """Closes the AsyncClient if this service made it (a shared client stays open)."""
        if self._owns_client:
            await self.client.close()

    async def __aenter__(self) -> ShardStateSessionService:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


async def _nothing() -> list[Any]:
    return []


__all__ = ["ShardStateSessionService", "session_key"]
