"""The shardstate backend: the public `shardstate.AsyncClient` and its session handles.

A step is `get` then `put(expect=version)`; a ConflictError from the put is a conflict. This is
the documented client API, not raw stubs, so the benchmark measures what an agent would get.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from shardstate.bench.backends import LOAD_PARALLELISM, LOG_STREAM, STATE_KEY
from shardstate.errors import ConflictError


class ShardstateBackend:
    name = "shardstate"

    def __init__(self, address: str) -> None:
        try:
            from shardstate import AsyncClient  # type: ignore[attr-defined]
        except ImportError:
            from shardstate.aio import AsyncClient  # client/aio.py, before it is re-exported

        self.address = address
        self.client = AsyncClient(address)
        self._handles: dict[str, Any] = {}

    def _session(self, session_id: str) -> Any:
        handle = self._handles.get(session_id)
        if handle is None:
            handle = self._handles[session_id] = self.client.session(session_id)
        return handle

    async def setup(self, session_ids: Sequence[str], value: bytes,
                    progress: Callable[[int], None]) -> None:
        it = iter(session_ids)

        async def loader() -> None:
            for sid in it:
                await self._session(sid).put(STATE_KEY, value)
                progress(1)

        await asyncio.gather(*(loader() for _ in range(LOAD_PARALLELISM)))

    async def step(self, session_id: str, value: bytes) -> bool:
        s = self._session(session_id)
        rec = await s.get(STATE_KEY)
        try:
            await s.put(STATE_KEY, value, expect=rec.version if rec is not None else 0)
        except ConflictError:
            return False
        return True

    async def read(self, session_id: str) -> bool:
        return await self._session(session_id).get(STATE_KEY) is not None

    async def append(self, session_id: str, entry: bytes, last: int) -> int:
        s = self._session(session_id)
        await s.append(LOG_STREAM, [entry])
        return len(await s.read(LOG_STREAM, last=last))

    async def close(self) -> None:
        for name in ("aclose", "close"):
            closer = getattr(self.client, name, None)
            if closer is not None:
                result = closer()
                if inspect.isawaitable(result):
                    await result
                return

    def describe(self) -> dict[str, Any]:
        return {
            "client": "shardstate.AsyncClient session handles (the public client library)",
            "step": "get(state); then put(state, expect=version) (ConflictError = conflict)",
            "append": "append(events, [entry]); then read(events, last=10)",
        }
