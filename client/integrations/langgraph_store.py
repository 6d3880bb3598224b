"""LangGraph long-term memory on shardstate: `ShardStateStore` (sync `Client`) and
`AsyncShardStateStore` (`AsyncClient`), both `BaseStore`s with TTLs and no vector index.

Each namespace tuple is one shardstate session, `{prefix}{'.'.join(namespace)}` (LangGraph
forbids '.' in labels), and each item one key `i/{key}` holding JSON `{"v": value, "c":
created_at, "u": updated_at, "t": ttl minutes}`. An item's TTL is the key's own TTL, so the
server hides and reclaims expired items; a read with `refresh_ttl` re-puts the item (a CAS on
the version it read, so it never overwrites a newer write). `search` and `list_namespaces`
find namespaces with `ListSessions` over the prefix; `search` returns items in (namespace,
key) order.

Within one `batch`, as in `InMemoryStore`, every read sees the state before the batch's
puts, and the last put of a (namespace, key) wins.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from langgraph.store.base import (
    BaseStore,
    GetOp,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    TTLConfig,
)

from shardstate import AsyncClient, Client, Record

from .langgraph_driver import (
    AsyncDriver,
    Delete,
    Get,
    Plan,
    Put,
    Request,
    Scan,
    Sessions,
    SyncDriver,
)

DEFAULT_PREFIX = "lgs/"


def _validate(labels: Sequence[str]) -> None:
    for label in labels:
        if not isinstance(label, str) or not label or "." in label or "\0" in label:
            raise InvalidNamespaceError(
                f"Invalid namespace label {label!r} in {tuple(labels)}: labels are non-empty "
                "strings without '.' or NUL")


def _compare(item_value: Any, want: Any) -> bool:
    """A filter value against an item's value, as InMemoryStore compares them."""
    if isinstance(want, dict):
        if any(k.startswith("$") for k in want):
            return all(_operator(item_value, k, v) for k, v in want.items())
        if not isinstance(item_value, dict):
            return False
        return all(_compare(item_value.get(k), v) for k, v in want.items())
    if isinstance(want, (list, tuple)):
        return (isinstance(item_value, (list, tuple)) and len(item_value) == len(want)
                and all(_compare(a, b) for a, b in zip(item_value, want, strict=True)))
    return bool(item_value == want)


def _operator(value: Any, op: str, arg: Any) -> bool:
    if op == "$eq":
        return bool(value == arg)
    if op == "$ne":
        return bool(value != arg)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        a, b = float(value), float(arg)
        return {"$gt": a > b, "$gte": a >= b, "$lt": a < b, "$lte": a <= b}[op]
    raise ValueError(f"Unsupported operator: {op}")


def _matches(cond: MatchCondition, ns: tuple[str, ...]) -> bool:
    path = tuple(cond.path)
    if len(ns) < len(path):
        return False
    pairs = zip(ns, path, strict=False) if cond.match_type == "prefix" else \
        zip(reversed(ns), reversed(path), strict=False)
    if cond.match_type not in ("prefix", "suffix"):
        raise ValueError(f"Unsupported match type: {cond.match_type}")
    return all(p == "*" or k == p for k, p in pairs)


