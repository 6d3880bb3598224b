"""The README's examples run as written against a real `shardstate dev` cluster.

Only the address changes: the README says 127.0.0.1:7400, the test cluster runs on port 0."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.devcluster import Dev

README = Path(__file__).resolve().parent.parent / "README.md"
ADDRESS = "127.0.0.1:7400"


def python_blocks(section: str | None = None) -> list[str]:
    text = README.read_text()
    if section is not None:
        start = text.index(section)
        nxt = text.find("\n## ", start + len(section))
        text = text[start: nxt if nxt != -1 else None]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run(code: str, router: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code.replace(ADDRESS, router)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"example failed:\n{code}\n--- stderr:\n{proc.stderr}"
    return proc.stdout


def test_readme_examples_run_against_a_dev_cluster(tmp_path: Path, devs: list[Dev]) -> None:
    dev = Dev(tmp_path / "data", "--replicas", "1")
    devs.append(dev)

    quick = python_blocks("## Quick start")
    assert len(quick) == 1
    out = run(quick[0], dev.router).splitlines()
    # put, CAS, a lost CAS, update, incr, append, read back
    assert out == ["someone else wrote b'step-2'", "1", "[b'hello', b'world']"]

    # The API fragments share one session; blocks that block forever (watch) are left out.
    fragments = [b for b in python_blocks("## The Python API") if "watch(" not in b]
    prelude = f'from shardstate import Client\nc = Client("{ADDRESS}")\ns = c.session("agent-42")'
    check = 'print("ok", s.get("steps").value, len(s.read("messages")))'
    script = "\n".join([prelude, *fragments, check])
    # steps: 1 from the quick start; messages: 2 + 2 appended, 1 popped
    assert run(script, dev.router).splitlines()[-1] == "ok b'1' 3"

    stub = python_blocks("## Without the library")
    assert len(stub) == 1
    assert run(stub[0], dev.router).strip().startswith("True ")


def test_the_framework_examples_in_the_readme_are_the_example_files() -> None:
    # tests/test_integration_*.py run examples/*.py as written; the README shows them whole.
    examples = README.parent / "examples"
    for section, name in (("### LangGraph", "langgraph_quickstart.py"),
                          ("### OpenAI Agents SDK", "openai_agents_session.py"),
                          ("### Google ADK", "adk_session.py")):
        blocks = python_blocks(section)
        text = (examples / name).read_text()
        body = re.sub(r'\A""".*?"""\n\n', "", text, flags=re.S)
        assert blocks and blocks[0] == body, f"README {section} differs from examples/{name}"
