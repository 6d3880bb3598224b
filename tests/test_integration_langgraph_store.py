"""The LangGraph stores against a real `shardstate dev` cluster, compared with LangGraph's own
`InMemoryStore` on the same calls (hypothesis state machines, sync and async), then TTLs.

What differs by design, and how the comparison allows for it: this store's `search` returns
items in (namespace, key) order (InMemoryStore: insertion order), so the reference's full
result is sorted before offset/limit are applied; InMemoryStore lists a namespace that was
only read or whose items were all deleted (its defaultdict), so those are dropped from the
reference after every step; timestamps are not compared."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("langgraph.store.memory")

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from langgraph.store.base import GetOp, ListNamespacesOp, MatchCondition, PutOp, SearchOp
from langgraph.store.memory import InMemoryStore

from shardstate import AsyncClient, Client
from shardstate.integrations.langgraph import AsyncShardStateStore, ShardStateStore
from tests.langgraph_support import fresh_prefix, router
from tests.stubs import uid

__all__ = ["router"]

labels = st.sampled_from(["a", "b", "c"])
namespaces = st.lists(labels, min_size=1, max_size=3).map(tuple)
prefixes = st.lists(labels, min_size=0, max_size=2).map(tuple)
keys = st.sampled_from(["k1", "k2", "k3"])
values = st.fixed_dictionaries({"x": st.integers(0, 3), "tag": st.sampled_from(["p", "q"])})
filters = st.one_of(st.none(), st.fixed_dictionaries({"tag": st.sampled_from(["p", "q"])}),
                    st.fixed_dictionaries({"x": st.fixed_dictionaries({"$gte": st.integers(0, 3)})}))
conditions = st.lists(st.builds(
    MatchCondition, match_type=st.sampled_from(["prefix", "suffix"]),
    path=st.lists(st.sampled_from(["a", "b", "c", "*"]), min_size=1, max_size=2).map(tuple)),
    max_size=2).map(tuple)


def view(item: Any) -> Any:
    return None if item is None else (item.namespace, item.key, item.value)


class StoreMachine(RuleBasedStateMachine):
    """One store against InMemoryStore; subclasses say how to call the store."""

    def __init__(self) -> None:
        super().__init__()
        self.ref = InMemoryStore()

    def call(self, ops: list[Any]) -> list[Any]:
        raise NotImplementedError

    def both(self, ops: list[Any]) -> tuple[list[Any], list[Any]]:
        got = self.call(ops)
        want = self.ref.batch(ops)
        for ns in [n for n, d in self.ref._data.items() if not d]:
            del self.ref._data[ns]
        return got, want

    def check_search(self, op: SearchOp, got: Any) -> None:
        full = self.ref.search(op.namespace_prefix, filter=op.filter, limit=10_000)
        full.sort(key=lambda i: (i.namespace, i.key))
        assert [view(i) for i in got] == [view(i) for i in full[op.offset:op.offset + op.limit]]

    @rule(ns=namespaces, key=keys, value=values)
    def put(self, ns: tuple[str, ...], key: str, value: dict[str, Any]) -> None:
        self.both([PutOp(ns, key, value)])

    @rule(ns=namespaces, key=keys)
    def delete(self, ns: tuple[str, ...], key: str) -> None:
        self.both([PutOp(ns, key, None)])

    @rule(ns=namespaces, key=keys)
    def get(self, ns: tuple[str, ...], key: str) -> None:
        got, want = self.both([GetOp(ns, key)])
        assert view(got[0]) == view(want[0])

    @rule(prefix=prefixes, filter=filters, limit=st.integers(1, 6), offset=st.integers(0, 4))
    def search(self, prefix: tuple[str, ...], filter: Any, limit: int, offset: int) -> None:
        op = SearchOp(prefix, filter, limit, offset)
        got = self.call([op])[0]
        self.check_search(op, got)

    @rule(conds=conditions, max_depth=st.one_of(st.none(), st.integers(1, 3)),
          limit=st.integers(1, 20), offset=st.integers(0, 3))
    def list_namespaces(self, conds: Any, max_depth: Any, limit: int, offset: int) -> None:
        got, want = self.both([ListNamespacesOp(conds or None, max_depth, limit, offset)])
        assert got == want

    @rule(ns=namespaces, key=keys, v1=values, v2=values)
    def batch_reads_before_writes(self, ns: tuple[str, ...], key: str, v1: Any, v2: Any) -> None:
        got, want = self.both([PutOp(ns, key, v1), GetOp(ns, key), PutOp(ns, key, v2),
                               SearchOp(ns[:1], None, 50, 0)])
        assert view(got[1]) == view(want[1])  # the get sees the state before the batch
        assert got[0] is None and got[2] is None
        assert sorted(map(view, got[3])) == sorted(map(view, want[3]))

    @invariant()
    def everything_matches(self) -> None:
        got = self.call([SearchOp((), None, 1000, 0)])[0]
        self.check_search(SearchOp((), None, 1000, 0), got)


SETTINGS = settings(max_examples=20, stateful_step_count=15, deadline=None,
                    suppress_health_check=list(HealthCheck))


def test_sync_store_matches_in_memory_store(router: str) -> None:
    with Client(router) as client:
        class Sync(StoreMachine):
            def __init__(self) -> None:
                super().__init__()
                self.store = ShardStateStore(client, prefix=fresh_prefix())

            def call(self, ops: list[Any]) -> list[Any]:
                return self.store.batch(ops)

        Sync.TestCase.settings = SETTINGS
        Sync.TestCase().runTest()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    try:
        yield lp
    finally:
        lp.close()


def test_async_store_matches_in_memory_store(router: str, loop: asyncio.AbstractEventLoop) -> None:
    client = AsyncClient(router)

    class Async(StoreMachine):
        def __init__(self) -> None:
            super().__init__()
            self.store = AsyncShardStateStore(client, prefix=fresh_prefix())

        def call(self, ops: list[Any]) -> list[Any]:
            return loop.run_until_complete(self.store.abatch(ops))

    Async.TestCase.settings = SETTINGS
    try:
        Async.TestCase().runTest()
    finally:
        loop.run_until_complete(client.close())


def test_ttl_default_expiry_and_refresh_on_read(router: str) -> None:
    ttl_min = 3 / 60  # 3 s
    with ShardStateStore(router, prefix=fresh_prefix(),
                         ttl={"default_ttl": ttl_min, "refresh_on_read": True}) as store:
        assert store.supports_ttl
        store.put(("u", "1"), "read", {"v": 1})      # default TTL, kept alive by reads
        store.put(("u", "1"), "idle", {"v": 2})      # default TTL, never read
        store.put(("u", "1"), "forever", {"v": 3}, ttl=None)
        deadline = time.monotonic() + 60
        while store.get(("u", "1"), "idle", refresh_ttl=False) is not None:
            assert time.monotonic() < deadline, "an item with a TTL never expired"
            assert store.get(("u", "1"), "read") is not None  # refreshes its TTL
            time.sleep(0.3)
        assert store.get(("u", "1"), "read").value == {"v": 1}
        assert store.get(("u", "1"), "forever").value == {"v": 3}
        assert [i.key for i in store.search(("u",), refresh_ttl=False)] == ["forever", "read"]
        assert store.list_namespaces() == [("u", "1")]
        store.delete(("u", "1"), "forever")
        time.sleep(3.5)
        assert store.get(("u", "1"), "read", refresh_ttl=False) is None
        assert store.list_namespaces() == []


def test_async_store_owns_its_client_and_rejects_queries(router: str) -> None:
    async def main() -> None:
        async with AsyncShardStateStore(router, prefix=fresh_prefix()) as store:
            await store.aput(("docs", uid()), "d", {"text": "hello"})
            assert [i.value for i in await store.asearch(("docs",))] == [{"text": "hello"}]
            with pytest.raises(NotImplementedError, match="vector"):
                await store.asearch(("docs",), query="hello")
            with pytest.raises(Exception, match=r"'\.'"):
                await store.aput(("a.b",), "k", {"x": 1})

    asyncio.run(main())


def test_async_store_sync_methods_from_another_thread(router: str) -> None:
    async def main() -> None:
        async with AsyncShardStateStore(router, prefix=fresh_prefix()) as store:
            await store.aput(("a",), "k", {"n": 1})  # binds the store to this loop
            await asyncio.to_thread(store.put, ("a", "b"), "k2", {"n": 2})
            got = await asyncio.to_thread(store.search, ("a",))
            assert [(i.namespace, i.key, i.value) for i in got] == [
                (("a",), "k", {"n": 1}), (("a", "b"), "k2", {"n": 2})]
            assert await asyncio.to_thread(store.list_namespaces, max_depth=1) == [("a",)]
            with pytest.raises(RuntimeError, match="another thread"):
                store.get(("a",), "k")

    asyncio.run(main())
