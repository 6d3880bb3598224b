"""The sync Client's batching (`Client(batching=True)`): its calls ride an AsyncClient's
Pipeline streams, run on a private event loop in a daemon thread.

Only the network part crosses threads: each caller thread still drives its operation's
generator itself (so `update()`'s function runs in the caller's thread and may use the client
again), and hands each `Call` to the loop, where calls from every thread that arrive together
are coalesced into one Pipeline message per address (shardstate.pipeline), as AsyncClient's.
A call made while fewer than SHARE_AT others are under way goes as a plain blocking call
instead: with few threads the hand-off costs more than sharing saves
(benchmarks/sync_batching.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable
from typing import Any

from shardstate.aio import AsyncClient
from shardstate.channels import CLOSED
from shardstate.common.errors import ClientClosedError
from shardstate.operations import Call

FORKED = ("this Client was made in process {0}, before a fork: its channels and event-loop "
          "thread are not in this process (make a Client in each process)")
# A call goes through the loop when at least this many others are under way. Fewer gain less
# from sharing a message than the hand-off costs: on 2 cores through a router (2026-12-04,
# benchmarks/sync_batching.py), sharing from 1 made 4 threads 0.76-0.81x as fast as plain
# calls; from 6, 4 threads ran as plain calls do, 8 threads 1.3-1.6x, 16 2.0-2.4x, 32 2.6x.
SHARE_AT = 6
CLOSE_WAIT_S = 5.0  # close(): the longest it waits for the loop to close its channels


class LoopBridge:
    """An AsyncClient on an event loop of its own thread, and blocking calls into it."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._in_flight = 0  # calls of the client under way, either path
        self._thread: threading.Thread | None = None  # started by the first call that shares

    def _started(self) -> asyncio.AbstractEventLoop:
        """The loop, its thread started on first use: a client whose calls never meet
        others' never runs one."""
        with self._lock:
            if self._closed:
                raise ClientClosedError(CLOSED)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="shardstate-client-loop", daemon=True)
                self._thread.start()
        return self._loop

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        loop = self._loop
        try:
            loop.run_forever()
        finally:
            # Whatever close() did not reach (a call that came in while it ran) is cancelled,
            # so no caller waits for a loop that has stopped.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            # Also runs the callbacks already queued: among them those that hand an ended
            # call's outcome to the thread waiting for it (a closed loop would drop them).
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def perform(self, call: Call, alone: Callable[[Call], Any]) -> Any:
        """`call` through the loop when SHARE_AT other calls of the client are under way (it
        may share a message with them), else `alone(call)`: with few threads the hand-off
        to the loop costs more CPU than sharing saves."""
        if os.getpid() != self._pid:
            raise ClientClosedError(FORKED.format(self._pid))
        with self._lock:
            shared = self._in_flight >= SHARE_AT
            self._in_flight += 1
        try:
            return self.call(call) if shared else alone(call)
        finally:
            with self._lock:
                self._in_flight -= 1

    def call(self, call: Call) -> Any:
        """One logical call (retries included, AsyncClient._call): its response message.
        Its deadline is fixed here, in the caller's thread, when the call starts."""
        loop = self._started()
        self.client._core.start(call)
        coro = self.client._call(call)
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop is closed: close() ran meanwhile
            coro.close()
            raise ClientClosedError(CLOSED) from None
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            raise ClientClosedError(CLOSED) from None  # close() cancelled it

    def close(self) -> None:
        """Closes the AsyncClient (its streams and channels) and stops the loop's thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if os.getpid() != self._pid:
            return  # a forked child's copy: the thread and the loop are the parent's
        if thread is None:  # never used: no channel was opened on the loop
            self._loop.close()
            return
        if threading.current_thread() is thread:
            raise RuntimeError("close() of a batching Client from inside its own event loop")
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(CLOSE_WAIT_S)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            thread.join(CLOSE_WAIT_S)

    async def _shutdown(self) -> None:
        """Calls still under way end with ClientClosedError in their threads."""
        me = asyncio.current_task()
        calls = [t for t in asyncio.all_tasks() if t is not me]
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)  # their waiters are told first
        await self.client.close()
