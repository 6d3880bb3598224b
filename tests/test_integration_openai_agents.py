"""shardstate.integrations.openai_agents against a real `shardstate dev` cluster: Runner turns
with the SDK's own ScriptedModel keep their history across sessions objects and clients,
pop_item is atomic under 8 concurrent poppers, get_items(limit) reads only the newest entries,
TTL expires the history, and the example runs as written."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, Runner, function_tool, set_tracing_disabled
from agents.memory import Session, SessionSettings
from agents.testing import ScriptedModel, assistant_message, function_call

from shardstate import AsyncClient, Client, LimitExceededError
from shardstate.integrations.openai_agents import ShardStateSession
from tests.devcluster import Dev
from tests.stubs import run, uid

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "openai_agents_session.py"


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    set_tracing_disabled(True)  # the SDK would export traces over the network otherwise
    dev = Dev(tmp_path_factory.mktemp("oa") / "data", "--replicas", "1")
    try:
        yield dev.router
    finally:
        dev.kill()


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def texts(items: list[Any]) -> list[str]:
    """The text of each message item; the type of any other item."""
    out = []
    for it in items:
        content = it.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.append("".join(part.get("text", "") for part in content))
        else:
            out.append(it["type"])
    return out


def test_is_the_sdk_session_protocol(router: str) -> None:
    async def main() -> None:
        async with ShardStateSession(uid("oa"), router, session_settings={"limit": 7}) as s:
            assert isinstance(s, Session)
            assert s.session_settings == SessionSettings(limit=7)
        with pytest.raises(TypeError, match="AsyncClient"):
            ShardStateSession("x", Client(router))
        with pytest.raises(TypeError, match="router address"):
            ShardStateSession("x", 7400)
    run(main())


def test_runner_turns_keep_history_across_clients(router: str) -> None:
    """Turn 1 in one client, turn 2 (a tool call) in a new client: the model of turn 2 sees
    turn 1's messages, and the stored history is every item of both turns, in order."""

    @function_tool
    def add(a: int, b: int) -> int:
        return a + b

    async def main() -> None:
        sid = uid("oa")
        m1 = ScriptedModel([[assistant_message("hello, Ada")]])
        agent1 = Agent(name="a", instructions="be brief", model=m1)
        async with ShardStateSession(sid, router) as s1:
            r1 = await Runner.run(agent1, "hi, I am Ada", session=s1)
            assert r1.final_output == "hello, Ada"
            assert texts(await s1.get_items()) == ["hi, I am Ada", "hello, Ada"]

        m2 = ScriptedModel([
            [function_call("add", {"a": 2, "b": 3}, call_id="c1")],
            [assistant_message("2 + 3 = 5")],
        ])
        agent2 = Agent(name="a", instructions="be brief", model=m2, tools=[add])
        async with AsyncClient(router) as c, ShardStateSession(sid, c) as s2:
            r2 = await Runner.run(agent2, "add 2 and 3", session=s2)
            assert r2.final_output == "2 + 3 = 5"
            m2.assert_complete()
            first = m2.first_call
            assert first is not None
            assert texts(first.input) == ["hi, I am Ada", "hello, Ada", "add 2 and 3"]
            items = await s2.get_items()
            assert texts(items) == ["hi, I am Ada", "hello, Ada", "add 2 and 3", "function_call",
                                    "function_call_output", "2 + 3 = 5"]
            assert items[4]["output"] == "5"
            assert texts(await s2.get_items(limit=2)) == ["function_call_output", "2 + 3 = 5"]
    run(main())


def test_session_settings_limit_bounds_what_the_model_sees(router: str) -> None:
    async def main() -> None:
        sid = uid("oa")
        async with ShardStateSession(sid, router, session_settings=SessionSettings(limit=2)) as s:
            await s.add_items([user(f"old {i}") for i in range(5)])
            m = ScriptedModel([[assistant_message("ok")]])
            await Runner.run(Agent(name="a", model=m), "new", session=s)
            call = m.last_call
            assert call is not None and texts(call.input) == ["old 3", "old 4", "new"]
            assert len(await s.get_items(limit=-1)) == 7  # negative: no limit, as SQLiteSession
            assert texts(await s.get_items()) == ["new", "ok"]
    run(main())


