"""A LangGraph graph of six steps that survives `kill -9`: every step's checkpoint is in
shardstate, so a new process given the same thread id resumes after the last step that
finished.

    shardstate dev &                          # prints router: 127.0.0.1:7400
    python examples/langgraph_resume.py --thread demo &
    sleep 2; kill -9 %2                       # in the middle of a step
    python examples/langgraph_resume.py --thread demo   # resumes, runs the rest

Each step prints `step N done` once its checkpoint is stored; the last line is the final
state, each step in it exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import time
from typing import Annotated, TypedDict

from langgraph.graph import END, START, StateGraph

from shardstate.integrations.langgraph import AsyncShardStateSaver

STEPS = 6


class State(TypedDict):
    done: Annotated[list[str], operator.add]


def build(step_seconds: float) -> StateGraph:
    g = StateGraph(State)

    def step(n: int):  # type: ignore[no-untyped-def]
        async def run(state: State) -> dict[str, list[str]]:
            await asyncio.sleep(step_seconds)  # the work of the step
            return {"done": [f"step{n}"]}
        return run

    for n in range(1, STEPS + 1):
        g.add_node(f"step{n}", step(n))
        g.add_edge(START if n == 1 else f"step{n - 1}", f"step{n}")
    g.add_edge(f"step{STEPS}", END)
    return g


async def main(router: str, thread: str, step_seconds: float) -> None:
    async with AsyncShardStateSaver(router, ttl=24 * 3600) as saver:
        graph = build(step_seconds).compile(checkpointer=saver)
        config = {"configurable": {"thread_id": thread}}
        state = await graph.aget_state(config)
        if not state.values:
            print("starting", flush=True)
            todo: dict[str, list[str]] | None = {"done": []}
        elif state.next:
            print(f"resuming after {state.values['done'][-1] if state.values['done'] else 'start'}"
                  f", next {state.next[0]}", flush=True)
            todo = None  # continue from the last checkpoint
        else:
            print(f"already finished: {state.values['done']}", flush=True)
            return
        async for update in graph.astream(todo, config, stream_mode="updates", durability="sync"):
            for node in update:
                print(f"{node.replace('step', 'step ')} done", flush=True)
        final = await graph.aget_state(config)
        print(f"final: {final.values['done']}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", default="127.0.0.1:7400")
    p.add_argument("--thread", default=f"demo-{int(time.time())}")
    p.add_argument("--step-seconds", type=float, default=0.5)
    args = p.parse_args()
    asyncio.run(main(args.router, args.thread, args.step_seconds))
