"""The LangGraph examples run as written against a real `shardstate dev` cluster: the resume
example killed with SIGKILL in the middle of its graph and resumed by a new process."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("langgraph.graph")

from tests.langgraph_support import router
from tests.stubs import uid

__all__ = ["router"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS = [f"step{n}" for n in range(1, 7)]


def start(*args: str) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            lines.put(line.rstrip("\n"))
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    return p, lines


def read_until(lines: queue.Queue[str], want: str, seen: list[str]) -> None:
    while True:
        line = lines.get(timeout=120)
        assert line, f"the example ended before printing {want!r}: {seen}"
        seen.append(line)
        if line == want:
            return


def test_resume_example_survives_sigkill_mid_graph(router: str) -> None:
    thread = uid("resume")
    script = str(EXAMPLES / "langgraph_resume.py")
    first, lines = start(script, "--router", router, "--thread", thread, "--step-seconds", "0.8")
    seen: list[str] = []
    try:
        read_until(lines, "step 3 done", seen)
        first.send_signal(signal.SIGKILL)  # in the middle of step 4
        assert first.wait(60) == -signal.SIGKILL
    finally:
        first.kill()
    assert seen[0] == "starting"
    assert not any(s.startswith("final") for s in seen)

    second = subprocess.run([sys.executable, script, "--router", router, "--thread", thread,
                             "--step-seconds", "0.1"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    out = second.stdout.splitlines()
    assert out[0].startswith("resuming after step"), out
    resumed_after = int(out[0].split("after step")[1].split(",")[0])
    assert 3 <= resumed_after <= 4, out  # step 3's checkpoint was stored before it printed
    ran = [line.split()[1] for line in out if line.endswith(" done")]
    assert ran == [str(n) for n in range(resumed_after + 1, 7)]  # nothing before it again
    assert out[-1] == f"final: {STEPS}"  # every step exactly once in the state

    third = subprocess.run([sys.executable, script, "--router", router, "--thread", thread],
                           capture_output=True, text=True, timeout=120)
    assert third.stdout.strip() == f"already finished: {STEPS}"


def test_quickstart_example_runs_as_written(router: str) -> None:
    """examples/langgraph_quickstart.py is the README's LangGraph example: only the address
    changes (the README says 127.0.0.1:7400)."""
    code = (EXAMPLES / "langgraph_quickstart.py").read_text().replace("127.0.0.1:7400", router)
    assert code.count(router) == 1
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["['hi', 'echo: hi', 'again', 'echo: again']",
                                       "{'text': 'again'}"]
