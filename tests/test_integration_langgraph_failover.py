"""kill -9 of the shard primary during LangGraph runs on AsyncShardStateSaver, then `promote`
of its replica (semi-sync, --min-replica-acks 1): every checkpoint whose `aput` was
acknowledged is there, with its values, and every run resumes from its last checkpoint to the
end. Prints one FAULT line (tests/faults/report.py)."""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("langgraph.graph")

from langgraph.graph import END, START, StateGraph

from shardstate import AsyncClient, ConstantBackoff, Retry, ShardstateError
from shardstate.integrations.langgraph import AsyncShardStateSaver
from tests.devcluster import cli
from tests.faults.report import Tally, fault_line
from tests.procs import Procs
from tests.stubs import uid

STEPS = 40
RUNS = 8


class State(TypedDict):
    done: Annotated[list[int], operator.add]


def graph() -> StateGraph:
    g = StateGraph(State)
    for n in range(STEPS):
        async def step(state: State, n: int = n) -> dict[str, list[int]]:
            await asyncio.sleep(0.01)
            return {"done": [n]}
        g.add_node(f"s{n}", step)
        g.add_edge(START if n == 0 else f"s{n - 1}", f"s{n}")
    g.add_edge(f"s{STEPS - 1}", END)
    return g


class Recording(AsyncShardStateSaver):
    """Remembers every checkpoint whose aput was acknowledged, with its channel values."""

    acked: list[tuple[Any, dict[str, Any]]]

    async def aput(self, config: Any, checkpoint: Any, metadata: Any, new_versions: Any) -> Any:
        stored = await super().aput(config, checkpoint, metadata, new_versions)
        self.acked.append((stored, dict(checkpoint["channel_values"])))
        return stored


def test_kill_primary_during_langgraph_runs_then_promote(procs: Procs) -> None:
    primary = procs.shard("s1", "--min-replica-acks", "1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, replica.address])
    threads = [{"configurable": {"thread_id": uid("run")}} for _ in range(RUNS)]

    async def main() -> Tally:
        impatient = Retry(attempts=2, backoff=ConstantBackoff(0.05))
        async with AsyncClient(router.address, retry=impatient, timeout=10) as client:
            saver = Recording(client)
            saver.acked = []
            g = graph().compile(checkpointer=saver)

            async def one(config: Any) -> BaseException | None:
                try:
                    await g.ainvoke({"done": []}, config, durability="sync")
                except ShardstateError as e:
                    return e
                return None

            runs = [asyncio.ensure_future(one(c)) for c in threads]
            while len(saver.acked) < 120:
                await asyncio.sleep(0.01)
            primary.kill()
            errors = [e for e in await asyncio.gather(*runs) if e is not None]
        acked = list(saver.acked)
        promoted = await asyncio.to_thread(cli, "admin", "--router", router.address, "promote", "s1")
        assert promoted.returncode == 0, promoted.stderr
        assert replica.address in promoted.stdout, promoted.stdout
        await asyncio.to_thread(replica.wait_ready)

        patient = Retry(attempts=200, backoff=ConstantBackoff(0.1))
        async with AsyncClient(router.address, retry=patient, timeout=30) as client:
            fresh = AsyncShardStateSaver(client)  # nothing cached from before the kill
            lost = 0
            for stored, values in acked:
                tup = await fresh.aget_tuple(stored)
                if tup is None or tup.checkpoint["channel_values"] != values:
                    lost += 1
            g = graph().compile(checkpointer=fresh)
            for config in threads:  # every run resumes from its last checkpoint to the end
                state = await g.aget_state(config)
                if state.next:
                    await g.ainvoke(None, config, durability="sync")
                final = await g.aget_state(config)
                assert final.next == ()
                assert final.values["done"] == list(range(STEPS)), final.values
        return Tally("kill -9 primary during LangGraph runs + promote (semi-sync)",
                     acked=len(acked), lost=lost, caller_errors=len(errors),
                     note=f"runs={RUNS} resumed={len(errors)}")

    t = asyncio.run(main())
    fault_line(t)
    assert t.acked >= 120 and t.lost == 0
    assert 0 < t.caller_errors <= RUNS  # the runs in flight at the kill stopped at an error
