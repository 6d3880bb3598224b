import asyncio
import operator
from typing import Annotated, TypedDict

from langgraph.graph import START, StateGraph
from langgraph.store.base import BaseStore

from shardstate import AsyncClient
from shardstate.integrations.langgraph import AsyncShardStateSaver, AsyncShardStateStore


class State(TypedDict):
    messages: Annotated[list[str], operator.add]


async def reply(state: State, *, store: BaseStore) -> dict:
    said = state["messages"][-1]
    await store.aput(("users", "u1"), "last_said", {"text": said})  # long-term memory
    return {"messages": [f"echo: {said}"]}


async def main() -> None:
    async with AsyncClient("127.0.0.1:7400") as client:  # one client for both
        saver = AsyncShardStateSaver(client, ttl=7 * 86400)  # a thread expires 7 days idle
        store = AsyncShardStateStore(client, ttl={"default_ttl": 30 * 24 * 60})  # minutes
        graph = (StateGraph(State).add_node("reply", reply).add_edge(START, "reply")
                 .compile(checkpointer=saver, store=store))
        config = {"configurable": {"thread_id": "chat-1"}}
        await graph.ainvoke({"messages": ["hi"]}, config)
        out = await graph.ainvoke({"messages": ["again"]}, config)  # the thread's history is kept
        print(out["messages"][-4:])
        print((await store.aget(("users", "u1"), "last_said")).value)


asyncio.run(main())
