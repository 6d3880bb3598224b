"""ShardStateSaver against LangGraph's InMemorySaver on the same calls (a hypothesis state
machine on a real `shardstate dev` cluster): put, put_writes, get_tuple, list (config,
filter, before, limit, list(None)), delete_thread — and copy_thread, prune and
delete_for_runs, which InMemorySaver lacks, applied to its dicts by the model below.
Channel "m" is a list that mostly grows (stored as deltas on the version before) and is
sometimes replaced; reads go through the saver that wrote (which remembers its blobs) or a
fresh one (which must read every delta's chain from the cluster).

Documented differences the comparison allows for: list() goes thread by thread in thread-id
order and newest checkpoint first across a thread's namespaces (InMemorySaver: insertion
order of threads and namespaces), so the reference's full answer is sorted that way before
the limit is applied."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("langgraph.checkpoint.memory")

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule
from langgraph.checkpoint.base import CheckpointTuple, empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.types import ERROR

from shardstate import Client
from shardstate.integrations.langgraph import ShardStateSaver
from tests.langgraph_support import fresh_prefix, router

__all__ = ["router"]

threads = st.sampled_from(["t1", "t2"])
namespaces = st.sampled_from(["", "w"])  # "w": the key segment writes use
runs = st.sampled_from(["r1", "r2"])


def view(t: CheckpointTuple | None) -> Any:
    if t is None:
        return None
    c = t.checkpoint
    return (t.config["configurable"], c["id"], c["channel_values"], c["channel_versions"],
            c["versions_seen"], t.metadata, t.parent_config and t.parent_config["configurable"],
            t.pending_writes)


def ref_copy(ref: InMemorySaver, src: str, dst: str) -> None:
    for ns, cps in list(ref.storage[src].items()):
        ref.storage[dst][ns].update(cps)
    for (t, ns, cid), ws in list(ref.writes.items()):
        if t == src:
            ref.writes[(dst, ns, cid)].update(ws)
    for (t, ns, ch, v), b in list(ref.blobs.items()):
        if t == src:
            ref.blobs[(dst, ns, ch, v)] = b


def ref_drop(ref: InMemorySaver, thread: str, ns: str, cid: str) -> None:
    del ref.storage[thread][ns][cid]
    ref.writes.pop((thread, ns, cid), None)


class SaverMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ref = InMemorySaver()
        self.prefix = fresh_prefix()
        self.saver = ShardStateSaver(CLIENT, prefix=self.prefix)
        self.step = 0

    @initialize(puts=st.lists(st.tuples(threads, namespaces, runs), min_size=1, max_size=4))
    def seed(self, puts: list[tuple[str, str, str]]) -> None:
        """Every run starts from a few checkpoints, so the other rules have data to work on."""
        for thread, ns, run in puts:
            self.put(thread=thread, ns=ns, run=run, fork=False, update={"a": 1}, drop_b=False,
                     m="append")
            for task, path in (("k1", "p"), ("k2", "")):
                self.put_writes(thread=thread, ns=ns, which=None, task=task, path=path,
                                writes=[("x", 1)])

    def latest(self, thread: str, ns: str) -> str | None:
        return max(self.ref.storage.get(thread, {}).get(ns, {}) or [None], key=lambda x: x or "")

    @rule(thread=threads, ns=namespaces, run=runs, fork=st.booleans(),
          update=st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 9), max_size=2),
          drop_b=st.booleans(), m=st.sampled_from([None, "append", "append", "append", "reset"]))
    def put(self, thread: str, ns: str, run: str, fork: bool, update: dict[str, Any],
            drop_b: bool, m: str | None) -> None:
        self.step += 1
        parent = self.latest(thread, ns)
        if fork and parent is not None:  # from an older checkpoint, as update_state does
            parent = min(self.ref.storage[thread][ns])
        base = self.ref.get_tuple(self.cfg(thread, ns, parent)) if parent else None
        versions = dict(base.checkpoint["channel_versions"]) if base else {}
        values = dict(base.checkpoint["channel_values"]) if base else {}
        new = {}
        update = dict(update)
        if m == "append":  # ids with 0x00 and 0xFF, some items as long as the rest together
            item = f"\x00{self.step}\xff" * (40 if self.step % 9 == 0 else 1)
            update["m"] = [*values.get("m", []), item]
        elif m == "reset":
            update["m"] = [f"r{self.step}"]
        for ch, v in update.items():
            versions[ch] = new[ch] = self.saver.get_next_version(versions.get(ch), None)
            values[ch] = v
        if drop_b and "b" in versions and "b" not in update:
            del versions["b"]
            values.pop("b", None)
        c = empty_checkpoint()
        c["channel_values"], c["channel_versions"] = values, versions
        c["versions_seen"] = {"node": dict(versions)}
        md: Any = {"step": self.step, "run_id": run, "owner": f"o{self.step % 2}"}
        cfg = self.cfg(thread, ns, parent)
        assert self.saver.put(cfg, c, md, new) == self.ref.put(cfg, c, md, new)

    @rule(thread=threads, ns=namespaces, run=runs, n=st.integers(2, 20))
    def steps(self, thread: str, ns: str, run: str, n: int) -> None:
        """An agent's run: n checkpoints in a row, each adding to m (chains past MAX_CHAIN)."""
        for _ in range(n):
            self.put(thread=thread, ns=ns, run=run, fork=False, update={}, drop_b=False,
                     m="append")

    @rule(thread=threads, ns=namespaces, which=st.one_of(st.none(), st.integers(0, 5)),
          task=st.sampled_from(["k1", "k2"]),
          path=st.sampled_from(["", "p"]),
          writes=st.lists(st.tuples(st.sampled_from(["x", "y", ERROR]), st.integers(0, 9)),
                          min_size=1, max_size=3))
    def put_writes(self, thread: str, ns: str, which: int | None, task: str, path: str,
                   writes: list[tuple[str, int]]) -> None:
        cids = sorted(self.ref.storage.get(thread, {}).get(ns, {}))
        if not cids:
            return
        cfg = self.cfg(thread, ns, cids[-1 if which is None else which % len(cids)])
        self.saver.put_writes(cfg, writes, task, path)
        self.ref.put_writes(cfg, writes, task, path)

    def reader(self, fresh: bool) -> ShardStateSaver:
        return ShardStateSaver(CLIENT, prefix=self.prefix) if fresh else self.saver

    @rule(thread=threads, ns=namespaces, which=st.one_of(st.none(), st.integers(0, 5)),
          fresh=st.booleans())
    def get_tuple(self, thread: str, ns: str, which: int | None, fresh: bool) -> None:
        cids = sorted(self.ref.storage.get(thread, {}).get(ns, {}))
        cid = cids[which % len(cids)] if which is not None and cids else None
        cfg = self.cfg(thread, ns, cid)
        assert view(self.reader(fresh).get_tuple(cfg)) == view(self.ref.get_tuple(cfg))

    @rule(thread=st.one_of(st.none(), threads), ns=st.one_of(st.none(), namespaces),
          filter=st.one_of(st.none(), st.fixed_dictionaries({"owner": st.sampled_from(["o0", "o1"])}),
                           st.fixed_dictionaries({"run_id": runs})),
          before=st.one_of(st.none(), st.integers(0, 5)), limit=st.one_of(st.none(), st.integers(0, 4)),
          fresh=st.booleans())
    def list(self, thread: str | None, ns: str | None, filter: Any, before: int | None,
             limit: int | None, fresh: bool) -> None:
        config: Any = None
        if thread is not None:
            config = {"configurable": {"thread_id": thread}}
            if ns is not None:
                config["configurable"]["checkpoint_ns"] = ns
        before_cfg = None
        if before is not None and thread is not None:
            cids = sorted(cid for n in self.ref.storage.get(thread, {}).values() for cid in n)
            if cids:
                before_cfg = self.cfg(thread, "", cids[before % len(cids)])
        got = [view(t) for t in self.reader(fresh).list(config, filter=filter, before=before_cfg,
                                                         limit=limit)]
        want = list(self.ref.list(config, filter=filter, before=before_cfg))
        want.sort(key=lambda t: (t.config["configurable"]["thread_id"], [-ord(ch) for ch in t.checkpoint["id"]]))
        assert got == [view(t) for t in want][:limit]

    @rule(thread=threads)
    def delete_thread(self, thread: str) -> None:
        self.saver.delete_thread(thread)
        self.ref.delete_thread(thread)

    @rule(src=threads, dst=threads)
    def copy_thread(self, src: str, dst: str) -> None:
        if src == dst:
            return
        self.saver.copy_thread(src, dst)
        ref_copy(self.ref, src, dst)

    @rule(ts=st.lists(threads, max_size=2, unique=True), keep=st.booleans())
    def prune(self, ts: list[str], keep: bool) -> None:
        self.saver.prune(ts, strategy="keep_latest" if keep else "delete")
        for t in ts:
            if not keep:
                self.ref.delete_thread(t)
                continue
            for ns, cps in list(self.ref.storage.get(t, {}).items()):
                if not cps:
                    continue
                newest = max(cps)
                for cid in [c for c in cps if c != newest]:
                    ref_drop(self.ref, t, ns, cid)

    @rule(rs=st.lists(runs, max_size=2, unique=True))
    def delete_for_runs(self, rs: list[str]) -> None:
        self.saver.delete_for_runs(rs)
        for t, by_ns in list(self.ref.storage.items()):
            for ns, cps in list(by_ns.items()):
                for cid, (_, md, _) in list(cps.items()):
                    if self.ref.serde.loads_typed(md).get("run_id") in rs:
                        ref_drop(self.ref, t, ns, cid)

    @staticmethod
    def cfg(thread: str, ns: str, cid: str | None) -> Any:
        c: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
        if cid:
            c["checkpoint_id"] = cid
        return {"configurable": c}

    def teardown(self) -> None:
        self.saver.close()


CLIENT: Client


def test_saver_matches_in_memory_saver(router: str) -> None:
    global CLIENT
    with Client(router) as CLIENT:
        SaverMachine.TestCase.settings = settings(
            max_examples=50, stateful_step_count=40, deadline=None,
            suppress_health_check=list(HealthCheck))
        SaverMachine.TestCase().runTest()
