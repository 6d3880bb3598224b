"""`shardstate auth new-token|hash-token|check`: make token-file entries and check a token file;
the `--token`/`--token-file` options every command that calls a cluster takes live in
shardstate.common.authconfig (the bench takes them too).

A token is printed once, by new-token, and never written anywhere by it: the file holds
only its sha256 (docs/design.md §15).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shardstate.common import auth
from shardstate.common.errors import InvalidArgumentError


def append_entry(path: Path, entry: str) -> None:
    """Add `entry` to the token file at `path` atomically (a server reloading it never sees
    half of it), owner-readable only."""
    old = path.read_text() if path.exists() else ""
    text = old + ("\n" if old and not old.endswith("\n\n") else "") + entry
    auth.parse(text, str(path))  # never write a file the servers would refuse
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shardstate auth", description="Tokens for a cluster with --auth-file.")
    sub = p.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new-token", help="make a token; print it and its token-file entry")
    new.add_argument("--role", required=True, choices=sorted(auth.ROLES))
    new.add_argument("--namespace", "-n", action="append", default=[],
                     help="a namespace it grants: NAME, or PREFIX* (repeat for more)")
    new.add_argument("--name", default="", help="a label for the entry")
    new.add_argument("--append", metavar="FILE", default=None,
                     help="add the entry to this token file (servers pick it up within a second or two)")
    hashp = sub.add_parser("hash-token", help="the sha256 of a token read from stdin (or --token)")
    hashp.add_argument("--token", default=None)
    check = sub.add_parser("check", help="parse a token file and say what it holds")
    check.add_argument("file")
    a = p.parse_args(argv)
    try:
        if a.command == "new-token":
            token = auth.new_token()
            entry = auth.token_entry(auth.hash_token(token), a.role, a.namespace, a.name)
            if a.append:
                append_entry(Path(a.append), entry)
                print(f"added to {a.append}:\n{entry}", file=sys.stderr)
            else:
                print(entry, file=sys.stderr)
            print(token)
            return 0
        if a.command == "hash-token":
            token = a.token if a.token is not None else sys.stdin.readline().strip()
            if not token:
                print("error: no token given (stdin was empty)", file=sys.stderr)
                return 2
            print(auth.hash_token(token))
            return 0
        table = auth.parse(Path(a.file).read_text(), a.file)
        print(f"{a.file}: {len(table.grants)} tokens, {len(table.limits)} namespaces with limits")
        return 0
    except InvalidArgumentError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
