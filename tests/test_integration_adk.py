"""shardstate.integrations.adk against a real `shardstate dev` cluster: a hypothesis state
machine gives ShardStateSessionService and ADK's InMemorySessionService the same calls and
requires the same results; stale sessions are detected by version across two clients and two
processes; an ADK Runner turn works on it; the example runs as written."""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import textwrap
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events import Event, EventActions
from google.adk.platform import time as platform_time
from google.adk.sessions import InMemorySessionService, Session
from google.adk.sessions.base_session_service import GetSessionConfig
from google.genai import types
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from shardstate import AsyncClient, InvalidArgumentError
from shardstate.integrations.adk import ShardStateSessionService
from tests.devcluster import Dev
from tests.stubs import uid

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "adk_session.py"
T = TypeVar("T")


class Loop:
    """One event loop and AsyncClient for the module (grpc.aio channels belong to a loop)."""

    def __init__(self, router: str) -> None:
        self.router = router
        self.loop = asyncio.new_event_loop()
        self.client = AsyncClient(router, timeout=60)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 240))

    def close(self) -> None:
        self.run(self.client.close())
        self.loop.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    dev = Dev(tmp_path_factory.mktemp("adk") / "data", "--replicas", "1")
    loop = Loop(dev.router)
    try:
        yield loop
    finally:
        loop.close()
        dev.kill()


def ev(n: int, delta: dict[str, Any], text: str = "", author: str = "agent",
       partial: bool | None = None) -> Event:
    content = types.Content(role="model", parts=[types.Part(text=text)]) if text else None
    return Event(id=f"e{n}", invocation_id=f"i{n}", author=author, timestamp=1000.0 + n,
                 content=content, actions=EventActions(state_delta=delta), partial=partial)


def dump(s: Session | None) -> Any:
    return None if s is None else s.model_dump()


def dumps(sessions: list[Session]) -> list[Any]:
    return [s.model_dump() for s in sessions]


# ---- the comparison with InMemorySessionService ----

USERS = st.sampled_from(["ada", "bob", "c/d"])  # "/" must not leak between users
SIDS = st.sampled_from(["s1", "s2", " s3 ", "ü/4"])
KEYS = st.sampled_from(["a", "b", "app:x", "app:y", "user:p", "user:q", "temp:t", "x:y"])
VALUES = st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=3) | st.lists(
    st.integers(0, 2), max_size=2) | st.dictionaries(st.sampled_from(["k", "l"]), st.integers(0, 2))
STATES = st.dictionaries(KEYS, VALUES, max_size=4)


