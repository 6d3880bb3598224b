"""The `shardstate` command's own edges (issue 13, defect 9): `--version`, bare `shardstate`
(usage, exit 2), `--help` listing only commands that work, and a reader that goes away
(`shardstate ls --plain | head`) ending the command quietly, without a traceback.
"""

from __future__ import annotations

import subprocess
from importlib.metadata import version

from shardstate import Client
from shardstate.server import launch
from shardstate.server.cli import COMMANDS
from shardstate.server.cli.admin import COMMANDS as ADMIN_COMMANDS
from tests.procs import Procs

T = 60.0


def shardstate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(launch.shardstate_cmd(*args), capture_output=True, text=True, timeout=T)


def test_version_prints_the_package_version() -> None:
    for flag in ("--version", "-V"):
        r = shardstate(flag)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"shardstate {version('shardstate')}"


def test_bare_command_prints_usage_and_exits_2() -> None:
    r = shardstate()
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith("usage: shardstate COMMAND")


def test_help_lists_only_commands_that_exist() -> None:
    r = shardstate("--help")
    assert r.returncode == 0
    assert r.stdout.startswith("usage: shardstate COMMAND")
    for name in COMMANDS:
        assert f"  {name} " in r.stdout
    # The admin line names admin subcommands; each must exist.
    admin_line = next(line for line in r.stdout.splitlines() if line.strip().startswith("admin "))
    listed = [w.strip() for w in admin_line.split(":", 1)[1].split(",")]
    assert listed and all(w in ADMIN_COMMANDS for w in listed), (listed, sorted(ADMIN_COMMANDS))
    r = shardstate("admin", "--help")
    assert r.returncode == 0
    assert "{" + ",".join(ADMIN_COMMANDS) + "}" in r.stdout


def test_ls_into_a_closed_pipe_exits_quietly(procs: Procs) -> None:
    shard = procs.shard("s1")
    pad = "x" * 100  # 1 500 sessions of ~110 bytes: well over a pipe's 64 KiB buffer
    with Client(shard.address, timeout=T) as c:
        for start in range(0, 1500, 500):
            b = c.batch()
            for i in range(start, start + 500):
                b.put(f"{pad}-{i:05d}", "k", b"v")
            b.execute()
    p = subprocess.Popen(launch.shardstate_cmd("ls", "--plain", "--router", shard.address),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    first = p.stdout.readline()
    p.stdout.close()  # what `| head -1` does after its line
    err = p.stderr.read().decode()
    code = p.wait(T)
    assert first.decode().startswith(pad)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert err == ""
    assert code == 141  # 128 + SIGPIPE, as a shell reports for a Unix tool ended by it
