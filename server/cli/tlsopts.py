"""--tls-ca/--tls-cert/--tls-key (or SHARDSTATE_TLS_*) on the commands that call a cluster
(`admin`, `get`, `put`, `ls`): checked, then made this process's setting for its channels."""

from __future__ import annotations

import argparse
import sys

from shardstate.common import config, tls
from shardstate.common.errors import InvalidArgumentError
from shardstate.common.tlsconfig import TlsFlags


def add(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, TlsFlags)


def use(prog: str, ns: argparse.Namespace) -> bool:
    """Take the flags in `ns` for this process's channels; False (after saying why on stderr)
    when the files cannot be used."""
    files = config.from_args(TlsFlags, ns).tls_files()
    try:
        if files is not None:
            files.validate()
    except InvalidArgumentError as e:
        print(f"shardstate {prog}: {e.message}", file=sys.stderr)
        return False
    tls.use(files)
    return True
