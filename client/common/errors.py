"""The exception hierarchy of shardstate and the one table between it and gRPC status codes.

Servers raise these and `abort()` turns them into a status (with typed details); clients turn a
status back into the same exception with `from_rpc_error()`. Nothing else maps codes.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2

from shardstate.v1 import types_pb2

if TYPE_CHECKING:
    from shardstate.common.records import Record

DETAILS_KEY = "grpc-status-details-bin"


class ShardstateError(Exception):
    """Root of every error shardstate raises."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    retryable: ClassVar[bool] = False

    def __init__(self, message: str = "", *, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def details(self) -> list[Any]:
        """Typed protobuf details carried with the status."""
        return [self.detail] if self.detail is not None else []


# ---- answers from a server about the request ----


class InvalidArgumentError(ShardstateError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceededError(ShardstateError):
    """Over a configured limit; `limit`, `value` (the limit) and `actual` say which."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    @classmethod
    def of(cls, limit: str, value: int, actual: int, what: str) -> LimitExceededError:
        msg = f"{what} is {actual}, over the limit {limit}={value}"
        return cls(msg, detail=types_pb2.LimitExceeded(limit=limit, value=value, actual=actual))

    @property
    def limit(self) -> str:
        return self.detail.limit if self.detail is not None else ""


class RateLimitedError(LimitExceededError):
    """Over a namespace's `max_ops_per_s`. Unlike the other limits it passes by itself (the
    bucket refills), so the client's default `Retry` waits and tries again, as AWS SDKs do
    with throttling; it reaches the caller when the attempts are used up."""

    RATE_LIMIT: ClassVar[str] = "max_ops_per_s"


class NotFoundError(ShardstateError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ShardstateError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(ShardstateError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class WrongShardError(FailedPreconditionError):
    """The node does not own the session; `detail` is a WrongShard{epoch, owner}."""

    @classmethod
    def of(cls, epoch: int, owner: str, owner_address: str = "") -> WrongShardError:
        detail = types_pb2.WrongShard(epoch=epoch, owner=owner, owner_address=owner_address)
        return cls(f"session is owned by shard {owner!r} at epoch {epoch}", detail=detail)


class NotPrimaryError(FailedPreconditionError):
    """The node is a replica; `detail` is a NotPrimary{primary}."""

    @classmethod
    def of(cls, primary: str, shard_id: str = "") -> NotPrimaryError:
        detail = types_pb2.NotPrimary(primary=primary, shard_id=shard_id)
        return cls(f"this node is a replica; the primary is {primary or 'unknown'}", detail=detail)


class HistoryCompactedError(ShardstateError):
    """Watch history asked for is gone; `oldest_revision` is the oldest still kept."""

    code = grpc.StatusCode.OUT_OF_RANGE

    @classmethod
    def of(cls, asked: int, oldest: int) -> HistoryCompactedError:
        detail = types_pb2.HistoryCompacted(oldest_revision=oldest)
        return cls(
            f"revision {asked} is compacted; the oldest available revision is {oldest}",
            detail=detail,
        )

    @property
    def oldest_revision(self) -> int:
        return self.detail.oldest_revision if self.detail is not None else 0


class UnauthenticatedError(ShardstateError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ShardstateError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnimplementedError(ShardstateError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(ShardstateError):
    code = grpc.StatusCode.INTERNAL


class AbortedError(ShardstateError):
    code = grpc.StatusCode.ABORTED


class CancelledError(ShardstateError):
    code = grpc.StatusCode.CANCELLED


# ---- the network or the node, not the request ----


class TransientError(ShardstateError):
    """The request may not have reached a server, or the answer was lost; safe to retry
    a request carrying a request_id."""

    retryable = True


class UnavailableError(TransientError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(TransientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


# ---- raised by the client library itself ----


class ClientClosedError(ShardstateError):
    """A call on a Client or AsyncClient after its close(): make a new client instead."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ConflictError(ShardstateError):
    """A compare-and-swap did not match; `current` is the record as it is now (None if absent)."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, message: str = "", *, current: Record | None = None) -> None:
        super().__init__(message)
        self.current = current


# The one table: status code -> exception class (typed details refine it in from_status).
CODE_TO_ERROR: dict[grpc.StatusCode, type[ShardstateError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.OUT_OF_RANGE: HistoryCompactedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}
DETAIL_TO_ERROR: dict[type[Any], type[ShardstateError]] = {
    types_pb2.WrongShard: WrongShardError,
    types_pb2.NotPrimary: NotPrimaryError,
    types_pb2.LimitExceeded: LimitExceededError,
    types_pb2.HistoryCompacted: HistoryCompactedError,
}
_INT_TO_CODE = {c.value[0]: c for c in grpc.StatusCode}


def code_from_int(code: int) -> grpc.StatusCode:
    return _INT_TO_CODE.get(code, grpc.StatusCode.UNKNOWN)


# gRPC itself refuses a message over its size limit, before shardstate sees it, with a bare
# RESOURCE_EXHAUSTED; these name the limit like every other one. Servers and routers let gRPC
# take max_request_bytes plus this much envelope (server/main.py, router/main.py), so that an
# oversize value inside a message still reaches the shard, which names its limit.
RECEIVE_SLACK_BYTES = 64 * 1024
GRPC_CORE_INTERNAL = "Internal error from Core"
_GRPC_SIZE = re.compile(r"(SERVER|CLIENT): (Received|Sent) message larger than max \((\d+) vs\. (\d+)\)")


def _size_limit(message: str) -> LimitExceededError | None:
    m = _GRPC_SIZE.search(message)
    if m is None:
        return None
    side, verb, actual, cap = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
    if side == "SERVER":
        limit = max(cap - RECEIVE_SLACK_BYTES, 0)
        return LimitExceededError.of("max_request_bytes", limit, actual, "the request message (bytes)")
    what = "the request message (bytes)" if verb == "Sent" else "the response message (bytes)"
    return LimitExceededError.of("max_message_bytes", cap, actual, f"{what}, the client's limit,")


def from_status(code: grpc.StatusCode | int, message: str, details: list[Any] | None = None) -> ShardstateError:
    """Build the exception for a status code, message and unpacked typed details."""
    if isinstance(code, int):
        code = code_from_int(code)
    for d in details or []:
        cls = DETAIL_TO_ERROR.get(type(d))
        if cls is LimitExceededError and d.limit == RateLimitedError.RATE_LIMIT:
            cls = RateLimitedError
        if cls is not None:
            return cls(message, detail=d)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        sized = _size_limit(message)
        if sized is not None:
            return sized
    if code == grpc.StatusCode.INTERNAL and message == GRPC_CORE_INTERNAL:
        # grpcio's own answer, on the caller's side, for a call whose connection broke under
        # it (seen when a node is killed mid-call): the node's fate is unknown, as for
        # UNAVAILABLE, and the call's request_id makes a retry safe. No shardstate node sends it.
        return UnavailableError(f"the connection broke during the call (grpc: {message})")
    return CODE_TO_ERROR.get(code, ShardstateError)(message)


def pack_details(details: list[Any]) -> list[any_pb2.Any]:
    out = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        out.append(a)
    return out


def unpack_details(anys: Any) -> list[Any]:
    out: list[Any] = []
    for a in anys:
        for cls in DETAIL_TO_ERROR:
            if a.Is(cls.DESCRIPTOR):
                msg = cls()
                a.Unpack(msg)
                out.append(msg)
    return out


def trailing_metadata_for(exc: ShardstateError) -> tuple[tuple[str, bytes], ...]:
    """The `grpc-status-details-bin` trailer carrying exc's typed details (google.rpc.Status)."""
    st = status_pb2.Status(
        code=exc.code.value[0], message=exc.message, details=pack_details(exc.details())
    )
    return ((DETAILS_KEY, st.SerializeToString()),)


def as_shardstate_error(exc: BaseException) -> ShardstateError:
    """Any exception raised while serving a request, as the error the caller should see."""
    if isinstance(exc, ShardstateError):
        return exc
    return InternalError(f"internal error: {type(exc).__name__}: {exc}")


async def abort(context: Any, exc: BaseException) -> None:
    """Abort a grpc.aio call with the status the table gives for exc (raises)."""
    err = as_shardstate_error(exc)
    await context.abort(err.code, err.message, trailing_metadata=trailing_metadata_for(err))


def from_rpc_error(err: grpc.RpcError) -> ShardstateError:
    """A gRPC error (sync or aio) as a shardstate exception, typed details included."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    details: list[Any] = []
    md = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in md or ():
        if key == DETAILS_KEY:
            st = status_pb2.Status.FromString(value)
            details = unpack_details(st.details)
    exc = from_status(code, message or "", details)
    exc.__cause__ = err
    return exc


def to_code_int(exc: ShardstateError) -> int:
    return int(exc.code.value[0])


OK = code_pb2.OK