class SameAsInMemory(RuleBasedStateMachine):
    """Each rule calls both services with equal arguments (events copied: append_event
    mutates them) and requires equal results or the same exception type. Each service keeps
    its own live Session object per session, as an agent would."""

    env: Loop

    def __init__(self) -> None:
        super().__init__()
        self.app = uid("app")
        self.ours = ShardStateSessionService(self.env.client)
        self.ref = InMemorySessionService()
        self.live: dict[tuple[str, str], tuple[Session, Session]] = {}
        self.n = 0
        self.now = 100.0

    def both(self, call: Any) -> tuple[Any, Any]:
        """call(service) for each; (result, result) or raises if they disagree on failing."""
        self.now += 1
        platform_time.set_time_provider(lambda: self.now)
        got, want = [], []
        for svc, out in ((self.ours, got), (self.ref, want)):
            try:
                out.append(self.env.run(call(svc)))
            except (AlreadyExistsError, SessionNotFoundError) as e:
                out.append(type(e))
        if isinstance(got[0], type) or isinstance(want[0], type):
            assert got[0] == want[0], (got, want)
        return got[0], want[0]

    @initialize(user=USERS, sid=SIDS, state=STATES)
    def start(self, user: str, sid: str, state: dict[str, Any]) -> None:
        self.create(user, sid, state)

    @rule(user=USERS, sid=SIDS, state=STATES)
    def create(self, user: str, sid: str, state: dict[str, Any]) -> None:
        got, want = self.both(lambda svc: svc.create_session(
            app_name=self.app, user_id=user, state=copy.deepcopy(state), session_id=sid))
        if isinstance(want, type):
            return
        assert dump(got) == dump(want)
        self.live[(user, sid.strip())] = (got, want)

    GET = dict(recent=st.none() | st.integers(0, 3), keep=st.booleans(),
               after=st.none() | st.integers(0, 40).map(lambda i: 1000.0 + i))

    @rule(user=USERS, sid=SIDS, **GET)
    def get(self, user: str, sid: str, recent: int | None, after: float | None, keep: bool) -> None:
        self._get(user, sid, recent, after, keep)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), **GET)
    def get_live(self, data: st.DataObject, recent: int | None, after: float | None,
                 keep: bool) -> None:
        self._get(*data.draw(st.sampled_from(sorted(self.live))), recent, after, keep)

    def _get(self, user: str, sid: str, recent: int | None, after: float | None, keep: bool) -> None:
        config = GetSessionConfig(num_recent_events=recent, after_timestamp=after) if (
            recent is not None or after is not None) else None
        got, want = self.both(lambda svc: svc.get_session(
            app_name=self.app, user_id=user, session_id=sid, config=config))
        assert dump(got) == dump(want)
        if keep and want is not None:
            self.live[(user, sid.strip())] = (got, want)

    def _append(self, data: st.DataObject, delta: dict[str, Any], text: str, partial: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.live)))
        mine, theirs = self.live[key]
        self.n += 1
        e = ev(self.n, delta, text, partial=True if partial and self.n % 3 == 0 else None)
        pairs = iter(((mine, e.model_copy(deep=True)), (theirs, e.model_copy(deep=True))))
        got, want = self.both(lambda svc: svc.append_event(*next(pairs)))
        if isinstance(want, type):
            return
        assert got.model_dump() == want.model_dump()
        assert dump(mine) == dump(theirs)

    # Appends are most of what an agent calls: three rules of them.
    APPEND = dict(data=st.data(), delta=STATES, text=st.text(max_size=4), partial=st.booleans())

    @precondition(lambda self: bool(self.live))
    @rule(**APPEND)
    def append(self, **kw: Any) -> None:
        self._append(**kw)

    @precondition(lambda self: bool(self.live))
    @rule(**APPEND)
    def append_more(self, **kw: Any) -> None:
        self._append(**kw)

    @precondition(lambda self: bool(self.live))
    @rule(**APPEND)
    def append_again(self, **kw: Any) -> None:
        self._append(**kw)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """The last event of a live session appended again: stored once by both."""
        mine, theirs = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        if not theirs.events:
            return
        pair = iter(((mine, mine.events[-1]), (theirs, theirs.events[-1])))
        self.both(lambda svc: svc.append_event(*next(pair)))
        assert dump(mine) == dump(theirs)

    @rule(user=USERS, sid=SIDS)
    def delete(self, user: str, sid: str) -> None:
        self.both(lambda svc: svc.delete_session(app_name=self.app, user_id=user, session_id=sid))
        self.live.pop((user, sid.strip()), None)

    @rule(user=st.none() | USERS)
    def list(self, user: str | None) -> None:
        got, want = self.both(lambda svc: svc.list_sessions(app_name=self.app, user_id=user))
        assert dumps(got.sessions) == dumps(want.sessions)

    @rule(user=USERS)
    def user_state(self, user: str) -> None:
        got, want = self.both(lambda svc: svc.get_user_state(app_name=self.app, user_id=user))
        assert got == want

    def teardown(self) -> None:
        platform_time.reset_time_provider()


def test_same_results_as_in_memory_session_service(env: Loop) -> None:
    SameAsInMemory.env = env
    SameAsInMemory.TestCase.settings = settings(
        max_examples=50, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow])
    SameAsInMemory.TestCase().runTest()


# ---- behaviour InMemorySessionService does not have ----

