"""The LangGraph checkpointers against a real `shardstate dev` cluster: the official
conformance suite (all 8 capabilities, report printed), then what the issue promises beyond
it — blobs once per channel version, write order and dedup, namespaces, TTL, list(None),
the maintenance calls' leftovers, and real graphs run and resumed on both savers."""

from __future__ import annotations

import asyncio
import operator
import time
from typing import Annotated, Any, TypedDict

import ormsgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("langgraph.checkpoint.conformance")

from langgraph.checkpoint.base import Checkpoint, empty_checkpoint
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.report import CapabilityReport
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.types import ERROR, INTERRUPT
from langgraph.graph import END, START, StateGraph

from shardstate import AsyncClient, Client
from shardstate.integrations.langgraph import AsyncShardStateSaver, ShardStateSaver
from shardstate.integrations.langgraph_threads import appended
from tests.langgraph_support import fresh_prefix, router
from tests.stubs import run, uid

__all__ = ["router"]


def cfg(thread: str, ns: str = "", cid: str | None = None) -> Any:
    c: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
    if cid:
        c["checkpoint_id"] = cid
    return {"configurable": c}


def ckpt(values: dict[str, Any], versions: dict[str, Any]) -> Checkpoint:
    c = empty_checkpoint()
    c["channel_values"] = values
    c["channel_versions"] = versions
    return c


