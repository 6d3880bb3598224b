"""How a supervisor (`shardstate dev`) and its children stay one unit: children die with the
supervisor (Linux PR_SET_PDEATHSIG), and a directory in use names the process holding it.

Locks are POSIX record locks (fcntl), the kind LevelDB takes on its LOCK file, so one lookup in
/proc/locks names the holder of either: ours (`dev.lock`) or LevelDB's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import signal
import sys
from pathlib import Path
from typing import IO

SUPERVISOR_ENV = "SHARDSTATE_SUPERVISOR_PID"  # set by a supervisor in each child's environment
PR_SET_PDEATHSIG = 1


class DirectoryInUse(Exception):
    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        who = f"process {pid}" if pid else "another process"
        super().__init__(f"{path} is in use: {who} holds its lock")


def lock_holder(path: Path) -> int | None:
    """The pid holding a POSIX lock on `path` (Linux /proc/locks), None if none or unknown."""
    try:
        st = path.stat()
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        parts = line.split()
        # "1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; blocked waiters are "1: -> POSIX ..."
        if len(parts) >= 6 and parts[1] in ("POSIX", "OFDLCK") and parts[5] == want:
            try:
                pid = int(parts[4])
            except ValueError:
                continue
            return pid if pid > 0 else None
    return None


def hold(path: Path) -> IO[str]:
    """Take an exclusive lock on `path` for as long as the returned file stays open (the
    process's lifetime), with this pid written in it; DirectoryInUse when another holds it.
    The file is never truncated before the lock is ours: a refused caller changes nothing."""
    f = open(path, "a+")  # noqa: SIM115 - held open for the life of the process
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        text = f.read().strip()
        f.close()
        pid = lock_holder(path) or (int(text) if text.isdigit() else None)
        raise DirectoryInUse(path.parent, pid) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def die_with_supervisor() -> None:
    """In a child a supervisor started (SUPERVISOR_ENV set): get SIGTERM when the supervisor's
    thread that started us exits, however it exits (kill -9 included). Called first thing in
    the child; getppid() afterwards closes the race with a supervisor that died before it."""
    raw = os.environ.pop(SUPERVISOR_ENV, "")
    if not raw.isdigit() or not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(raw):
        # The supervisor is gone already (we were re-parented before prctl took effect).
        sys.exit(f"shardstate: the supervisor (pid {raw}) is gone; not starting")


def describe_pid(pid: int) -> str:
    """'process 1234 (python -m shardstate shard --id s1 …)' as far as /proc tells."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"process {pid}"
    words = [w.decode(errors="replace") for w in argv if w]
    if words:
        words[0] = os.path.basename(words[0])
    cmd = " ".join(words)
    if len(cmd) > 80:
        cmd = cmd[:79] + "…"
    return f"process {pid} ({cmd})" if cmd else f"process {pid}"
