"""The I/O layer shared by the LangGraph saver and store: their logic is written once, as
generators that yield a list of requests to run (at once, where the client can) and receive
the list of answers; a sync driver runs them with a `Client`, an async one with an
`AsyncClient` (whose concurrent ops ride in one batch per round trip).

    def plan():
        rec, keys = yield [Get("thread-1", "c/x"), Scan("thread-1", "w/", keys_only=True)]
        return rec
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

from shardstate import AsyncClient, AsyncSession, Client, ConflictError, Session, Txn

T = TypeVar("T")
MAX_TXN_OPS = 256  # ops per chunk of a bulk rewrite (the server allows 1000 per Txn)
MAX_TXN_BYTES = 2 << 20  # bytes of values per chunk (the server's request limit is 4 MiB)


@dataclass(slots=True)
class Get:
    sid: str
    key: str


@dataclass(slots=True)
class Scan:
    """The keys of the session under `prefix` after `start_after`, in key order, at most
    `limit` (None: all, every page): [Record]."""

    sid: str
    prefix: str
    keys_only: bool = False
    limit: int | None = None
    start_after: str = ""


@dataclass(slots=True)
class Commit:
    """One Txn on the session: `build(txn)` adds its compares and ops; answers TxnResult."""

    sid: str
    build: Callable[[Txn[Any]], Any]


@dataclass(slots=True)
class Put:
    """A put with a key TTL (seconds); with `expect`, a CAS whose conflict answers None."""

    sid: str
    key: str
    value: bytes
    ttl: float | None = None
    expect: int | None = None


@dataclass(slots=True)
class Delete:
    sid: str
    key: str


@dataclass(slots=True)
class Drop:
    sid: str


@dataclass(slots=True)
class Sessions:
    """The ids of every session whose id starts with `prefix`, sorted (with `info`: their
    SessionInfo)."""

    prefix: str
    info: bool = False


Request: TypeAlias = Get | Scan | Put | Delete | Commit | Drop | Sessions
Plan: TypeAlias = Generator[Sequence[Request], list[Any], T]


@dataclass
class Writes:
    """Puts and deletes of one session, cut into Txns of bounded size by `plans()`."""

    sid: str
    puts: list[tuple[str, bytes]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)

    def chunks(self) -> list[Commit]:
        out: list[Commit] = []
        ops: list[tuple[str, bytes | None]] = [*self.puts, *((k, None) for k in self.deletes)]
        start = 0
        while start < len(ops):
            end, size = start, 0
            while end < len(ops) and end - start < MAX_TXN_OPS:
                v = ops[end][1]
                n = len(ops[end][0]) + (len(v) if v is not None else 0)
                if end > start and size + n > MAX_TXN_BYTES:
                    break
                size += n
                end += 1
            out.append(Commit(self.sid, _apply(ops[start:end])))
            start = end
        return out


def _apply(ops: list[tuple[str, bytes | None]]) -> Callable[[Txn[Any]], Any]:
    def build(txn: Txn[Any]) -> Any:
        for k, v in ops:
            if v is None:
                txn.delete(k)
            else:
                txn.put(k, v)
        return txn
    return build


def _handles(client: Any, ttl: float | None, namespace: str | None) -> Callable[[str], Any]:
    """Session handles by id (a handle carries the session TTL sent with every write). Made
    per request, not kept: one costs under a microsecond, and thousands kept alive would be
    walked by every full garbage collection of the agent's process."""
    return lambda sid: client.session(sid, ttl=ttl, namespace=namespace)


class SyncDriver:
    """Runs plans with a `Client` (made from an address, and then owned and closed here)."""

    def __init__(self, client_or_address: Client | str, *, ttl: float | None,
                 namespace: str | None) -> None:
        if isinstance(client_or_address, AsyncClient):
            raise TypeError("this sync class needs a shardstate.Client or an address; "
                            "for an AsyncClient use the Async... class")
        self.owned = not isinstance(client_or_address, Client)
        self.client: Client = (client_or_address if isinstance(client_or_address, Client)
                               else Client(client_or_address))
        self.namespace = namespace
        self.session = _handles(self.client, ttl, namespace)

    def run(self, plan: Plan[T]) -> T:
        answers: list[Any] | None = None
        while True:
            try:
                reqs = plan.send(answers) if answers is not None else next(plan)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            answers = [self._do(r) for r in reqs]

    def _do(self, r: Request) -> Any:
        if isinstance(r, Get):
            return self.session(r.sid).get(r.key)
        if isinstance(r, Scan):
            return self.session(r.sid).scan(r.prefix, limit=r.limit, keys_only=r.keys_only,
                                           start_after=r.start_after)
        if isinstance(r, Put):
            try:
                return self.session(r.sid).put(r.key, r.value, ttl=r.ttl, expect=r.expect)
            except ConflictError:
                return None
        if isinstance(r, Delete):
            return self.session(r.sid).delete(r.key)
        if isinstance(r, Commit):
            s: Session = self.session(r.sid)
            return r.build(s.txn()).commit()
        if isinstance(r, Drop):
            return self.session(r.sid).drop()
        return [i if r.info else i.session_id for i in self.client.list_sessions(
            r.prefix, page_size=1000, namespace=self.namespace)]

    def close(self) -> None:
        if self.owned:
            self.client.close()


class AsyncDriver:
    """Runs plans with an `AsyncClient`: the requests of one step go out concurrently, so
    the client coalesces them into one batch (one round trip)."""

    def __init__(self, client_or_address: AsyncClient | str, *, ttl: float | None,
                 namespace: str | None) -> None:
        if isinstance(client_or_address, Client):
            raise TypeError("this async class needs a shardstate.AsyncClient or an address; "
                            "for a Client use the sync class")
        self.owned = not isinstance(client_or_address, AsyncClient)
        self.client: AsyncClient = (client_or_address if isinstance(client_or_address, AsyncClient)
                                    else AsyncClient(client_or_address))
        self.namespace = namespace
        self.session = _handles(self.client, ttl, namespace)

    async def run(self, plan: Plan[T]) -> T:
        answers: list[Any] | None = None
        while True:
            try:
                reqs = plan.send(answers) if answers is not None else next(plan)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            if len(reqs) == 1:
                answers = [await self._do(reqs[0])]
            else:
                answers = list(await asyncio.gather(*(self._do(r) for r in reqs)))

    async def _do(self, r: Request) -> Any:
        if isinstance(r, Get):
            return await self.session(r.sid).get(r.key)
        if isinstance(r, Scan):
            return await self.session(r.sid).scan(r.prefix, limit=r.limit, keys_only=r.keys_only,
                                                 start_after=r.start_after)
        if isinstance(r, Put):
            try:
                return await self.session(r.sid).put(r.key, r.value, ttl=r.ttl, expect=r.expect)
            except ConflictError:
                return None
        if isinstance(r, Delete):
            return await self.session(r.sid).delete(r.key)
        if isinstance(r, Commit):
            s: AsyncSession = self.session(r.sid)
            return await r.build(s.txn()).commit()
        if isinstance(r, Drop):
            return await self.session(r.sid).drop()
        return [i if r.info else i.session_id async for i in self.client.list_sessions(
            r.prefix, page_size=1000, namespace=self.namespace)]

    async def close(self) -> None:
        if self.owned:
            await self.client.close()


def enc(part: str) -> str:
    """A name as one segment of a key: '/' and '%' escaped, so segments never run together."""
    return part.replace("%", "%25").replace("/", "%2F")


def dec(part: str) -> str:
    return part.replace("%2F", "/").replace("%25", "%")