def print_report(report: CapabilityReport, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        report.print_report()
        for name, r in sorted(report.results.items()):
            print(f"  {report.checkpointer_name} {name}: passed={r.passed} "
                  f"tests {r.tests_passed} passed, {r.tests_failed} failed")
        total = sum(r.tests_passed for r in report.results.values())
        failed = sum(r.tests_failed for r in report.results.values())
        caps = sum(1 for r in report.results.values() if r.passed)
        print(f"  conformance {report.checkpointer_name}: {caps}/8 capabilities, "
              f"{total} passed, {failed} failed")


def test_conformance_async_saver(router: str, capsys: pytest.CaptureFixture[str]) -> None:
    @checkpointer_test(name="AsyncShardStateSaver")
    async def factory() -> Any:
        saver = AsyncShardStateSaver(router, prefix=fresh_prefix())
        yield saver
        await saver.aclose()

    report = run(validate(factory))
    print_report(report, capsys)

    @checkpointer_test(name="InMemorySaver")
    async def reference() -> Any:
        yield InMemorySaver()

    ref = run(validate(reference))  # for comparison in the printed figures only
    with capsys.disabled():
        print(f"  for comparison, InMemorySaver: "
              f"{sum(1 for r in ref.results.values() if r.passed)}/8 capabilities")
    assert report.conformance_level() == "FULL"
    assert sorted(n for n, r in report.results.items() if r.passed) == sorted(
        ["put", "put_writes", "get_tuple", "list", "delete_thread", "delete_for_runs",
         "copy_thread", "prune"])
    assert all(r.tests_failed == 0 and r.tests_passed > 0 for r in report.results.values())


def test_conformance_sync_saver(router: str, capsys: pytest.CaptureFixture[str]) -> None:
    @checkpointer_test(name="ShardStateSaver")
    async def factory() -> Any:
        saver = ShardStateSaver(router, prefix=fresh_prefix())
        yield saver
        saver.close()

    report = run(validate(factory))
    print_report(report, capsys)
    assert report.conformance_level() == "FULL"
    assert sum(1 for r in report.results.values() if r.passed) == 8


def session_keys(router: str, prefix: str, thread: str) -> list[str]:
    with Client(router) as c:
        return [r.key for r in c.session(f"{prefix}t/{thread}").scan(limit=None, keys_only=True)]


def kind(key: str) -> str:
    """What a key of a thread session holds (langgraph_threads' layout)."""
    if key.startswith("b/"):
        return "blob"
    if key.startswith("x/"):
        return "part"
    return "write" if "/w/" in key else "checkpoint"


def test_channel_values_are_stored_once_per_version(router: str) -> None:
    prefix = fresh_prefix()
    with ShardStateSaver(router, prefix=prefix) as saver:
        t = uid()
        parent = None
        big = "x" * 1000
        for step in range(10):  # "a" changes every step, "b" never after the first
            versions = {"a": step + 1, "b": 1}
            new = {"a": step + 1, "b": 1} if step == 0 else {"a": step + 1}
            c = cfg(t) if parent is None else parent
            parent = saver.put(c, ckpt({"a": f"a{step}", "b": big}, versions), {"step": step}, new)
        keys = session_keys(router, prefix, t)
        blobs = [k for k in keys if k.startswith("b/")]
        assert len(blobs) == 11  # 10 versions of a, 1 of b: b is not copied per checkpoint
        assert len([k for k in keys if kind(k) == "checkpoint"]) == 10
        latest = saver.get_tuple(cfg(t))
        assert latest.checkpoint["channel_values"] == {"a": "a9", "b": big}
        first = list(saver.list(cfg(t)))[-1]
        assert first.checkpoint["channel_values"] == {"a": "a0", "b": big}


ITEMS = st.lists(st.one_of(st.text(), st.binary(), st.integers(-(2**63), 2**64 - 1)))


@given(a=ITEMS, b=ITEMS, c=ITEMS)
def test_appended_finds_exactly_what_a_list_gained(a: list[Any], b: list[Any], c: list[Any]) -> None:
    """A pure unit: the delta of a list's encoding over an earlier one (fixarray and array16
    headers included) rebuilds the new encoding byte for byte, and is found whenever the
    new list only gained items."""
    old, new, other = ormsgpack.packb(a), ormsgpack.packb(a + b), ormsgpack.packb(c)
    body = old[1 if len(a) < 16 else 3:]
    found = appended(old, new)
    assert (found is None) == (not b)
    if found is not None:
        assert found[0] + body + found[1] == new
    elsewhere = appended(old, other)
    assert elsewhere is None or elsewhere[0] + body + elsewhere[1] == other
    assert appended(old, ormsgpack.packb({"not": "a list"})) is None


@given(shape=st.lists(st.booleans(), min_size=1, max_size=40), kept=st.sets(st.integers(0, 39)),
       channels=st.integers(1, 3))
def test_deletion_order_never_leaves_a_version_without_its_chain(
        shape: list[bool], kept: set[int], channels: int) -> None:
    """A pure unit: versions 1..n of each channel, each whole or a delta on the one before
    (`shape`, chains of at most MAX_CHAIN); prune keeps some and their chains. At every point
    of the deletes in deletion_order, each version still there has its whole chain, and the
    checkpoints go first and the parts last."""
    from shardstate.integrations.langgraph_threads import (
        MAX_CHAIN,
        _bkey,
        deletion_order,
        next_version,
    )
    chains: dict[str, list[str]] = {}
    for ch in range(channels):
        version, chain = None, []
        for delta in shape:
            prev = version
            version = next_version(version)
            chain = [*chain, _bkey("", f"c{ch}", prev)] if delta and prev and len(chain) < MAX_CHAIN else []
            chains[_bkey("", f"c{ch}", version)] = chain
    blobs = list(chains)
    keep = {blobs[i] for i in kept if i < len(blobs)}
    keep |= {k for b in keep for k in chains[b]}
    gone = [b for b in blobs if b not in keep] + ["x/a/t/0", "c/%2F/ff", "c/%2F/ff/w/t/0"]
    order = deletion_order(sorted(gone))
    assert sorted(order) == sorted(gone)
    assert order[:2] == ["c/%2F/ff", "c/%2F/ff/w/t/0"] and order[-1] == "x/a/t/0"
    present = set(blobs)
    for k in order:
        present.discard(k)
        for b in present:
            assert all(c in present for c in chains[b]), (b, k)


def grow(saver: ShardStateSaver, t: str, steps: int, parent: Any = None,
         start: list[str] | None = None) -> tuple[Any, list[str]]:
    """`steps` checkpoints of thread t, each adding a 1 KiB message to channel m."""
    messages = list(start or [])
    version = None
    for step in range(steps):
        messages = [*messages, f"{step:04d}" + "\x00\xff" * 510]
        version = saver.get_next_version(version, None)
        parent = saver.put(parent or cfg(t), ckpt({"m": messages}, {"m": version}),
                           {"step": step}, {"m": version})
    return parent, messages


def test_a_growing_list_is_stored_as_deltas_and_reads_back_anywhere(router: str) -> None:
    prefix = fresh_prefix()
    with ShardStateSaver(router, prefix=prefix) as saver, \
            ShardStateSaver(router, prefix=prefix) as fresh:
        t = uid()
        _, messages = grow(saver, t, 30)
        with Client(router) as c:
            stored = sum(len(r.value) for r in c.session(f"{prefix}t/{t}").scan(prefix="b/", limit=None))
        whole = sum(len(messages[0]) * n for n in range(1, 31))  # each version stored whole
        assert stored < whole / 5  # whole at 2 of 30 versions (MAX_CHAIN 16), deltas of ~1 KiB
        # a saver that wrote none of it reads every version from the cluster
        got = [t.checkpoint["channel_values"]["m"] for t in fresh.list(cfg(t))]
        assert got == [messages[:n] for n in range(30, 0, -1)]
        fresh.prune([t], strategy="keep_latest")  # the latest's chain stays
        assert ShardStateSaver(saver.client, prefix=prefix).get_tuple(cfg(t)).checkpoint[
            "channel_values"]["m"] == messages


def test_a_delta_on_a_blob_another_saver_deleted_is_stored_whole(router: str) -> None:
    prefix = fresh_prefix()
    with ShardStateSaver(router, prefix=prefix) as a, ShardStateSaver(router, prefix=prefix) as b:
        t = uid()
        _, messages = grow(a, t, 3)
        b.delete_thread(t)  # a still remembers its versions of m, now gone
        _, messages = grow(a, t, 2, start=messages)
        reader = ShardStateSaver(a.client, prefix=prefix)
        assert reader.get_tuple(cfg(t)).checkpoint["channel_values"]["m"] == messages
        assert [len(x.checkpoint["channel_values"]["m"]) for x in reader.list(cfg(t))] == [5, 4]


def test_pending_writes_order_and_dedup(router: str) -> None:
    prefix = fresh_prefix()
    with ShardStateSaver(router, prefix=prefix) as saver:
        t = uid()
        stored = saver.put(cfg(t), ckpt({}, {}), {}, {})
        saver.put_writes(stored, [("x", "z1"), ("y", "z2")], "task-z", task_path="b")
        saver.put_writes(stored, [("x", "a1")], "task-a", task_path="b")
        saver.put_writes(stored, [("x", "m1"), ("y", "m2"), ("z", "m3")], "task-m", task_path="a")
        # a repeat of (task_id, idx) is stored once and the first value stays ...
        saver.put_writes(stored, [("x", "again"), ("y", "m2b"), ("z", "m3b"), ("w", "new")],
                         "task-m", task_path="a")  # idx 3 is new: only it is stored
        # ... while a special write (error, interrupt) replaces the one before it
        saver.put_writes(stored, [(ERROR, "first")], "task-e", task_path="c")
        saver.put_writes(stored, [(ERROR, "second"), (INTERRUPT, "stop")], "task-e",
                         task_path="c")
        # (task_path, task_id, idx) order: INTERRUPT's idx -3 before ERROR's -1
        assert saver.get_tuple(stored).pending_writes == [
            ("task-m", "x", "m1"), ("task-m", "y", "m2"), ("task-m", "z", "m3"),
            ("task-m", "w", "new"), ("task-a", "x", "a1"), ("task-z", "x", "z1"),
            ("task-z", "y", "z2"), ("task-e", INTERRUPT, "stop"), ("task-e", ERROR, "second"),
        ]
        with Client(router) as c:
            rec = c.session(f"{prefix}t/{t}").scan("c/", limit=None, keys_only=True)
        assert len([r for r in rec if "/w/" in r.key]) == 9


def test_namespaces_are_isolated_even_with_separator_characters(router: str) -> None:
    with ShardStateSaver(router, prefix=fresh_prefix()) as saver:
        t = uid()
        names = ["", "a", "a/b", "a%2Fb", "parent|child:1", "a/", "w", "c/w"]
        for ns in names:
            s = saver.put(cfg(t, ns), ckpt({"v": ns}, {"v": 1}), {"ns": ns}, {"v": 1})
            saver.put_writes(s, [("ch", f"w-{ns}")], "task")
        for ns in names:
            tup = saver.get_tuple(cfg(t, ns))
            assert tup.config["configurable"]["checkpoint_ns"] == ns
            assert tup.checkpoint["channel_values"] == {"v": ns}
            assert tup.pending_writes == [("task", "ch", f"w-{ns}")]
            assert [(x.metadata["ns"], x.pending_writes) for x in saver.list(cfg(t, ns))] == [
                (ns, [("task", "ch", f"w-{ns}")])]
        every = list(saver.list({"configurable": {"thread_id": t}}))
        assert sorted(x.config["configurable"]["checkpoint_ns"] for x in every) == sorted(names)


def test_list_none_covers_every_thread_with_filter_before_limit(router: str) -> None:
    with ShardStateSaver(router, prefix=fresh_prefix()) as saver:
        threads = [uid() for _ in range(5)]
        ids: dict[str, list[str]] = {}
        for i, t in enumerate(threads):
            parent = cfg(t)
            for step in range(3):
                parent = saver.put(parent, ckpt({}, {}), {"step": step, "owner": f"o{i % 2}",
                                                          "score": [i, step]}, {})
                ids.setdefault(t, []).append(parent["configurable"]["checkpoint_id"])
        every = list(saver.list(None))
        assert len(every) == 15
        assert {x.config["configurable"]["thread_id"] for x in every} == set(threads)
        assert len(list(saver.list(None, filter={"owner": "o0"}))) == 9
        assert [x.metadata["score"] for x in saver.list(None, filter={"score": [3, 1]})] == [[3, 1]]
        assert len(list(saver.list(None, limit=4))) == 4
        t = threads[2]
        before = list(saver.list(cfg(t), before=cfg(t, cid=ids[t][2])))
        assert [x.checkpoint["id"] for x in before] == [ids[t][1], ids[t][0]]
        assert [x.checkpoint["id"] for x in saver.list(cfg(t), limit=1)] == [ids[t][2]]


def test_ttl_expires_idle_threads_and_writes_refresh_it(router: str) -> None:
    prefix = fresh_prefix()
    with ShardStateSaver(router, prefix=prefix, ttl=3) as saver, Client(router) as c:
        idle, busy = uid(), uid()
        saver.put(cfg(idle), ckpt({}, {}), {}, {})
        s = saver.put(cfg(busy), ckpt({}, {}), {}, {})
        first = c.session(f"{prefix}t/{busy}").info().expires_at
        assert first > 0
        time.sleep(1.2)
        saver.put_writes(s, [("ch", 1)], "task")
        assert c.session(f"{prefix}t/{busy}").info().expires_at > first
        deadline = time.monotonic() + 60
        n = 0
        while saver.get_tuple(cfg(idle)) is not None:  # the idle thread expires ...
            assert time.monotonic() < deadline, "the idle thread never expired"
            n += 1
            saver.put_writes(s, [("ch", n)], f"task{n}")  # ... the written one never does
            assert saver.get_tuple(cfg(busy)) is not None
            time.sleep(0.3)
        assert n >= 3
        assert len(saver.get_tuple(cfg(busy)).pending_writes) == n + 1


def test_maintenance_leaves_no_orphans(router: str) -> None:
    prefix = fresh_prefix()
    with ShardStateSaver(router, prefix=prefix) as saver:
        t, other = uid(), uid()
        parent = cfg(t)
        for step in range(4):
            parent = saver.put(parent, ckpt({"a": step, "keep": "k"}, {"a": step + 1, "keep": 1}),
                               {"run_id": f"run-{step % 2}"}, {"a": step + 1, "keep": 1} if step == 0
                               else {"a": step + 1})
            saver.put_writes(parent, [("ch", step)], f"task{step}")
        saver.put(cfg(other), ckpt({}, {}), {"run_id": "run-1"}, {})
        saver.copy_thread(t, "copy-" + t)
        src = saver.get_tuple(cfg(t))
        dst = saver.get_tuple(cfg("copy-" + t))
        assert dst.checkpoint == src.checkpoint and dst.pending_writes == src.pending_writes
        assert dst.metadata == src.metadata
        saver.delete_for_runs(["run-1"])  # steps 1 and 3 of t, and the other thread's one
        assert [x.metadata["run_id"] for x in saver.list(cfg(t))] == ["run-0", "run-0"]
        assert list(saver.list(cfg(other))) == []
        assert len(list(saver.list(cfg("copy-" + t)))) == 2  # the copy was indexed under run-1
        latest = saver.get_tuple(cfg(t))
        assert latest.checkpoint["channel_values"] == {"a": 2, "keep": "k"}  # head moved back
        assert latest.pending_writes == [("task2", "ch", 2)]
        keys = session_keys(router, prefix, t)
        assert sorted(map(kind, keys)) == sorted(["blob"] * 3 + ["checkpoint"] * 2 + ["write"] * 2)
        saver.prune([t], strategy="keep_latest")
        keys = session_keys(router, prefix, t)
        assert sorted(map(kind, keys)) == ["blob", "blob", "checkpoint", "write"]
        assert saver.get_tuple(cfg(t)).checkpoint["channel_values"] == {"a": 2, "keep": "k"}
        saver.prune([t], strategy="delete")
        assert session_keys(router, prefix, t) == []


class State(TypedDict):
    steps: Annotated[list[str], operator.add]


def graph_builder() -> StateGraph:
    b = StateGraph(State)
    for name in ("one", "two", "three"):
        b.add_node(name, lambda s, name=name: {"steps": [name]})
    b.add_edge(START, "one")
    b.add_edge("one", "two")
    b.add_edge("two", "three")
    b.add_edge("three", END)
    return b


def test_graph_runs_and_resumes_on_the_sync_saver(router: str) -> None:
    prefix = fresh_prefix()
    t = {"configurable": {"thread_id": uid()}}
    with ShardStateSaver(router, prefix=prefix) as saver:
        g = graph_builder().compile(checkpointer=saver, interrupt_before=["three"])
        assert g.invoke({"steps": ["start"]}, t) == {"steps": ["start", "one", "two"]}
    with ShardStateSaver(router, prefix=prefix) as saver:  # a new saver: nothing cached
        g = graph_builder().compile(checkpointer=saver, interrupt_before=["three"])
        assert g.get_state(t).next == ("three",)
        assert g.invoke(None, t) == {"steps": ["start", "one", "two", "three"]}
        assert len(list(g.get_state_history(t))) == 5


def test_graph_runs_on_the_async_saver_with_many_threads(router: str) -> None:
    prefix = fresh_prefix()

    async def main() -> None:
        async with AsyncClient(router) as client:
            saver = AsyncShardStateSaver(client, prefix=prefix)
            g = graph_builder().compile(checkpointer=saver)
            threads = [{"configurable": {"thread_id": uid()}} for _ in range(32)]
            outs = await asyncio.gather(*(g.ainvoke({"steps": [str(i)]}, t)
                                          for i, t in enumerate(threads)))
            for i, out in enumerate(outs):
                assert out == {"steps": [str(i), "one", "two", "three"]}
            fresh = AsyncShardStateSaver(client, prefix=prefix)
            g2 = graph_builder().compile(checkpointer=fresh)
            for i, t in enumerate(threads):
                state = await g2.aget_state(t)
                assert state.values == {"steps": [str(i), "one", "two", "three"]}
                assert state.next == ()
            assert len([x async for x in fresh.alist(None)]) == 32 * 5
            await saver.aclose()  # a client passed in is not closed by the saver
            assert (await client.session("probe").get("k")) is None

    run(main())


def test_async_saver_owns_a_client_made_from_an_address(router: str) -> None:
    async def main() -> None:
        async with AsyncShardStateSaver(router, prefix=fresh_prefix()) as saver:
            s = await saver.aput(cfg("t"), ckpt({"a": 1}, {"a": 1}), {}, {"a": 1})
            assert (await saver.aget_tuple(s)).checkpoint["channel_values"] == {"a": 1}
        with pytest.raises(Exception, match="closed"):
            await saver.aget_tuple(s)

    run(main())
    with pytest.raises(TypeError, match="AsyncClient"):
        ShardStateSaver(AsyncClient(router))


def test_what_a_saver_remembers_never_hides_another_savers_writes(router: str) -> None:
    """A saver remembers the head and the blobs it wrote, to read the latest checkpoint in one
    round trip without reading its values back; another process's writes still show."""
    prefix = fresh_prefix()
    with ShardStateSaver(router, prefix=prefix) as a, ShardStateSaver(router, prefix=prefix) as b:
        t = uid()
        va = a.get_next_version(None, None)
        assert va.startswith("0" * 31 + "1.") and a.get_next_version(va, None).startswith("0" * 31 + "2.")
        sa = a.put(cfg(t), ckpt({"m": "from a"}, {"m": va}), {}, {"m": va})
        assert a.get_tuple(cfg(t)).checkpoint["channel_values"] == {"m": "from a"}
        vb = b.get_next_version(va, None)
        b.put(sa, ckpt({"m": "from b"}, {"m": vb}), {}, {"m": vb})
        assert a.get_tuple(cfg(t)).checkpoint["channel_values"] == {"m": "from b"}
        assert a.get_tuple(sa).checkpoint["channel_values"] == {"m": "from a"}
        b.delete_thread(t)
        assert a.get_tuple(cfg(t)) is None
        a.put(cfg(t), ckpt({"n": "int a"}, {"n": 1}), {}, {"n": 1})  # versions not made by a saver
        b.delete_thread(t)
        b.put(cfg(t), ckpt({"n": "int b"}, {"n": 1}), {}, {"n": 1})  # the same blob key again
        assert a.get_tuple(cfg(t)).checkpoint["channel_values"] == {"n": "int b"}
        assert [x.checkpoint["channel_values"] for x in a.list(cfg(t))] == [{"n": "int b"}]


def test_async_saver_sync_methods_from_another_thread(router: str) -> None:
    async def main() -> None:
        async with AsyncShardStateSaver(router, prefix=fresh_prefix()) as saver:
            stored = await saver.aput(cfg("t"), ckpt({"a": 1}, {"a": 1}), {"k": "v"}, {"a": 1})
            got = await asyncio.to_thread(saver.get_tuple, cfg("t"))
            assert got.checkpoint["channel_values"] == {"a": 1}
            assert await asyncio.to_thread(lambda: [x.metadata["k"] for x in saver.list(None)]) == ["v"]
            await asyncio.to_thread(saver.put_writes, stored, [("ch", 2)], "task")
            assert (await saver.aget_tuple(stored)).pending_writes == [("task", "ch", 2)]
            with pytest.raises(RuntimeError, match="another thread"):
                saver.get_tuple(cfg("t"))  # on the loop's own thread it would deadlock

    run(main())


def test_sync_saver_shared_by_threads(router: str) -> None:
    """One ShardStateSaver (one Client) used by many threads at once, as graph.batch does."""
    import concurrent.futures

    with ShardStateSaver(router, prefix=fresh_prefix()) as saver:
        g = graph_builder().compile(checkpointer=saver)
        threads = [{"configurable": {"thread_id": uid()}} for _ in range(16)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda t: g.invoke({"steps": [t["configurable"]["thread_id"]]}, t),
                                 threads))
        for t, out in zip(threads, outs, strict=True):
            assert out == {"steps": [t["configurable"]["thread_id"], "one", "two", "three"]}
            assert len(list(saver.list(t))) == 5
        for t in threads[:8]:
            saver.delete_thread(t["configurable"]["thread_id"])
        assert len(list(saver.list(None))) == 8 * 5


