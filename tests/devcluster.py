"""`shardstate dev` as a child process for tests: starts it on port 0, reads the router address
it prints, and kills it and every child it started at teardown."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

START_TIMEOUT_S = 120.0  # generous: the machine is shared; never asserted


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it has exited all the same.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """`python -m shardstate ARGS...`, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "shardstate", *args], capture_output=True, text=True, timeout=timeout)


class Dev:
    def __init__(self, data: Path, *extra: str) -> None:
        self.data = data
        cmd = [sys.executable, "-m", "shardstate", "dev", "--port", "0", "--data-dir", str(data), *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.err_path = data.parent / f"{data.name}-dev.err"
        err = open(self.err_path, "ab")  # noqa: SIM115 - owned by the child
        self.popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        err.close()
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.router = self._wait_router()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self.lines.put(raw.decode())
        self.lines.put("")

    def _wait_router(self) -> str:
        while True:
            try:
                line = self.lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(f"dev printed no router address:\n{self.err_path.read_text()}") from None
            if not line:
                raise AssertionError(f"dev exited ({self.popen.wait()}):\n{self.err_path.read_text()}")
            if line.startswith("router: "):
                return line.split(" ", 1)[1].strip()

    def child_pids(self) -> list[int]:
        state = json.loads((self.data / "dev.json").read_text())
        return [n["pid"] for n in state["nodes"].values()]

    def terminate(self) -> int:
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(120)

    def kill(self) -> None:
        if self.popen.poll() is None:
            pids = self.child_pids() if (self.data / "dev.json").exists() else []
            self.popen.kill()
            self.popen.wait()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