def test_items_round_trip_and_pop_and_clear(router: str) -> None:
    async def main() -> None:
        async with AsyncClient(router) as c:
            sid = uid("oa")
            s = ShardStateSession(sid, c)
            assert await s.get_items() == [] and await s.pop_item() is None
            items = [user("é ünïcode ✓"), {"type": "function_call_output", "call_id": "x",
                                             "output": json.dumps({"n": [1, 2.5, None]})}]
            await s.add_items(items)
            await s.add_items([])
            assert await s.get_items() == items
            assert await s.get_items(limit=0) == []
            assert await s.get_items(limit=1) == items[1:]
            assert await s.pop_item() == items[1]
            assert await s.get_items() == items[:1]
            # the session's other keys are not the history's: clear_session leaves them
            await c.session(sid).put("agent-state", b"keep")
            await s.add_items([user("a"), user("b")])
            await s.clear_session()
            assert await s.get_items() == [] and await s.pop_item() is None
            rec = await c.session(sid).get("agent-state")
            assert rec is not None and rec.value == b"keep"
            await s.add_items([user("after clear")])
            assert texts(await s.get_items()) == ["after clear"]
            # another session id is another history
            assert await ShardStateSession(uid("oa"), c).get_items() == []
    run(main())


def test_large_add_items_and_get_items_above_a_page(router: str) -> None:
    """2 500 items in one add_items (several appends, in order); get_items(limit=1 500) is
    more than one server page (1 000 entries): all 1 500 newest, oldest first."""

    async def main() -> None:
        async with ShardStateSession(uid("oa"), router) as s:
            await s.add_items([user(str(i)) for i in range(2500)])
            assert texts(await s.get_items(limit=1500)) == [str(i) for i in range(1000, 2500)]
            assert texts(await s.get_items(limit=3)) == ["2497", "2498", "2499"]
            assert texts(await s.get_items()) == [str(i) for i in range(2500)]
    run(main())


def test_eight_concurrent_poppers_get_every_item_exactly_once(router: str) -> None:
    """1 000 items, 8 poppers on 8 clients (so 8 connections), each popping until empty."""

    async def main() -> None:
        sid = uid("oa")
        async with ShardStateSession(sid, router) as s:
            await s.add_items([user(str(i)) for i in range(1000)])

        async def popper() -> list[str]:
            got = []
            async with ShardStateSession(sid, router) as mine:
                while (item := await mine.pop_item()) is not None:
                    got.append(item["content"])
            return got

        results = await asyncio.gather(*(popper() for _ in range(8)))
        popped = [x for r in results for x in r]
        assert len(popped) == 1000
        assert sorted(popped, key=int) == [str(i) for i in range(1000)]
        # each popper took the newest remaining item each time: its own list is descending
        for r in results:
            assert [int(x) for x in r] == sorted((int(x) for x in r), reverse=True)
        assert sum(1 for r in results if r) >= 2, "the poppers did not run concurrently"
    run(main())


def test_ttl_expires_the_history_and_add_items_refreshes_it(router: str) -> None:
    async def main() -> None:
        sid = uid("oa")
        async with AsyncClient(router) as c:
            s = ShardStateSession(sid, c, ttl=2)
            await s.add_items([user("one")])
            info = await c.session(sid).info()
            assert info is not None and 0 < info.expires_at - time.time() * 1000 <= 2000
            await asyncio.sleep(1.2)
            await s.add_items([user("two")])  # refreshes: the session lives 2 s from here
            info2 = await c.session(sid).info()
            assert info2 is not None and info2.expires_at > info.expires_at
            assert texts(await s.get_items()) == ["one", "two"]
            deadline = time.monotonic() + 30
            while await s.get_items() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert await s.get_items() == []
            assert await c.session(sid).info() is None
    run(main())


def test_example_runs_as_written(router: str) -> None:
    """Twice: a second run on the same cluster prints the same."""
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(EXAMPLE), router], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [
            "turn 1: Hello Ada!",
            "turn 2: Your name is Ada.",
            "the model saw: ['My name is Ada.', 'Hello Ada!', 'What is my name?']",
            "stored items: 4",
        ]


    def test_import_shardstate_loads_no_framework() -> None:
        code = ("import sys, shardstate; bad = [m for m in ('agents', 'google.adk', 'langgraph') "
                "if m in sys.modules]; print(bad)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_an_item_over_the_value_limit_is_refused_and_the_history_kept(router: str) -> None:
    async def main() -> None:
        async with ShardStateSession(uid("oa"), router) as s:
            await s.add_items([user("kept")])
            with pytest.raises(LimitExceededError) as ei:
                await s.add_items([user("with it"), user("x" * (1024 * 1024 + 1))])
            assert "max_value_bytes" in str(ei.value) or "1048576" in str(ei.value), ei.value
            assert texts(await s.get_items()) == ["kept"]  # one Append: nothing of it stored
    run(main())