def test_values_over_the_servers_value_limit_are_stored_in_parts(router: str) -> None:
    """A channel value or write of several MiB (the server takes 1 MiB a value, 4 MiB a
    request) round-trips; parts no value refers to any more are reclaimed by prune."""
    import os

    prefix = fresh_prefix()
    big = os.urandom((3 << 20) - 1024)  # 3 MiB: 12 parts, in Txns before the checkpoint's
    mid = [os.urandom(200 << 10) for _ in range(12)]  # small, but 2.4 MiB: 2 go out of line
    with ShardStateSaver(router, prefix=prefix) as saver:
        t = uid()
        values = {"big": big, **{f"m{i}": m for i, m in enumerate(mid)}, "small": "s"}
        versions = {k: saver.get_next_version(None, None) for k in values}
        s1 = saver.put(cfg(t), ckpt(values, versions), {}, versions)
        saver.put_writes(s1, [("big", big), ("small", 1)], "task")
        loser = os.urandom(300 << 10)  # 2 parts, never referenced: the repeat loses
        saver.put_writes(s1, [("big", loser), ("small", 2)], "task")  # a repeat: first stays
        with ShardStateSaver(router, prefix=prefix) as fresh:  # nothing cached
            got = fresh.get_tuple(cfg(t))
            assert got.checkpoint["channel_values"] == values
            assert got.pending_writes == [("task", "big", big), ("task", "small", 1)]
            assert next(iter(fresh.list(cfg(t)))).checkpoint["channel_values"] == values
            fresh.copy_thread(t, "copy-" + t)
            assert fresh.get_tuple(cfg("copy-" + t)).checkpoint["channel_values"] == values
        new_big = os.urandom((2 << 20) - 1024)
        v2 = {**versions, "big": saver.get_next_version(versions["big"], None)}
        saver.put(s1, ckpt({**values, "big": new_big}, v2), {}, {"big": v2["big"]})
        parts_before = [k for k in session_keys(router, prefix, t) if k.startswith("x/")]
        saver.prune([t], strategy="keep_latest")
        parts_after = [k for k in session_keys(router, prefix, t) if k.startswith("x/")]
        # left: the new big value's 8 parts and the 2 mid values' 1 each; gone: the old big
        # value's 12, the first write's 12 (their checkpoint was pruned), the loser's 2
        assert len(parts_before) == 12 + 12 + 2 + 8 + 2
        assert len(parts_after) == 8 + 2
        with ShardStateSaver(router, prefix=prefix) as fresh:
            assert fresh.get_tuple(cfg(t)).checkpoint["channel_values"] == {**values, "big": new_big}


