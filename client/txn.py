"""The transaction builder of a session, shared by Client and AsyncClient: compares, then the
ops to run when they all hold, and (after `.otherwise()`) the ops to run when one does not.

    r = s.txn().if_version("state", v).put("state", b"new").incr("steps") \
               .otherwise().get("state").commit()    # await ...commit() on AsyncSession
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Self, TypeVar

from shardstate import codec
from shardstate.common.errors import InvalidArgumentError
from shardstate.operations import Op, SessionCore
from shardstate.v1 import state_pb2

R = TypeVar("R")

_OPS = {"==": state_pb2.Compare.EQUAL, "!=": state_pb2.Compare.NOT_EQUAL,
        ">": state_pb2.Compare.GREATER, "<": state_pb2.Compare.LESS}


@dataclass(frozen=True)
class TxnResult:
    """`succeeded`: every compare held and the main ops ran (else the `.otherwise()` ops ran).
    `results`: one per op of the branch that ran: get -> Record | None, put -> version,
    delete -> existed, incr -> new value, append -> seqs. `revision`: of the write (0 if none)."""

    succeeded: bool
    results: list[Any] = field(default_factory=list)
    revision: int = 0

    def __bool__(self) -> bool:
        return self.succeeded

    def __getitem__(self, i: int) -> Any:
        return self.results[i]


class Txn(Generic[R]):
    """Build with chained calls, then `commit()` (which returns R: the TxnResult, or an
    awaitable of it on the asyncio surface). A builder commits once."""

    def __init__(self, session: SessionCore, run: Callable[[Op[TxnResult]], R]) -> None:
        self._session = session
        self._run = run
        self._req = state_pb2.TxnRequest()
        self._in_failure = False
        self._touched: set[str] = set()
        self._committed = False

    # ---- compares ----

    def _compare(self, key: str, op: str, **target: Any) -> Self:
        if op not in _OPS:
            raise InvalidArgumentError(f"compare op must be one of {', '.join(_OPS)}, got {op!r}")
        self._req.compares.add(result=_OPS[op], key=key, **target)
        return self

    def if_version(self, key: str, version: int, op: str = "==") -> Self:
        """The key's version compares to `version` (0 = absent)."""
        return self._compare(codec.key(key), op, version=codec.version(version, "version"))

    def if_value(self, key: str, value: Any, op: str = "==") -> Self:
        return self._compare(codec.key(key), op, value=codec.to_bytes(value))

    def if_exists(self, key: str) -> Self:
        return self._compare(codec.key(key), "==", exists=True)

    def if_missing(self, key: str) -> Self:
        return self._compare(codec.key(key), "==", exists=False)

    def if_log_length(self, stream: str, length: int, op: str = "==") -> Self:
        return self._compare(codec.stream(stream), op, log_length=codec.count(length, "length"))

    # ---- ops (into the branch being built) ----

    def _op(self, **op: Any) -> Self:
        (self._req.failure if self._in_failure else self._req.success).append(state_pb2.TxnOp(**op))
        return self

    def get(self, key: str) -> Self:
        return self._op(get=state_pb2.GetRequest(key=codec.key(key)))

    def put(self, key: str, value: Any, ttl: Any = None) -> Self:
        key = codec.key(key)
        self._touched.add(key)
        return self._op(put=state_pb2.PutRequest(
            key=key, value=codec.to_bytes(value), ttl_ms=codec.ms(ttl, "ttl")))

    def put_json(self, key: str, obj: Any, ttl: Any = None) -> Self:
        return self.put(key, codec.json_bytes(obj), ttl=ttl)

    def delete(self, key: str) -> Self:
        key = codec.key(key)
        self._touched.add(key)
        return self._op(delete=state_pb2.DeleteRequest(key=key))

    def incr(self, key: str, delta: int = 1, ttl: Any = None) -> Self:
        key = codec.key(key)
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise InvalidArgumentError(f"delta must be an int, got {type(delta).__name__}")
        self._touched.add(key)
        return self._op(increment=state_pb2.IncrementRequest(
            key=key, delta=delta, ttl_ms=codec.ms(ttl, "ttl")))

    def append(self, stream: str, values: Any) -> Self:
        return self._op(append=state_pb2.AppendRequest(
            stream=codec.stream(stream), entries=codec.entries(values)))

    def otherwise(self) -> Self:
        """The ops that follow run when a compare fails."""
        if self._in_failure:
            raise InvalidArgumentError("otherwise() was already called on this txn")
        self._in_failure = True
        return self

    # ---- commit ----

    def _commit(self, timeout: Any) -> Op[TxnResult]:
        req = state_pb2.TxnRequest()
        req.CopyFrom(self._req)
        ok, results, revision = yield from self._session.txn(req, self._touched, timeout)
        return TxnResult(ok, results, revision)

    def commit(self, timeout: Any = None) -> R:
        if self._committed:
            raise InvalidArgumentError("this txn was already committed; build a new one with txn()")
        self._committed = True
        return self._run(self._commit(timeout))
