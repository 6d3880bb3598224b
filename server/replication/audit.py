"""Writes a demoted node holds that its new primary never received: set aside, never dropped,
and reconciled against what the new primary did since.

They go to `<data dir>/diverged-writes.jsonl`, fsynced before the node resyncs over them; the
running count lives in node meta `_|diverged` and shows as Status.diverged_writes. Two kinds of
line:

- one per diverged change-log entry (`"kind": "diverged"`): revision, namespace, session, ts_ms,
  events (values base64 as protobuf JSON does), the fork point, the primary that replaced this
  one, and a summary: `seqs` (each appended stream/seq), `keys` (each written key with its
  version, `counter` when the value is an ASCII decimal integer, `deleted` for a delete) and
  `request_ids`;
- once the snapshot from the new primary is installed, one per diverged entry
  (`"kind": "reconciled"`, same revision and session) saying what the new primary holds now:
  per seq `reused` (the new primary handed that seq out again: its stream's next seq is above
  it), `same_data` (the entry now at that seq has the same bytes) and the stream's `next_seq`
  (seqs from there on will be handed out again by the next appends); per key the new primary's
  `version` and `counter`/`value_b64`, and `same_value`; `retried` when the new primary holds
  the write's request_id (a client retry re-applied it there). A last line (`"kind":
  "reconcile_summary"`) totals them.

Asynchronous replication cannot avoid the reuse: a promoted replica does not know how many seqs
the old primary handed out after what it received (docs/design.md §2: seqs are per-stream consecutive,
so it cannot skip an unknown number), and a counter's next value is computed from the value it
holds.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from shardstate.common.errors import HistoryCompactedError, ShardstateError
from shardstate.v1 import replication_pb2, state_pb2, types_pb2

from ..storage import encoding as enc
from ..storage.engine import Engine
from ..storage.revision import wall_ms
from ..storage.values import unpack_record

log = logging.getLogger("shardstate.replication.audit")

FILE_NAME = "diverged-writes.jsonl"
COUNT_META = "diverged"
# Byte offset in the audit file of the first diverged line not reconciled yet ("" = none).
RECONCILE_META = "reconcile_from"
PAGE = 1000


def path(engine: Engine) -> Path:
    return Path(engine.config.data_dir) / FILE_NAME


def count(engine: Engine) -> int:
    raw = engine.node_meta(COUNT_META)
    return int(raw) if raw else 0


def set_aside(engine: Engine, fork: int, new_primary: str, epoch: int) -> int:
    """Append every change-log entry above `fork` to the audit file; returns how many client
    writes it held. An entry of raw ops (a rebalance's copy, docs/design.md §6.4) gets a line
    per session it wrote into; other maintenance entries (only deletes, or no session's keys:
    clean-up, expired idempotency records) are not counted nor written."""
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
                for (ns, sid), got in raw_summary(e).items():
                    n += 1
                    lines.append(json.dumps({
                        "revision": e.revision, "namespace": ns, "session": sid, "ts_ms": e.ts_ms,
                        "events": [], "raw": True, "fork_revision": fork, "new_primary": new_primary,
                        "epoch": epoch, "set_aside_at_ms": now, "kind": "diverged", **got,
                    }))
                continue
            n += 1
            lines.append(json.dumps({
                "revision": e.revision, "namespace": e.namespace, "session": e.session_id,
                "ts_ms": e.ts_ms,
                "events": [json_format.MessageToDict(ev) for ev in e.events],
                "fork_revision": fork, "new_primary": new_primary, "epoch": epoch, "set_aside_at_ms": now,
                "kind": "diverged", **summary(e),
            }))
        start = batch[-1].revision + 1
    if lines:
        p = path(engine)
        if not engine.node_meta(RECONCILE_META):
            engine.set_node_meta(RECONCILE_META, str(p.stat().st_size if p.exists() else 0).encode())
        _write(p, lines)
    total = count(engine) + n
    engine.set_node_meta(COUNT_META, str(total).encode())
    log.warning("set aside diverged writes", extra={"fields": {
        "writes": n, "fork_revision": fork, "applied": applied, "file": str(path(engine)), "total": total,
    }})
    return n


def _write(p: Path, lines: list[str]) -> None:
    with open(p, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _counter(value: bytes) -> int | None:
    """The value as a counter (Increment stores ASCII decimal), else None."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text or len(text) > 20 or not text.lstrip("-").isdigit():
        return None
    return int(text)


def summary(e: replication_pb2.ChangeEntry) -> dict[str, Any]:
    """What a change-log entry handed out: appended seqs, written keys, request ids."""
    seqs: list[dict[str, Any]] = []
    keys: list[dict[str, Any]] = []
    for ev in e.events:
        if ev.type == types_pb2.APPEND:
            seqs.extend({"stream": ev.stream, "seq": x.seq} for x in ev.entries)
        elif ev.type == types_pb2.PUT:
            k: dict[str, Any] = {"key": ev.record.key, "version": ev.record.version}
            c = _counter(ev.record.value)
            if c is not None:
                k["counter"] = c
            keys.append(k)
        elif ev.type == types_pb2.DELETE:
            keys.append({"key": ev.record.key, "version": ev.record.version, "deleted": True})
    rids = []
    for op in e.ops:
        if op.key[:1] == enc.IDEMPOTENCY and not op.delete:
            try:
                rids.append(enc.decode(op.key, "bbb")[2].decode(errors="replace"))  # type: ignore[union-attr]
            except ValueError:
                pass
    return {"seqs": seqs, "keys": keys, "request_ids": rids}


def raw_summary(e: replication_pb2.ChangeEntry) -> dict[tuple[str, str], dict[str, Any]]:
    """Per session an entry of raw ops put something into: its seqs, keys (as `summary`) and
    request ids. Sessions it only deleted from are left out (a clean-up of moved data)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    schema = {enc.DATA: "bbb", enc.LOG: "bbbq", enc.IDEMPOTENCY: "bbb"}
    for op in e.ops:
        tag = op.key[:1]
        if op.delete or tag not in schema:
            continue
        try:
            ns, sid, name, *seq = enc.decode(op.key, schema[tag])
            rec = unpack_record(op.value) if tag == enc.DATA else None
        except (ValueError, struct.error):
            continue
        text = bytes(name).decode(errors="replace")  # type: ignore[arg-type]
        got = out.setdefault((bytes(ns).decode(errors="replace"), bytes(sid).decode(errors="replace")),  # type: ignore[arg-type]
                             {"seqs": [], "keys": [], "request_ids": []})
        if rec is not None:
            k: dict[str, Any] = {"key": text, "version": rec.version}
            c = _counter(rec.value)
            if c is not None:
                k["counter"] = c
            got["keys"].append(k)
        elif seq:
            got["seqs"].append({"stream": text, "seq": seq[0]})
        else:
            got["request_ids"].append(text)
    return out


def _read(fn: Any, req: Any) -> Any:
    try:
        return fn(req)
    except ShardstateError:
        return None  # the session or stream does not exist (any more) on the new primary


def reconcile_one(engine: Engine, d: dict[str, Any]) -> dict[str, Any]:
    """Compares one diverged line with this node's data (now the new primary's)."""
    ns, sid = d.get("namespace", ""), d["session"]
    out: dict[str, Any] = {"kind": "reconciled", "revision": d["revision"], "namespace": ns,
                           "session": sid, "new_primary": d.get("new_primary", ""),
                           "at_revision": engine.revision(), "seqs": [], "keys": []}
    info = _read(engine.get_session, state_pb2.GetSessionRequest(namespace=ns, session_id=sid))
    streams = {s.name: s for s in info.session.streams} if info is not None else {}
    for x in d.get("seqs", []):
        s = streams.get(x["stream"])
        nxt = s.next_seq if s is not None else 1
        got = _read(engine.read_log, state_pb2.ReadLogRequest(
            namespace=ns, session_id=sid, stream=x["stream"], from_seq=x["seq"], to_seq=x["seq"], limit=1))
        now = next((en for en in got.entries if en.seq == x["seq"]), None) if got is not None else None
        mine = next((en for ev in d.get("events", []) for en in ev.get("entries", [])
                     if ev.get("stream") == x["stream"] and int(en.get("seq", 0)) == x["seq"]), None)
        same = None
        if now is not None and mine is not None:
            same = base64.b64decode(mine.get("data", "")) == now.data
        out["seqs"].append({"stream": x["stream"], "seq": x["seq"], "reused": nxt > x["seq"],
                            "same_data": same, "next_seq": nxt})
    for k in d.get("keys", []):
        g = _read(engine.get, state_pb2.GetRequest(namespace=ns, session_id=sid, key=k["key"]))
        r: dict[str, Any] = {"key": k["key"], "version": 0}
        if g is not None and g.found:
            r["version"] = g.record.version
            c = _counter(g.record.value)
            if c is not None:
                r["counter"] = c
            else:
                r["value_b64"] = base64.b64encode(g.record.value).decode()
        if "counter" in k:
            r["lost_counter"] = k["counter"]
        r["same_value"] = ("counter" in k and r.get("counter") == k["counter"]) or (
            k.get("deleted", False) and not r["version"])
        out["keys"].append(r)
    try:
        nsb, sidb = (ns or "default").encode(), sid.encode()
        out["retried"] = any(engine.store.get(enc.idempotency_key(nsb, sidb, rid.encode())) is not None
                             for rid in d.get("request_ids", []))
    except ValueError:
        out["retried"] = False
    return out


def reconcile(engine: Engine) -> dict[str, int] | None:
    """After the new primary's snapshot is installed: one `reconciled` line per diverged line
    not reconciled yet, then a summary line. Returns the totals (None: nothing pending)."""
    raw = engine.node_meta(RECONCILE_META)
    if not raw:
        return None
    p = path(engine)
    offset = int(raw)
    lines: list[str] = []
    tot = {"writes": 0, "seqs": 0, "seqs_reused": 0, "seqs_reused_other_data": 0, "keys": 0,
           "counters_reused": 0, "retried": 0}
    if p.exists():
        with open(p, encoding="utf-8") as f:
            f.seek(offset)
            for text in f:
                d = json.loads(text)
                if d.get("kind") != "diverged":
                    continue
                r = reconcile_one(engine, d)
                lines.append(json.dumps(r))
                tot["writes"] += 1
                tot["seqs"] += len(r["seqs"])
                tot["seqs_reused"] += sum(1 for x in r["seqs"] if x["reused"])
                tot["seqs_reused_other_data"] += sum(1 for x in r["seqs"] if x["reused"] and not x["same_data"])
                tot["keys"] += len(r["keys"])
                tot["counters_reused"] += sum(
                    1 for x in r["keys"] if "lost_counter" in x and x.get("counter", 0) >= x["lost_counter"] > 0)
                tot["retried"] += int(r["retried"])
    lines.append(json.dumps({"kind": "reconcile_summary", "at_revision": engine.revision(),
                             "reconciled_at_ms": wall_ms(), **tot}))
    _write(p, lines)
    engine.set_node_meta(RECONCILE_META, b"")
    log.warning("reconciled diverged writes with the new primary", extra={"fields": tot})
    return tot
