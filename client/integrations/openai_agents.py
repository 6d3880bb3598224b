"""OpenAI Agents SDK memory on shardstate: `ShardStateSession`, the SDK's `Session` protocol over
one log stream of a shardstate session (an item per entry, JSON), with an optional sliding TTL.

    session = ShardStateSession("user-42", "127.0.0.1:7400", ttl=3600)
    await Runner.run(agent, "hi", session=session)

`pop_item` is the server's atomic PopLast: concurrent callers never get the same item.
`get_items(limit)` reads only the newest `limit` entries. Needs `shardstate[openai-agents]`.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import TYPE_CHECKING, Any

from agents.memory.session_settings import (
    SessionSettings,
    coerce_session_settings,
    resolve_session_limit,
)

from shardstate.integrations._async_client import async_client

if TYPE_CHECKING:
    from agents.items import TResponseInputItem

    from shardstate import AsyncSession

ITEMS_STREAM = "items"
# One Append carries at most the server's default max_batch_ops entries and stays well under
# its default max_request_bytes; add_items sends more as several appends, in order.
APPEND_ENTRIES = 1000
APPEND_BYTES = 2 * 1024 * 1024
CLEAR_ALL = 2**63  # TrimLog(before_seq=CLEAR_ALL) removes every entry of the stream


class ShardStateSession:
    """The conversation history of `session_id`: the entries of stream `stream` (default
    "items") of the shardstate session of the same id. Other keys and streams of that session
    are left alone, so an agent can keep its own state beside its history.

    `client_or_address`: a shardstate.AsyncClient to share, or a router address (or list of
    addresses), for which the session makes its own AsyncClient (closed by `close()`).
    `ttl` (seconds): the shardstate session expires this long after the last add_items.
    `session_settings`: the SDK's SessionSettings (its `limit` is get_items' default)."""

    def __init__(self, session_id: str, client_or_address: Any, *, ttl: float | None = None,
                 session_settings: SessionSettings | dict[str, Any] | None = None,
                 stream: str = ITEMS_STREAM) -> None:
        self.session_id = session_id
        self.session_settings: SessionSettings | None = (
            coerce_session_settings(session_settings) if session_settings is not None
            else SessionSettings())
        self.client, self._owns_client = async_client(client_or_address, "ShardStateSession")
        self.ttl = ttl
        self.stream = stream
        self._session: AsyncSession = self.client.session(session_id, ttl=ttl)

    def __repr__(self) -> str:
        return f"ShardStateSession({self.session_id!r}, stream={self.stream!r})"

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The history oldest first; with a limit (or session_settings.limit), only the newest
        `limit` items, read as the newest `limit` entries of the stream (never all of it).
        A limit of 0 gives []; a negative limit means no limit (as the SDK's SQLiteSession)."""
        n = resolve_session_limit(limit, self.session_settings)
        if n == 0:
            return []
        last = n if n is not None and n > 0 else 0
        entries = await self._session.read(self.stream, last=last)
        return [json.loads(e.data) for e in entries]

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Appends the items in order: one atomic Append for up to 1 000 items (and 2 MiB),
        several in order beyond. Each refreshes the TTL."""
        chunk: list[bytes] = []
        size = 0
        for item in items:
            data = json.dumps(item, separators=(",", ":")).encode()
            if chunk and (len(chunk) >= APPEND_ENTRIES or size + len(data) > APPEND_BYTES):
                await self._session.append(self.stream, chunk)
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        if chunk:
            await self._session.append(self.stream, chunk)

    async def pop_item(self) -> TResponseInputItem | None:
        """Removes and returns the newest item (None when empty), atomically on the server:
        two callers never get the same item, and a retried pop removes one item."""
        entry = await self._session.pop(self.stream)
        return json.loads(entry.data) if entry is not None else None

    async def clear_session(self) -> None:
        """Removes every item (the stream's seqs go on from where they were)."""
        await self._session.trim(self.stream, before_seq=CLEAR_ALL)

    async def close(self) -> None:
        """Closes the AsyncClient if this session made it (a shared client stays open)."""
        if self._owns_client:
            await self.client.close()

    async def __aenter__(self) -> ShardStateSession:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


__all__ = ["ShardStateSession"]