def test_generated_ids_temp_state_and_scopes_across_instances(env: Loop) -> None:
    async def main() -> None:
        app = uid("app")
        a = ShardStateSessionService(env.client)
        s = await a.create_session(app_name=app, user_id="ada",
                                   state={"k": 1, "app:theme": "dark", "user:lang": "en",
                                          "temp:scratch": 9})
        assert len(s.id) == 36 and s.state == {"k": 1, "app:theme": "dark", "user:lang": "en"}
        await a.append_event(s, ev(1, {"temp:t": 1, "user:lang": "fr", "k": 2}))
        assert s.state["temp:t"] == 1  # the invocation sees temp: state ...
        async with ShardStateSessionService(env.router) as b:  # ... storage never does
            got = await b.get_session(app_name=app, user_id="ada", session_id=s.id)
            assert got is not None and got.state == {"k": 2, "app:theme": "dark", "user:lang": "fr"}
            assert got.events[0].actions.state_delta == {"user:lang": "fr", "k": 2}
            other = await b.create_session(app_name=app, user_id="ada")
            assert other.state == {"app:theme": "dark", "user:lang": "fr"}
            bob = await b.create_session(app_name=app, user_id="bob")
            assert bob.state == {"app:theme": "dark"}
            assert await b.get_user_state(app_name=app, user_id="ada") == {"lang": "fr"}
            with pytest.raises(AlreadyExistsError):
                await b.create_session(app_name=app, user_id="ada", session_id=s.id)
    env.run(main())


def test_stale_session_by_version_across_two_clients(env: Loop) -> None:
    """Two services on two clients hold the same revision; the first append wins, the other
    gets StaleSessionError (however close the timestamps) until it reloads. Then 8 copies of one
    revision race: exactly one append is stored."""

    async def main() -> None:
        app = uid("app")
        async with AsyncClient(env.router) as c2:
            a, b = ShardStateSessionService(env.client), ShardStateSessionService(c2)
            s = await a.create_session(app_name=app, user_id="ada", session_id="s")
            copy_b = await b.get_session(app_name=app, user_id="ada", session_id="s")
            assert copy_b is not None
            await a.append_event(s, ev(1, {"k": "a"}))
            stale = ev(1, {"k": "b"})  # the same timestamp: timestamps cannot tell them apart
            stale.id = "other"
            with pytest.raises(StaleSessionError):
                await b.append_event(copy_b, stale)
            fresh = await b.get_session(app_name=app, user_id="ada", session_id="s")
            assert fresh is not None and fresh.state == {"k": "a"} and len(fresh.events) == 1
            await b.append_event(fresh, ev(2, {"k": "b"}))
            with pytest.raises(StaleSessionError):
                await a.append_event(s, ev(3, {"k": "c"}))

            copies = [await svc.get_session(app_name=app, user_id="ada", session_id="s")
                      for svc in (a, b) * 4]
            results = await asyncio.gather(
                *((a, b)[i % 2].append_event(cp, ev(10 + i, {"w": i}))  # type: ignore[arg-type]
                  for i, cp in enumerate(copies)), return_exceptions=True)
            won = [r for r in results if isinstance(r, Event)]
            assert len(won) == 1 and all(isinstance(r, StaleSessionError) for r in results
                                         if not isinstance(r, Event))
            final = await a.get_session(app_name=app, user_id="ada", session_id="s")
            assert final is not None and len(final.events) == 3
            assert final.state["w"] == won[0].actions.state_delta["w"]
            await a.delete_session(app_name=app, user_id="ada", session_id="s")
            with pytest.raises(SessionNotFoundError):
                await b.append_event(fresh, ev(20, {}))
    env.run(main())


CHILD = textwrap.dedent("""
    import asyncio, sys
    from google.adk.events import Event, EventActions
    from shardstate.integrations.adk import ShardStateSessionService

    async def main():
        async with ShardStateSessionService(sys.argv[1]) as svc:
            s = await svc.get_session(app_name=sys.argv[2], user_id="ada", session_id="s")
            await svc.append_event(s, Event(author="child", invocation_id="c",
                                            actions=EventActions(state_delta={"by": "child"})))
            print(len(s.events))
    asyncio.run(main())
""")


