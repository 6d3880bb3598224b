"""Semi-synchronous replication: which revision each follower has acknowledged as applied,
and writers waiting until `need` followers have acknowledged their revision.

Waiters sit in a heap by revision; each ack computes the highest revision that `need`
followers have reached and releases every waiter at or below it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from shardstate.common.errors import UnavailableError


class AckTracker:
    def __init__(self, need: int, timeout_s: float) -> None:
        self.need = need
        self.timeout_s = timeout_s
        self.acked: dict[str, int] = {}  # follower id -> highest applied revision it acked
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def satisfied(self) -> int:
        """Highest revision at least `need` followers have acknowledged (0 = none)."""
        if self.need <= 0:
            return 1 << 63
        vals = sorted(self.acked.values(), reverse=True)
        return vals[self.need - 1] if len(vals) >= self.need else 0

    def waiting(self) -> bool:
        """True while a writer waits for acknowledgements (followers should not dawdle)."""
        return bool(self._waiters)

    def ack(self, follower: str, revision: int) -> None:
        if revision <= self.acked.get(follower, 0):
            return
        self.acked[follower] = revision
        if not self._waiters:
            return
        top = self.satisfied()
        while self._waiters and self._waiters[0][0] <= top:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)

    async def wait(self, revision: int) -> None:
        """Return once `need` followers applied `revision`; UnavailableError after the timeout
        (the write itself stays committed on this primary)."""
        if self.need <= 0 or self.satisfied() >= revision:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (revision, next(self._seq), fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            have = sum(1 for v in self.acked.values() if v >= revision)
            raise UnavailableError(
                f"the write is committed and durable on the primary (revision {revision}), but only "
                f"{have} of the {self.need} replica acknowledgements required by --min-replica-acks "
                f"arrived within {self.timeout_s:g}s: it could be lost if this primary fails before a "
                "replica receives it. It is not rolled back; a retry with the same request_id returns "
                "its result"
            ) from None
        finally:
            if not fut.done():
                fut.cancel()

    def fail_all(self, reason: str) -> None:
        """This node stopped being the primary: nobody will ack for it any more."""
        waiters, self._waiters = self._waiters, []
        for _, _, fut in waiters:
            if not fut.done():
                fut.set_exception(UnavailableError(reason))
        self.acked.clear()