class _StoreCore:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def sid(self, ns: tuple[str, ...]) -> str:
        return self.prefix + ".".join(ns)

    def ns_of(self, sid: str) -> tuple[str, ...]:
        return tuple(sid[len(self.prefix):].split("."))

    @staticmethod
    def item(ns: tuple[str, ...], rec: Record, cls: type[Item] = Item) -> Any:
        d = json.loads(rec.value)
        return cls(namespace=ns, key=rec.key[2:], value=d["v"],
                   created_at=datetime.fromisoformat(d["c"]),
                   updated_at=datetime.fromisoformat(d["u"]))

    @staticmethod
    def refresh(sid: str, rec: Record) -> Put | None:
        ttl = json.loads(rec.value).get("t")
        return Put(sid, rec.key, rec.value, ttl=ttl * 60, expect=rec.version) if ttl else None

    def batch(self, batch_ops: Iterable[Op]) -> Plan[list[Result]]:
        ops: list[Any] = list(batch_ops)
        results: list[Any] = [None] * len(ops)
        reads: list[Request] = []
        where: list[tuple[int, str]] = []  # (op index, what the read is for)
        puts: dict[tuple[tuple[str, ...], str], PutOp] = {}
        searches: list[int] = []
        listings: list[int] = []
        for i, op in enumerate(ops):
            if isinstance(op, GetOp):
                _validate(op.namespace)
                reads.append(Get(self.sid(op.namespace), f"i/{op.key}"))
                where.append((i, "get"))
            elif isinstance(op, PutOp):
                _validate(op.namespace)
                if not op.namespace:
                    raise InvalidNamespaceError("Namespace cannot be empty.")
                puts[(op.namespace, op.key)] = op
            elif isinstance(op, SearchOp):
                _validate(op.namespace_prefix)
                if op.query:
                    raise NotImplementedError("this store has no vector index: search(query=...) "
                                              "is not supported; use filter=")
                searches.append(i)
            elif isinstance(op, ListNamespacesOp):
                for c in op.match_conditions or ():
                    _validate([p for p in c.path if p != "*"])
                listings.append(i)
            else:
                raise ValueError(f"Unknown operation type: {type(op)}")
        refreshes: list[Request] = []
        if reads:
            got = yield reads
            for (i, _), rec in zip(where, got, strict=True):
                op = ops[i]
                results[i] = None if rec is None else self.item(op.namespace, rec)
                if rec is not None and op.refresh_ttl:
                    r = self.refresh(self.sid(op.namespace), rec)
                    if r is not None:
                        refreshes.append(r)
        for i in searches:
            results[i], more = yield from self.search(ops[i])
            refreshes.extend(more)
        for i in listings:
            results[i] = yield from self.list_namespaces(ops[i])
        writes: list[Request] = list(refreshes)
        now = datetime.now(UTC).isoformat()
        for (ns, key), op in puts.items():
            sid = self.sid(ns)
            if op.value is None:
                writes.append(Delete(sid, f"i/{key}"))
            else:
                ttl = op.ttl
                doc = json.dumps({"v": op.value, "c": now, "u": now, "t": ttl},
                                 separators=(",", ":")).encode()
                writes.append(Put(sid, f"i/{key}", doc, ttl=ttl * 60 if ttl else None))
        if writes:
            yield writes
        return results

    def namespaces(self, prefix: tuple[str, ...]) -> Plan[list[tuple[str, ...]]]:
        """Every namespace under `prefix` that holds an item, sorted."""
        start = self.sid(prefix) if prefix else self.prefix
        (infos,) = yield [Sessions(start, info=True)]
        cands = [self.ns_of(i.session_id) for i in infos if i.key_count > 0]
        cands = [ns for ns in cands if ns[:len(prefix)] == prefix]
        if not cands:
            return []
        probes = yield [Scan(self.sid(ns), "i/", keys_only=True, limit=1) for ns in cands]
        return sorted(ns for ns, found in zip(cands, probes, strict=True) if found)

    def search(self, op: SearchOp) -> Plan[tuple[list[SearchItem], list[Request]]]:
        found = yield from self.namespaces(tuple(op.namespace_prefix))
        out: list[SearchItem] = []
        refreshes: list[Request] = []
        skip, want = max(0, op.offset), max(0, op.limit)
        for ns in found:
            if len(out) >= want:
                break
            limit = None if op.filter else skip + want - len(out)
            (recs,) = yield [Scan(self.sid(ns), "i/", limit=limit)]
            for rec in recs:
                item = self.item(ns, rec, SearchItem)
                if op.filter and not all(_compare(item.value.get(k), v) for k, v in op.filter.items()):
                    continue
                if skip:
                    skip -= 1
                    continue
                if len(out) >= want:
                    break
                out.append(item)
                if op.refresh_ttl:
                    r = self.refresh(self.sid(ns), rec)
                    if r is not None:
                        refreshes.append(r)
        return out, refreshes

    def list_namespaces(self, op: ListNamespacesOp) -> Plan[list[tuple[str, ...]]]:
        literal: tuple[str, ...] = ()
        for c in op.match_conditions or ():
            if c.match_type == "prefix":
                lit = []
                for p in c.path:
                    if p == "*":
                        break
                    lit.append(p)
                if len(lit) > len(literal):
                    literal = tuple(lit)
        found = yield from self.namespaces(literal)
        found = [ns for ns in found if all(_matches(c, ns) for c in op.match_conditions or ())]
        if op.max_depth is not None:
            found = sorted({ns[:op.max_depth] for ns in found})
        return found[op.offset:op.offset + op.limit]


class ShardStateStore(BaseStore):
    """A LangGraph `BaseStore` on shardstate through a sync `Client` (or an address: then it
    makes and `close()` closes its own). `ttl`: a `TTLConfig` (`default_ttl` in minutes,
    `refresh_on_read`); `namespace`: the shardstate namespace; `prefix`: of the session ids."""

    supports_ttl = True

    def __init__(self, client_or_address: Client | str, *, ttl: TTLConfig | None = None,
                 namespace: str | None = None, prefix: str = DEFAULT_PREFIX) -> None:
        self._driver = SyncDriver(client_or_address, ttl=None, namespace=namespace)
        self._core = _StoreCore(prefix)
        self.ttl_config = ttl

    @property
    def client(self) -> Client:
        return self._driver.client

    def close(self) -> None:
        self._driver.close()

    def __enter__(self) -> ShardStateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        return self._driver.run(self._core.batch(ops))

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        return await asyncio.to_thread(self.batch, list(ops))


class AsyncShardStateStore(BaseStore):
    """The same store through an `AsyncClient` (or an address); the reads of one `abatch`
    go out at once, then its writes. Its sync `batch` runs `abatch` on the store's event loop
    from another thread."""

    supports_ttl = True

    def __init__(self, client_or_address: AsyncClient | str, *, ttl: TTLConfig | None = None,
                 namespace: str | None = None, prefix: str = DEFAULT_PREFIX) -> None:
        self._driver = AsyncDriver(client_or_address, ttl=None, namespace=namespace)
        self._core = _StoreCore(prefix)
        self.ttl_config = ttl
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def client(self) -> AsyncClient:
        return self._driver.client

    async def aclose(self) -> None:
        await self._driver.close()

    async def __aenter__(self) -> AsyncShardStateStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return await self._driver.run(self._core.batch(ops))

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop or not loop.is_running():
            raise RuntimeError("AsyncShardStateStore's sync methods run on its event loop and must "
                               "be called from another thread; in sync code use ShardStateStore")
        return asyncio.run_coroutine_threadsafe(self.abatch(list(ops)), loop).result()
