"""The Redis backend: redis-py asyncio, a session's state in one hash {value, version}.

A step is HMGET of the hash, then a Lua script that sets value and version+1 only if the version
field still holds what was read (Redis's usual optimistic CAS); logs are lists (RPUSH + LRANGE).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from shardstate.bench.backends import LOG_STREAM, split_address

# Absent hash -> version "0", matching shardstate's "version 0 = absent".
CAS_SCRIPT = """
local v = redis.call('HGET', KEYS[1], 'version')
if (v or '0') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'value', ARGV[2], 'version', tonumber(ARGV[1]) + 1)
return 1
"""
LOAD_CHUNK = 1000


class RedisBackend:
    name = "redis"

    def __init__(self, address: str, concurrency: int) -> None:
        import redis.asyncio as aioredis

        host, port = split_address(address)
        # One connection per concurrent caller, as a pool: redis-py sends one command at a time
        # per connection, so fewer connections would queue callers inside the client.
        self.redis = aioredis.Redis(host=host, port=port, max_connections=max(concurrency, 1) + 2,
                                    socket_timeout=30, socket_connect_timeout=10)
        self.cas = self.redis.register_script(CAS_SCRIPT)

    @staticmethod
    def _key(session_id: str) -> str:
        return f"s:{session_id}"

    async def setup(self, session_ids: Sequence[str], value: bytes,
                    progress: Callable[[int], None]) -> None:
        await self.redis.ping()
        await self.redis.script_load(CAS_SCRIPT)  # so the first EVALSHA of the run finds it
        for i in range(0, len(session_ids), LOAD_CHUNK):
            chunk = session_ids[i:i + LOAD_CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            for sid in chunk:
                pipe.hset(self._key(sid), mapping={"value": value, "version": 1})
            await pipe.execute()
            progress(len(chunk))

    async def step(self, session_id: str, value: bytes) -> bool:
        key = self._key(session_id)
        _, version = await self.redis.hmget(key, ["value", "version"])
        applied = await self.cas(keys=[key], args=[version or b"0", value])
        return bool(applied)

    async def read(self, session_id: str) -> bool:
        current, _ = await self.redis.hmget(self._key(session_id), ["value", "version"])
        return current is not None

    async def append(self, session_id: str, entry: bytes, last: int) -> int:
        key = f"l:{session_id}:{LOG_STREAM}"
        await self.redis.rpush(key, entry)
        return len(await self.redis.lrange(key, -last, -1))

    async def close(self) -> None:
        await asyncio.shield(self.redis.aclose())

    def describe(self) -> dict[str, Any]:
        import redis

        return {
            "client": f"redis-py {redis.__version__} asyncio, a pool of one connection per caller",
            "step": "HMGET value,version; then EVALSHA of a Lua CAS on the version field",
            "append": "RPUSH; then LRANGE -10 -1",
        }
