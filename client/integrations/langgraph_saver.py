"""LangGraph checkpointers on shardstate: `ShardStateSaver` (sync `Client`) and
`AsyncShardStateSaver` (`AsyncClient`), both `BaseCheckpointSaver`s with every method sync
and async. Each thread is one shardstate session; how it is laid out and what each method
does is in langgraph_threads (written once, run by both).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from shardstate import AsyncClient, Client

from .langgraph_driver import AsyncDriver, Plan, SyncDriver
from .langgraph_threads import DEFAULT_PREFIX, SaverCore, next_version


class ShardStateSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer on a shardstate cluster through a sync `Client`.

    `ShardStateSaver("127.0.0.1:7400")` makes (and `close()` closes) its own Client; pass a
    Client to share one. `ttl` (seconds): each thread expires that long after its last write.
    `namespace`: the shardstate namespace (default: the client's). `prefix`: of the session
    ids (threads are `{prefix}t/{thread_id}`)."""

    def __init__(self, client_or_address: Client | str, *, ttl: float | None = None,
                 namespace: str | None = None, prefix: str = DEFAULT_PREFIX,
                 serde: SerializerProtocol | None = None) -> None:
        super().__init__(serde=serde)
        self._driver = SyncDriver(client_or_address, ttl=ttl, namespace=namespace)
        self._core = SaverCore(self, prefix)

    @property
    def client(self) -> Client:
        return self._driver.client

    def close(self) -> None:
        self._driver.close()

    def __enter__(self) -> ShardStateSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_next_version(self, current: str | int | float | None, channel: None = None) -> str:  # type: ignore[override]
        return next_version(current)

    def put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
            new_versions: ChannelVersions) -> RunnableConfig:
        return self._driver.run(self._core.put(config, checkpoint, metadata, new_versions))

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                   task_path: str = "") -> None:
        self._driver.run(self._core.put_writes(config, writes, task_id, task_path))

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._driver.run(self._core.get_tuple(config))

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None) -> Iterator[CheckpointTuple]:
        for thread_id in self._driver.run(self._core.list_threads(config)):
            if limit is not None and limit <= 0:
                return
            got = self._driver.run(self._core.list_thread(thread_id, config, filter, before, limit))
            if limit is not None:
                limit -= len(got)
            yield from got

    def delete_thread(self, thread_id: str) -> None:
        self._driver.run(self._core.delete_thread(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._driver.run(self._core.delete_for_runs(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._driver.run(self._core.copy_thread(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._driver.run(self._core.prune(thread_ids, strategy))

    # the async methods run the sync ones in a worker thread (use AsyncShardStateSaver in
    # asyncio programs)

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await asyncio.to_thread(self.get_tuple, config)

    async def alist(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None,
                    limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        got = await asyncio.to_thread(lambda: list(self.list(config, filter=filter, before=before,
                                                             limit=limit)))
        for t in got:
            yield t

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        return await asyncio.to_thread(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        await asyncio.to_thread(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await asyncio.to_thread(self.delete_thread, thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await asyncio.to_thread(self.delete_for_runs, run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await asyncio.to_thread(self.copy_thread, source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await asyncio.to_thread(self.prune, thread_ids, strategy=strategy)


class AsyncShardStateSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer on a shardstate cluster through an `AsyncClient`: each method
    is a few batched round trips (aput: one Txn; aput_writes: one Txn; aget_tuple: one Scan
    of the checkpoint with its writes, and the channel values this process did not write
    itself in the same round trip when it knows them, else in a second).

    `AsyncShardStateSaver("127.0.0.1:7400")` makes (and `aclose()` / `async with` closes) its
    own AsyncClient; pass one to share it. Keywords as ShardStateSaver. The sync methods work
    from other threads than the event loop's (they run the async ones on that loop)."""

    def __init__(self, client_or_address: AsyncClient | str, *, ttl: float | None = None,
                 namespace: str | None = None, prefix: str = DEFAULT_PREFIX,
                 serde: SerializerProtocol | None = None) -> None:
        super().__init__(serde=serde)
        self._driver = AsyncDriver(client_or_address, ttl=ttl, namespace=namespace)
        self._core = SaverCore(self, prefix)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def client(self) -> AsyncClient:
        return self._driver.client

    async def aclose(self) -> None:
        await self._driver.close()

    async def __aenter__(self) -> AsyncShardStateSaver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def get_next_version(self, current: str | int | float | None, channel: None = None) -> str:  # type: ignore[override]
        return next_version(current)

    async def _run(self, plan: Plan[Any]) -> Any:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return await self._driver.run(plan)

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        return await self._run(self._core.put(config, checkpoint, metadata, new_versions))  # type: ignore[no-any-return]

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        await self._run(self._core.put_writes(config, writes, task_id, task_path))

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await self._run(self._core.get_tuple(config))  # type: ignore[no-any-return]

    async def alist(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None,
                    limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        for thread_id in await self._run(self._core.list_threads(config)):
            if limit is not None and limit <= 0:
                return
            got = await self._run(self._core.list_thread(thread_id, config, filter, before, limit))
            if limit is not None:
                limit -= len(got)
            for t in got:
                yield t

    async def adelete_thread(self, thread_id: str) -> None:
        await self._run(self._core.delete_thread(thread_id))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._run(self._core.delete_for_runs(run_ids))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._run(self._core.copy_thread(source_thread_id, target_thread_id))

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await self._run(self._core.prune(thread_ids, strategy))

    # ---- the sync surface, from threads other than the event loop's ----

    def _sync(self, coro: Any) -> Any:
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop or not loop.is_running():
            coro.close()
            raise RuntimeError("AsyncShardStateSaver's sync methods run on its event loop and "
                               "must be called from another thread; in sync code use "
                               "ShardStateSaver, or call the async methods (ainvoke, astream)")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
            new_versions: ChannelVersions) -> RunnableConfig:
        return self._sync(self.aput(config, checkpoint, metadata, new_versions))  # type: ignore[no-any-return]

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                   task_path: str = "") -> None:
        self._sync(self.aput_writes(config, writes, task_id, task_path))

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._sync(self.aget_tuple(config))  # type: ignore[no-any-return]

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None) -> Iterator[CheckpointTuple]:
        async def collect() -> list[CheckpointTuple]:
            return [t async for t in self.alist(config, filter=filter, before=before, limit=limit)]
        yield from self._sync(collect())

    def delete_thread(self, thread_id: str) -> None:
        self._sync(self.adelete_thread(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._sync(self.adelete_for_runs(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._sync(self.acopy_thread(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._sync(self.aprune(thread_ids, strategy=strategy))
