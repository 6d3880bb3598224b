"""Port files: how a shard or router started on port 0 tells its starter where it listens.

The process writes the bound port, as decimal text and a newline, once it serves; tmp + rename
in the same directory, so a reader sees no file or the whole number. shardstate.server.launch
reads them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write(path: str | Path, port: int) -> None:
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: str | Path) -> int | None:
    """The port in `path`, or None while the file is missing (not written yet)."""
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None
