"""The cross-session batch builder, shared by Client and AsyncClient: independent ops on any
sessions sent as one `Batch` RPC (not atomic), results in request order.

    b = c.batch(); b.get("s1", "state"); b.incr("s2", "steps"); got, n = b.execute()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from shardstate.common.errors import InvalidArgumentError
from shardstate.operations import Call, ClientCore, Op, SessionCore

R = TypeVar("R")


class Batch(Generic[R]):
    """Each method adds one op (validated now) and returns the builder. `execute()` returns
    R: the list of results (or an awaitable of it on the asyncio surface), each decoded as the
    session method of the same name decodes it (get -> Record | None, put -> version, ...).
    `execute(raise_on_error=False)` puts a failed op's exception in its place instead of
    raising the first one."""

    def __init__(self, core: ClientCore, run: Callable[[Op[list[Any]]], R], max_ops: int = 1000) -> None:
        self._core = core
        self._run = run
        self._max_ops = max_ops
        self._ops: list[tuple[Op[Any], Call]] = []
        self._sessions: dict[tuple[str | None, str], SessionCore] = {}
        self._executed = False

    def _session(self, session_id: str, namespace: str | None) -> SessionCore:
        s = self._sessions.get((namespace, session_id))
        if s is None:
            s = self._sessions[(namespace, session_id)] = SessionCore(self._core, session_id, namespace=namespace)
        return s

    def _add(self, gen: Op[Any]) -> Batch[R]:
        first = next(gen)  # validates the arguments now, before anything is sent
        if not isinstance(first, Call) or first.batch_field is None:
            gen.close()
            raise InvalidArgumentError(f"{first!r} cannot be part of a batch")
        self._ops.append((gen, first))
        return self

    def __len__(self) -> int:
        return len(self._ops)

    def get(self, session_id: str, key: str, *, namespace: str | None = None,
            consistency: Any = None, min_revision: int = 0) -> Batch[R]:
        return self._add(self._session(session_id, namespace).get(key, consistency, min_revision))

    def get_json(self, session_id: str, key: str, default: Any = None, *,
                 namespace: str | None = None) -> Batch[R]:
        return self._add(self._session(session_id, namespace).get_json(key, default))

    def put(self, session_id: str, key: str, value: Any, *, expect: int | None = None,
            ttl: Any = None, namespace: str | None = None) -> Batch[R]:
        return self._add(self._session(session_id, namespace).put(key, value, expect, ttl))

    def delete(self, session_id: str, key: str, *, expect: int | None = None,
               namespace: str | None = None) -> Batch[R]:
        return self._add(self._session(session_id, namespace).delete(key, expect))

    def incr(self, session_id: str, key: str, delta: int = 1, *, ttl: Any = None,
             namespace: str | None = None) -> Batch[R]:
        return self._add(self._session(session_id, namespace).incr(key, delta, ttl))

    def append(self, session_id: str, stream: str, values: Any, *,
               namespace: str | None = None) -> Batch[R]:
        return self._add(self._session(session_id, namespace).append(stream, values))

    def read(self, session_id: str, stream: str, *, last: int = 0, after_seq: int = 0,
             limit: int | None = None, namespace: str | None = None) -> Batch[R]:
        return self._add(self._session(session_id, namespace).read(
            stream, last=last, after_seq=after_seq, limit=limit))

    def touch(self, session_id: str, ttl: Any, *, namespace: str | None = None) -> Batch[R]:
        return self._add(self._session(session_id, namespace).touch(ttl))

    def info(self, session_id: str, *, namespace: str | None = None) -> Batch[R]:
        return self._add(self._session(session_id, namespace).info())

    def execute(self, raise_on_error: bool = True, timeout: Any = None) -> R:
        if self._executed:
            raise InvalidArgumentError("this batch was already executed; build a new one with batch()")
        self._executed = True
        return self._run(self._core.batch(self._ops, raise_on_error, timeout, self._max_ops))
