"""CPU priority of a shard process: a replica sharing a machine with primaries and routers can
run in the background (Linux SCHED_IDLE), so its catch-up work uses only the CPU they leave
idle instead of preempting the request path.

The policy is per thread: `set_background` changes every thread of the process, and threads
started later inherit it from the thread that starts them (gRPC's pollers, LevelDB's
compaction thread). Returning to normal priority needs root, CAP_SYS_NICE or a RLIMIT_NICE
that allows it; without, the process stays in the background and the caller is told why.
"""

from __future__ import annotations

import os
import threading
from typing import Any

SCHED_IDLE: int = getattr(os, "SCHED_IDLE", 5)
SCHED_OTHER: int = getattr(os, "SCHED_OTHER", 0)


def supported() -> bool:
    return hasattr(os, "sched_setscheduler") and os.path.isdir("/proc/self/task")


def threads(pid: int | str = "self") -> list[int]:
    """The thread ids of process `pid` (Linux)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def policy_of(tid: int) -> int:
    return os.sched_getscheduler(tid)


def set_background(on: bool) -> str:
    """Put every thread of this process in the background (on) or back to normal; "" when
    done, else why not (the threads it could not change keep their policy)."""
    if not supported():
        return "per-thread CPU scheduling policies need Linux"
    policy = SCHED_IDLE if on else SCHED_OTHER
    failed: list[str] = []
    for tid in threads():
        try:
            if os.sched_getscheduler(tid) != policy:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except OSError as e:
            failed.append(f"thread {tid}: {e.strerror}")
    if failed:
        what = "SCHED_IDLE" if on else "normal priority (SCHED_OTHER)"
        hint = "" if on else " (needs root, CAP_SYS_NICE or RLIMIT_NICE; restart the process to run at normal priority)"
        return f"could not switch to {what}: {'; '.join(failed[:3])}{hint}"
    return ""


def start_leveldb_background(db: Any, nice: int) -> None:
    """LevelDB flushes memtables and compacts on one background thread per process, started
    by the first thread that schedules such work and inheriting that thread's priority. Start
    it now from a helper thread running at `nice`, so the flushes and compactions of a busy
    shard take CPU the request path leaves idle before they take it from requests. (Raising a
    thread's nice value needs no privilege. When opening the DB already started the thread,
    it keeps normal priority.)"""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return

    def body() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)  # Linux: the calling thread only
        except OSError:
            return
        # A manual compaction of a range no key lives in: it flushes the memtable (usually
        # empty at open), which schedules background work and so starts the thread here.
        try:
            db.compact_range(start=b"\x00", stop=b"\x00\x00")
        except Exception:
            pass  # the thread then starts with the first flush, at normal priority

    t = threading.Thread(target=body, name="leveldb-background-start", daemon=True)
    t.start()
    t.join()


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)
