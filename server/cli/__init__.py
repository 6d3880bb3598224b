"""The `shardstate` command: one entry point, one module per subcommand, imported lazily.

This is the one composition root that reaches into shardstate.server, shardstate.router and
shardstate.bench, and only when their subcommand runs. It is the entry point of every
shardstate process (`shardstate dev` starts its shards and routers as `shardstate shard` and
`shardstate router`), so it chooses the gRPC transport (shardstate.common.transport.tune)
before any subcommand loads grpc.
"""

from __future__ import annotations

import importlib
import os
import sys

from shardstate.common import transport

# subcommand -> (module, function taking argv); each module owns its own argparse.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "dev": ("shardstate.server.cli.dev", "main", "start a whole local cluster (shards, replicas, a router)"),
    "shard": ("shardstate.server.main", "main", "run one shard server (primary or replica)"),
    "router": ("shardstate.router.main", "main", "run one router"),
    "admin": ("shardstate.server.cli.admin", "main", "cluster admin: status, map, promote, remove-node, backup, restore"),
    "auth": ("shardstate.server.cli.auth", "main", "tokens: new-token, hash-token, check a token file"),
    "bench": ("shardstate.bench.cli", "main", "load a cluster and print throughput and latency"),
    "get": ("shardstate.server.cli.kv", "get_main", "print one key of a session"),
    "put": ("shardstate.server.cli.kv", "put_main", "write one key of a session"),
    "ls": ("shardstate.server.cli.kv", "ls_main", "list sessions, or the keys of one session"),
    "health": ("shardstate.server.cli.health", "main", "exit 0 when a node answers grpc.health.v1 SERVING (a probe)"),
}


# a third-party module a subcommand needs -> the extra that installs it
EXTRAS = {"plyvel": "server", "uvloop": "server", "rich": "server", "grpc_health": "server",
          "grpc_reflection": "server", "cryptography": "server", "redis": "bench", "matplotlib": "bench"}


def usage() -> str:
    lines = ["usage: shardstate COMMAND [ARGS...]  |  shardstate --version", "", "commands:"]
    lines += [f"  {name:<8} {help}" for name, (_, _, help) in COMMANDS.items()]
    lines += ["", "`shardstate COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("shardstate")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # The reader went away (`shardstate ls | head`): stop quietly, as Unix tools do when
        # SIGPIPE ends them; stdout goes to /dev/null so the exit-time flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13  # 128 + SIGPIPE, what a shell reports for a tool SIGPIPE ended


def _main(args: list[str]) -> int:
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version", "version"):
        print(f"shardstate {version()}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"shardstate: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    transport.tune()
    try:
        result = getattr(importlib.import_module(module), func)(rest)
    except ModuleNotFoundError as e:  # at import, or a lazy import inside the command
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"shardstate: command {name!r} needs {e.name}, which is not installed: "
              f"pip install 'shardstate[{extra}]'", file=sys.stderr)
        return 2
    return int(result or 0)