def test_deltas_on_a_value_stored_in_parts_read_back_and_survive_prune(router: str) -> None:
    """A list whose first item is 600 KiB (stored in 3 parts) then grows: the versions after it
    are deltas on the parted one; a fresh saver reads them, also after prune keep_latest."""
    import os

    prefix = fresh_prefix()
    with ShardStateSaver(router, prefix=prefix) as saver:
        t = uid()
        _, messages = grow(saver, t, 4, start=[os.urandom(600 << 10)])
        keys = session_keys(router, prefix, t)
        assert len([k for k in keys if k.startswith("x/")]) == 3  # only the first is parted
        saver.prune([t], strategy="keep_latest")
        assert len([k for k in session_keys(router, prefix, t) if k.startswith("x/")]) == 3
        with ShardStateSaver(router, prefix=prefix) as fresh:
            assert fresh.get_tuple(cfg(t)).checkpoint["channel_values"]["m"] == messages


def test_import_shardstate_does_not_import_langgraph() -> None:
    import subprocess
    import sys

    code = "import shardstate, sys; print(sorted(m for m in sys.modules if m.startswith('langgraph')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_many_channels_and_writes_exceed_one_txn(router: str) -> None:
    """600 new channel versions in one put and 1 200 writes in one put_writes (a Send fan-out)
    are more ops than one Txn takes (1 000): they go in several, and read back whole."""
    with ShardStateSaver(router, prefix=fresh_prefix()) as saver:
        t = uid()
        values = {f"c{i}": i for i in range(600)}
        versions = {k: 1 for k in values}
        stored = saver.put(cfg(t), ckpt(values, versions), {}, versions)
        writes = [(f"c{i % 600}", i) for i in range(1200)]
        saver.put_writes(stored, writes, "fan-out")
        saver.put_writes(stored, [(c, -v) for c, v in writes], "fan-out")  # a repeat: first stays
        saver.put_writes(stored, [], "nothing")
        got = saver.get_tuple(cfg(t))
        assert got.checkpoint["channel_values"] == values
        assert got.pending_writes == [("fan-out", c, v) for c, v in writes]


