"""Writes a demoted node holds that its new primary never received: set aside, never dropped.

They go to `<data dir>/diverged-writes.jsonl` (one JSON object per change-log entry: revision,
namespace, session, ts_ms, events — values base64 as protobuf JSON does — plus the fork point
and the primary that replaced this one), fsynced before the node resyncs over them; the running
count lives in node meta `_|diverged` and shows as Status.diverged_writes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from google.protobuf import json_format

from shardstate.errors import HistoryCompactedError

from ..storage.engine import Engine
from ..storage.revision import wall_ms

log = logging.getLogger("shardstate.replication.audit")

FILE_NAME = "diverged-writes.jsonl"
COUNT_META = "diverged"
PAGE = 1000


def path(engine: Engine) -> Path:
    return Path(engine.config.data_dir) / FILE_NAME


def count(engine: Engine) -> int:
    raw = engine.node_meta(COUNT_META)
    return int(raw) if raw else 0


def set_aside(engine: Engine, fork: int, new_primary: str, epoch: int) -> int:
    """Append every change-log entry above `fork` to the audit file; returns how many client
    writes it held (maintenance entries without a session are not counted nor written)."""
    applied = engine.revision()
    start = fork + 1
    lines: list[str] = []
    now = wall_ms()
    oldest = engine.oldest_revision()
    if start < oldest:
        # The change log no longer holds them: say so, loudly, in the file itself.
        lines.append(json.dumps({
            "warning": f"change-log entries {start}..{oldest - 1} were already trimmed; writes among them cannot be listed",
            "fork_revision": fork, "new_primary": new_primary, "epoch": epoch, "set_aside_at_ms": now,
        }))
        log.error("diverged writes partly trimmed", extra={"fields": {"fork": fork, "oldest": oldest}})
        start = oldest
    n = 0
    while start <= applied:
        try:
            batch = engine.changes_since(start, PAGE)
        except HistoryCompactedError:
            break
        if not batch:
            break
        for e in batch:
            if e.revision > applied:
                break
            if not e.session_id:
                continue
            n += 1
            lines.append(json.dumps({
                "revision": e.revision, "namespace": e.namespace, "session": e.session_id,
                "ts_ms": e.ts_ms,
                "events": [json_format.MessageToDict(ev) for ev in e.events],
                "fork_revision": fork, "new_primary": new_primary, "epoch": epoch, "set_aside_at_ms": now,
            }))
        start = batch[-1].revision + 1
    if lines:
        p = path(engine)
        with open(p, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
    total = count(engine) + n
    engine.set_node_meta(COUNT_META, str(total).encode())
    log.warning("set aside diverged writes", extra={"fields": {
        "writes": n, "fork_revision": fork, "applied": applied, "file": str(path(engine)), "total": total,
    }})
    return n
