"""Google ADK sessions in shardstate: an ADK Runner runs an agent in two sessions of one user,
whose user: state both share; a stale copy of a session is refused by version.

The agent is a BaseAgent without a model, so this calls no model and needs no API key; use
your LlmAgent instead. Run against `shardstate dev`: python examples/adk_session.py
"""

import asyncio
import sys

from google.adk.agents import BaseAgent
from google.adk.errors import StaleSessionError
from google.adk.events import Event, EventActions
from google.adk.runners import Runner
from google.genai import types

from shardstate.integrations.adk import ShardStateSessionService

ROUTER = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:7400"


class Counter(BaseAgent):
    """Counts the user's visits in user: state, which every session of the user shares."""

    async def _run_async_impl(self, ctx):
        n = ctx.session.state.get("user:visits", 0) + 1
        text = f"visit {n} of {ctx.session.user_id}"
        yield Event(author=self.name, invocation_id=ctx.invocation_id,
                    content=types.Content(role="model", parts=[types.Part(text=text)]),
                    actions=EventActions(state_delta={"user:visits": n}))


async def main() -> None:
    async with ShardStateSessionService(ROUTER) as sessions:
        runner = Runner(app_name="demo", agent=Counter(name="counter"), session_service=sessions)
        for old in (await sessions.list_sessions(app_name="demo", user_id="ada")).sessions:
            await sessions.delete_session(app_name="demo", user_id="ada", session_id=old.id)

        hi = types.Content(role="user", parts=[types.Part(text="hi")])
        for visit in range(2):
            state = {"user:visits": 0} if visit == 0 else None  # start the example afresh
            s = await sessions.create_session(app_name="demo", user_id="ada", state=state)
            async for event in runner.run_async(user_id="ada", session_id=s.id, new_message=hi):
                print(f"{event.author}: {event.content.parts[0].text}")

        listed = (await sessions.list_sessions(app_name="demo", user_id="ada")).sessions
        print(f"sessions of ada: {len(listed)}, visits: {listed[-1].state['user:visits']}")

        # Two copies of one revision: the first append wins, the other is stale.
        a = await sessions.get_session(app_name="demo", user_id="ada", session_id=s.id)
        b = await sessions.get_session(app_name="demo", user_id="ada", session_id=s.id)
        await sessions.append_event(a, Event(author="user", invocation_id="x"))
        try:
            await sessions.append_event(b, Event(author="user", invocation_id="y"))
        except StaleSessionError as e:
            print("stale copy refused:", type(e).__name__)


asyncio.run(main())
