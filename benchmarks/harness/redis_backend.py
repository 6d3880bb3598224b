"""The Redis backend: redis-py asyncio, a session's state in one hash {value, version}.

A step (read-cas) is HMGET of value and version, then EVALSHA of a Lua script that writes value
and version+1 only if the version field still holds what was read: Redis's usual optimistic CAS.
Step "cached" skips the read and CASes on the version this client saw last (the script answers a
lost CAS with the current version, and the step retries once from it). Logs are lists (RPUSH + LRANGE).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from shardstate.bench.backends import CACHED_ATTEMPTS, LOG_STREAM, split_address

# Absent hash -> version "0", matching shardstate's "version 0 = absent".
# Returns {1, new version} when applied, {0, current version} when the CAS lost.
CAS_SCRIPT = """
local v = redis.call('HGET', KEYS[1], 'version') or '0'
if v ~= ARGV[1] then return {0, v} end
local n = tostring(tonumber(v) + 1)
redis.call('HSET', KEYS[1], 'value', ARGV[2], 'version', n)
return {1, n}
"""
LOAD_CHUNK = 1000


def parser_name() -> str:
    """Which RESP parser redis-py uses (hiredis, a C parser, when installed; else pure Python)."""
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return "pure-Python parser (hiredis not installed)"
    return "hiredis parser"


class RedisBackend:
    name = "redis"

    def __init__(self, address: str, concurrency: int, step_impl: str = "read-cas") -> None:
        import redis.asyncio as aioredis

        host, port = split_address(address)
        self.step_impl = step_impl
        # One connection per concurrent caller, as a pool: redis-py sends one command at a time
        # per connection, so fewer connections would queue callers inside the client.
        self.redis = aioredis.Redis(host=host, port=port, max_connections=max(concurrency, 1) + 2,
                                    socket_timeout=30, socket_connect_timeout=10)
        self.cas = self.redis.register_script(CAS_SCRIPT)  # EVALSHA, EVAL once on NOSCRIPT
        self._seen: dict[str, bytes] = {}  # cached mode: session -> version last seen
        if step_impl == "cached":
            self.step = self._step_cached  # type: ignore[method-assign]
        elif step_impl != "read-cas":
            raise ValueError(f"redis: unknown step implementation {step_impl!r}")

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
            if self.step_impl == "cached":
                self._seen.update(dict.fromkeys(chunk, b"1"))
            progress(len(chunk))

    async def step(self, session_id: str, value: bytes) -> bool:
        key = self._key(session_id)
        _, version = await self.redis.hmget(key, ["value", "version"])
        applied, _ = await self.cas(keys=[key], args=[version or b"0", value])
        return bool(applied)

    async def _step_cached(self, session_id: str, value: bytes) -> bool:
        key = self._key(session_id)
        seen = self._seen.get(session_id)
        if seen is None:
            got = await self.redis.hget(key, "version")  # type: ignore[misc]
            seen = got if isinstance(got, bytes) else b"0"
        for _ in range(CACHED_ATTEMPTS):
            applied, version = await self.cas(keys=[key], args=[seen, value])
            seen = version if isinstance(version, bytes) else str(version).encode()
            if applied:
                break
        self._seen[session_id] = seen
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

        step = {
            "read-cas": "HMGET value,version; then EVALSHA of a Lua CAS on the version field",
            "cached": "EVALSHA of a Lua CAS on the version this client saw last (the script "
                      "returns the current version when the CAS loses; one retry from it)",
        }[self.step_impl]
        return {
            "client": f"redis-py {redis.__version__} asyncio, {parser_name()}, "
                      "a pool of one connection per caller",
            "step_impl": self.step_impl,
            "step": step,
            "read": "HMGET value,version",
            "append": "RPUSH; then LRANGE -10 -1",
        }