def test_stale_session_across_two_processes(env: Loop) -> None:
    app = uid("app")
    svc = ShardStateSessionService(env.client)
    s = env.run(svc.create_session(app_name=app, user_id="ada", session_id="s"))
    env.run(svc.append_event(s, ev(1, {"by": "parent"})))
    proc = subprocess.run([sys.executable, "-c", CHILD, env.router, app], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "2", proc.stderr
    with pytest.raises(StaleSessionError):
        env.run(svc.append_event(s, ev(2, {"by": "parent again"})))
    got = env.run(svc.get_session(app_name=app, user_id="ada", session_id="s"))
    assert got is not None and got.state == {"by": "child"}
    assert [e.author for e in got.events] == ["agent", "child"]


def test_list_sessions_of_one_user_among_many(env: Loop) -> None:
    """1 200 sessions of one user (more than one page and one meta batch) beside other users'."""

    async def main() -> None:
        app = uid("app")
        svc = ShardStateSessionService(env.client)
        gate = asyncio.Semaphore(64)

        async def make(user: str, i: int) -> None:
            async with gate:
                platform_time.set_time_provider(lambda: 5000.0 - i)  # created newest first
                await svc.create_session(app_name=app, user_id=user, session_id=f"s{i:04d}",
                                         state={"i": i})

        await asyncio.gather(*(make("ada", i) for i in range(1200)),
                             *(make("ada2", i) for i in range(5)), make("ad", 0))
        platform_time.reset_time_provider()
        got = (await svc.list_sessions(app_name=app, user_id="ada")).sessions
        assert [x.id for x in got] == [f"s{i:04d}" for i in reversed(range(1200))]
        assert all(x.state == {"i": int(x.id[1:])} and x.events == [] for x in got)
        everyone = (await svc.list_sessions(app_name=app)).sessions
        assert len(everyone) == 1206 and {x.user_id for x in everyone} == {"ada", "ada2", "ad"}
    env.run(main())


def test_adk_runner_turns_on_the_service(env: Loop) -> None:
    from google.adk.agents import BaseAgent
    from google.adk.runners import Runner

    class Counter(BaseAgent):
        async def _run_async_impl(self, ctx: Any) -> Any:
            n = ctx.session.state.get("user:visits", 0) + 1
            yield Event(author=self.name, invocation_id=ctx.invocation_id,
                        content=types.Content(role="model", parts=[types.Part(text=f"visit {n}")]),
                        actions=EventActions(state_delta={"user:visits": n, "temp:x": 1}))

    async def main() -> list[str]:
        app = uid("app")
        svc = ShardStateSessionService(env.client)
        runner = Runner(app_name=app, agent=Counter(name="counter"), session_service=svc)
        out = []
        for _ in range(2):
            s = await svc.create_session(app_name=app, user_id="ada")
            msg = types.Content(role="user", parts=[types.Part(text="hi")])
            async for e in runner.run_async(user_id="ada", session_id=s.id, new_message=msg):
                if e.content and e.content.parts and e.author == "counter":
                    out.append(e.content.parts[0].text or "")
        assert await svc.get_user_state(app_name=app, user_id="ada") == {"visits": 2}
        return out

    assert env.run(main()) == ["visit 1", "visit 2"]


def test_example_runs_as_written(env: Loop) -> None:
    """Twice: a second run on the same cluster prints the same."""
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(EXAMPLE), env.router], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [
            "counter: visit 1 of ada",
            "counter: visit 2 of ada",
            "sessions of ada: 2, visits: 2",
            "stale copy refused: StaleSessionError",
        ]


def test_an_id_too_long_for_a_shardstate_session_is_invalid_argument(env: Loop) -> None:
    async def main() -> None:
        svc = ShardStateSessionService(env.client)
        with pytest.raises(InvalidArgumentError) as ei:
            await svc.create_session(app_name="app", user_id="ada", session_id="s" * 300)
        assert "session_id" in str(ei.value) and "256" in str(ei.value), ei.value
        assert await svc.get_user_state(app_name="app", user_id="ada") == {}
    env.run(main())
