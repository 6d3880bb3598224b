"""An OpenAI Agents SDK conversation whose history lives in shardstate: two Runner turns, the
second from a new session object (as a new process would), sees the first.

The model is the SDK's ScriptedModel, so this calls no model and needs no API key; use a real
model in your agent. Run against `shardstate dev`: python examples/openai_agents_session.py
"""

import asyncio
import sys

from agents import Agent, Runner, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message

from shardstate.integrations.openai_agents import ShardStateSession

ROUTER = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:7400"
set_tracing_disabled(True)  # no trace export to OpenAI


async def main() -> None:
    model = ScriptedModel([[assistant_message("Hello Ada!")],
                           [assistant_message("Your name is Ada.")]])
    agent = Agent(name="assistant", instructions="Reply briefly.", model=model)

    async with ShardStateSession("user-42", ROUTER, ttl=3600) as session:
        await session.clear_session()  # start the example from an empty history
        result = await Runner.run(agent, "My name is Ada.", session=session)
        print("turn 1:", result.final_output)

    async with ShardStateSession("user-42", ROUTER, ttl=3600) as session:
        result = await Runner.run(agent, "What is my name?", session=session)
        print("turn 2:", result.final_output)
        seen = model.last_call.input if model.last_call else []
        print("the model saw:", [m["content"] if isinstance(m["content"], str)
                                 else m["content"][0]["text"] for m in seen])
        print("stored items:", len(await session.get_items()))


asyncio.run(main())
