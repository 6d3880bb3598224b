"""Imports point one way: the client library (client/, `shardstate`) never imports the shard
server, the router, the CLI or the bench harness, nor their dependencies; `shardstate.common`
imports only itself and the generated code; the router and the shard do not import each other.
And `import shardstate` changes no process-wide setting."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_SIDE = ("shardstate.server", "shardstate.router", "shardstate.bench")
# Third-party modules only the server side (the `server` and `bench` extras) installs.
SERVER_DEPS = ("plyvel", "uvloop", "rich", "grpc_health", "grpc_reflection", "redis", "matplotlib",
               "prometheus_client", "cryptography")
# What `pip install shardstate` (no extras) installs, by distribution name.
CLIENT_REQUIREMENTS = {"grpcio", "grpcio-status", "protobuf", "uhashring"}


def module_of(path: Path) -> str:
    """client/aio.py -> shardstate.aio, server/cli/dev.py -> shardstate.server.cli.dev, ..."""
    rel = path.relative_to(ROOT)
    top = {"client": "shardstate", "server": "shardstate.server", "router": "shardstate.router",
           "benchmarks/harness": "shardstate.bench"}
    for d, pkg in top.items():
        if rel.is_relative_to(d):
            parts = [pkg, *rel.relative_to(d).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join(parts)
    raise ValueError(path)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (functions and TYPE_CHECKING blocks too),
    relative imports resolved."""
    mod = module_of(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from pkg import submodule`
    # importlib.import_module("...") with a literal name counts too
    out.update(re.findall(r"import_module\(\s*[\"']([\w.]+)[\"']", path.read_text()))
    return out


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def violations(paths: list[Path], banned: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    return [f"{p.relative_to(ROOT)} imports {name}" for p in paths for name in sorted(imports(p))
            if within(name, banned) and not within(name, allowed)]


# Modules of shardstate.common that only the servers' entry points use; the one optional
# server-side imports among them: the event loop runs on uvloop when it is installed; the
# metrics endpoint is prometheus-client's format.
NODE_ONLY = ("shardstate.common.eventloop", "shardstate.common.supervision", "shardstate.common.grpcserve",
             "shardstate.common.portfile", "shardstate.common.promexport")
OPTIONAL = {"client/common/eventloop.py imports uvloop", "client/common/promexport.py imports prometheus_client",
            "client/common/promexport.py imports prometheus_client.metrics_core"}


def test_the_client_library_imports_no_server_side_module_or_dependency() -> None:
    client = files("client")
    assert len(client) > 20  # the walk found the library
    bad = violations(client, SERVER_SIDE + SERVER_DEPS)
    assert [b for b in bad if b not in OPTIONAL] == []
    library = [p for p in client if not p.relative_to(ROOT).is_relative_to("client/common")]
    assert violations(library, NODE_ONLY) == []


def test_common_imports_only_itself_and_the_generated_code() -> None:
    common = files("client/common")
    bad = [f"{p.relative_to(ROOT)} imports {name}" for p in common for name in sorted(imports(p))
           if within(name, ("shardstate",)) and not within(name, ("shardstate.common", "shardstate.v1"))]
    assert bad == []
    assert [v for v in violations(common, SERVER_DEPS) if v not in OPTIONAL] == []


def test_the_router_and_the_shard_do_not_import_each_other() -> None:
    shard = [p for p in files("server") if not p.relative_to(ROOT).is_relative_to("server/cli")]
    assert violations(files("router"), ("shardstate.server", "shardstate.bench")) == []
    assert violations(shard, ("shardstate.router", "shardstate.bench")) == []


def test_the_checker_sees_a_server_import_in_a_client_module(tmp_path: Path) -> None:
    # The walk above must be able to fail: an import hidden in a function is found.
    probe = ROOT / "client" / "_probe_boundaries.py"
    probe.write_text("def f():\n    from shardstate.server.storage import engine\n    import plyvel\n")
    try:
        assert violations([probe], SERVER_SIDE + SERVER_DEPS) == [
            "client/_probe_boundaries.py imports plyvel",
            "client/_probe_boundaries.py imports shardstate.server.storage",
            "client/_probe_boundaries.py imports shardstate.server.storage.engine",
        ]
    finally:
        probe.unlink()


PROBE = """
import asyncio, json, os, signal, sys
env = dict(os.environ)
handlers = {s: signal.getsignal(s) for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)}
policy = type(asyncio.get_event_loop_policy())
import shardstate
after_import = sorted(m for m in sys.modules if m.startswith("shardstate"))
grpc_after_import = "grpc" in sys.modules
import grpc  # grpcio itself imports grpc_health/grpc_reflection when they are installed
grpc_modules = set(sys.modules)
from shardstate import AsyncClient, Client, Txn, ConflictError
Client("127.0.0.1:1").close()
print(json.dumps({
    "after_import": after_import,
    "grpc_after_import": grpc_after_import,
    "modules": sorted(set(sys.modules) - grpc_modules),
    "env_changed": sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)),
    "handlers_changed": sorted(signal.Signals(s).name for s, h in handlers.items() if signal.getsignal(s) != h),
    "policy_changed": type(asyncio.get_event_loop_policy()) is not policy,
}))
"""


def test_importing_and_using_the_client_loads_no_server_module_and_changes_no_process_setting() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["after_import"] == ["shardstate"] and got["grpc_after_import"] is False
    loaded = got["modules"]
    assert "shardstate.client" in loaded and "shardstate.aio" in loaded and "shardstate.v1.state_pb2" in loaded
    assert [m for m in loaded if within(m, SERVER_SIDE + SERVER_DEPS)] == []
    assert (got["env_changed"], got["handlers_changed"], got["policy_changed"]) == ([], [], False)


def test_the_package_without_extras_requires_only_what_the_client_needs() -> None:
    base, extras = set(), {}
    for req in importlib.metadata.requires("shardstate") or []:
        name = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower()
        m = re.search(r"extra\s*==\s*[\"'](\w[\w-]*)[\"']", req)
        if m:
            extras.setdefault(m.group(1), set()).add(name)
        else:
            base.add(name)
    assert base == CLIENT_REQUIREMENTS
    assert {"plyvel", "uvloop", "rich", "grpcio-health-checking", "grpcio-reflection"} <= extras["server"]
    assert {"redis", "matplotlib"} <= extras["bench"]


@pytest.mark.parametrize("cmd", [["--version"], ["dev", "--help"], ["bench", "--help"], ["admin", "--help"]])
def test_the_shardstate_command_runs_from_the_server_install(cmd: list[str]) -> None:
    from shardstate.server import launch

    out = subprocess.run(launch.shardstate_cmd(*cmd), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