def test_latest_read_pages_past_many_writes_and_skips_writes_of_unstored_checkpoints(router: str) -> None:
    """The newest checkpoint is read with one small Scan from the top of its namespace; more
    writes than that page holds, writes another saver added, and writes that arrived before
    their checkpoint (LangGraph's async durability) still give the right answer."""
    from langgraph.checkpoint.base.id import uuid6

    prefix = fresh_prefix()
    with ShardStateSaver(router, prefix=prefix) as a, ShardStateSaver(router, prefix=prefix) as b:
        t = uid()
        s1 = a.put(cfg(t), ckpt({"v": 1}, {"v": 1}), {}, {"v": 1})
        a.put_writes(s1, [("old", i) for i in range(5)], "old-task")
        s2 = a.put(s1, ckpt({"v": 2}, {"v": 2}), {}, {"v": 2})
        a.put_writes(s2, [("ch", i) for i in range(3)], "task-a")
        b.put_writes(s2, [("ch", i) for i in range(40)], "task-b")  # a does not know of these
        future = cfg(t, cid=str(uuid6(clock_seq=9)))  # newer than s2, not stored (yet)
        b.put_writes(future, [("early", i) for i in range(30)], "task-f")
        want = [("task-a", "ch", i) for i in range(3)] + [("task-b", "ch", i) for i in range(40)]
        for saver in (a, b):  # a guesses 3 writes, b has no guess
            got = saver.get_tuple(cfg(t))
            assert got.checkpoint["id"] == s2["configurable"]["checkpoint_id"]
            assert got.checkpoint["channel_values"] == {"v": 2}
            assert got.pending_writes == want
        assert saver.get_tuple(future) is None
        assert len(list(a.list(cfg(t)))) == 2
        late = ckpt({"v": 3}, {"v": 3})
        late["id"] = future["configurable"]["checkpoint_id"]
        a.put(s2, late, {}, {"v": 3})  # the checkpoint arrives
        got = b.get_tuple(cfg(t))
        assert got.checkpoint["channel_values"] == {"v": 3}
        assert got.pending_writes == [("task-f", "early", i) for i in range(30)]
