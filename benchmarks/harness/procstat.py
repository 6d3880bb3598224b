"""What /proc says about a process: CPU seconds, resident memory, children, command line.

Linux only (the benchmark's cost model and memory run read these); no psutil dependency.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds the process has used so far, plus those of its children that
    exited and were waited for (Redis's AOF-rewrite forks); running children are not included."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    # fields 14-17 of proc(5): utime, stime, cutime, cstime
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot (from /proc/stat), so a window's
    delta minus the benchmark's own processes is what everything else on the machine used."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    vals = [int(v) for v in first[1:9]]
    return (sum(vals) - vals[3] - vals[4]) / CLK_TCK


def rss_bytes(pid: int) -> int:
    return rss_parts(pid)["rss"]


def rss_parts(pid: int) -> dict[str, int]:
    """Resident bytes: all (VmRSS), anonymous (heaps, caches, arenas) and file-backed (mapped
    files: code, and LevelDB's memory-mapped table files, which the kernel can drop)."""
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}
    out = dict.fromkeys(keys.values(), 0)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name = line.split(maxsplit=1)[0] if line else ""
        if name in keys:
            out[keys[name]] = int(line.split()[1]) * 1024
    return out


def process_name(pid: int) -> str:
    """A short role name for a process of ours from its command line: router, s1 (a shard's
    primary), s1-r1 (its replica, named after its data dir), redis-server, etcd, or the binary."""
    argv = cmdline(pid)
    if "router" in argv:
        return "router"
    if "shard" in argv:
        if "--data-dir" in argv and argv.index("--data-dir") + 1 < len(argv):
            return Path(argv[argv.index("--data-dir") + 1]).name
        if "--id" in argv and argv.index("--id") + 1 < len(argv):
            return argv[argv.index("--id") + 1]
    return Path(argv[0]).name if argv else str(pid)


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (children first, then theirs)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop(0)
        kids: list[int] = []
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                try:
                    kids += [int(k) for k in (task / "children").read_text().split()]
                except OSError:
                    continue
        except OSError:
            continue
        for k in kids:
            if k not in out:
                out.append(k)
                todo.append(k)
    return out


def dir_bytes(path: str | Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory, OS: what a report must say about where figures came from."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "cores": os.cpu_count() or 0,
        "cpu_model": model,
        "memory_bytes": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }
