"""The shardstate backend: the public `shardstate.AsyncClient` and one long-lived session handle
per session id (handles remember the version they last saw, so they must outlive a step).

Step "cached" is `handle.update(key, fn, attempts=2)`: one CAS from the handle's cached version
(a read only when the handle has seen nothing), retried once from the current record a lost
CAS returns; a second loss raises ConflictError = a conflict.
Step "read-cas" is `get` then `put(expect=version)`. Concurrent calls are auto-batched by the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from shardstate import AsyncClient, AsyncSession, ConflictError
from shardstate.bench.backends import CACHED_ATTEMPTS, LOAD_PARALLELISM, LOG_STREAM, STATE_KEY
from shardstate.common.tls import TlsFiles


class ShardstateBackend:
    name = "shardstate"

    def __init__(self, address: str, step_impl: str = "cached", direct: bool = False,
                 tls: TlsFiles | None = None, token: str | None = None) -> None:
        self.address = address
        self.step_impl = step_impl
        self.direct = direct
        self.name = "shardstate-direct" if direct else "shardstate"
        files = tls or TlsFiles()
        self.client = AsyncClient(address, direct=direct, ca_file=files.ca, cert_file=files.cert, key_file=files.key,
                                  token=token)
        self._handles: dict[str, AsyncSession] = {}
        self._stats: dict[str, Any] = {}
        if step_impl == "cached":
            self.step = self._step_cached  # type: ignore[method-assign]
        elif step_impl != "read-cas":
            raise ValueError(f"shardstate: unknown step implementation {step_impl!r}")

    def _session(self, session_id: str) -> AsyncSession:
        handle = self._handles.get(session_id)
        if handle is None:
            handle = self._handles[session_id] = self.client.session(session_id)
        return handle

    async def setup(self, session_ids: Sequence[str], value: bytes,
                    progress: Callable[[int], None]) -> None:
        it = iter(session_ids)

        async def loader() -> None:
            for sid in it:
                # A put through the handle also seeds its version cache for the first step.
                await self._session(sid).put(STATE_KEY, value)
                progress(1)

        await asyncio.gather(*(loader() for _ in range(LOAD_PARALLELISM)))

    async def step(self, session_id: str, value: bytes) -> bool:
        """read-cas: an explicit read, then a CAS on the version read."""
        s = self._session(session_id)
        rec = await s.get(STATE_KEY)
        try:
            await s.put(STATE_KEY, value, expect=rec.version if rec is not None else 0)
        except ConflictError:
            return False
        return True

    async def _step_cached(self, session_id: str, value: bytes) -> bool:
        try:
            # One retry from the current record a lost CAS returns, as Redis's and etcd's cached
            # steps do; a second loss is a conflict.
            await self._session(session_id).update(STATE_KEY, lambda _old: value, attempts=CACHED_ATTEMPTS)
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
        self._stats = self.client.batching_stats()
        await self.client.close()

    def describe(self) -> dict[str, Any]:
        step = {
            "cached": "handle.update(state, fn, attempts=2) on a long-lived handle per session: one "
                      "CAS from the version the handle last saw, one retry from the current record "
                      "a lost CAS returns (ConflictError = conflict)",
            "read-cas": "handle.get(state); then handle.put(state, expect=version) "
                        "(ConflictError = conflict)",
        }[self.step_impl]
        return {
            "client": ("shardstate.AsyncClient(direct=True): straight to each shard's primary, "
                       "auto-batching over a Pipeline stream per shard" if self.direct else
                       "shardstate.AsyncClient through the router (auto-batching over a Pipeline stream)")
                      + ", one session handle per session id",
            "step_impl": self.step_impl,
            "step": step,
            "read": "handle.get(state)",
            "append": "handle.append(events, [entry]); then handle.read(events, last=10)",
            # Whole run (loading and warm-up included): ops per batch shows how much coalescing paid.
            "batching": {addr: {**st, "ops_per_batch": round(st["ops"] / st["batches"], 2) if st.get("batches") else None}
                         for addr, st in (self._stats or self.client.batching_stats()).items()},
        }
