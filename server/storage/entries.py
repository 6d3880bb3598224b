"""Change-log entries (`~|revision` -> shardstate.v1.ChangeEntry): encoding one from a
write's ops and events, and the logical view (events) readers get back.

A write's entry is encoded by hand (no nested RawOp/Event/Record objects): building those
protobuf messages cost more than the rest of the write's bookkeeping. The bytes parse as the
ChangeEntry they replace.

A PUT's value is stored once: when the event's record value equals the record an op of the
same entry writes (the key's final write in the entry), the event leaves it out and
`event_value_op` points at that op. `events_of()` fills it back, so Watch and every other
reader see the events as they were; entries written before this (values inline, no
`event_value_op`) read the same way.
"""

from __future__ import annotations

from typing import NamedTuple

from shardstate.common.protowire import varint
from shardstate.v1 import replication_pb2, types_pb2

from .commit import Op
from .values import RECORD_HEADER

_BYTE = [bytes((i,)) for i in range(128)]
_PUT_EVENT = b"\x08\x01\x10"  # Event.type = PUT, then the tag of Event.revision


def uvarint(n: int) -> bytes:
    """protowire.varint, faster for what an entry holds: lengths (< 16 KiB), and revisions and
    millisecond times (> 2^35), whose bits above the lowest 35 change every ~30 s at most
    (their varint bytes are kept in _HIGH)."""
    if n < 0x80:
        return _BYTE[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if n < 0x800000000:
        return varint(n)
    high = _HIGH.get(n >> 35)
    if high is None:
        if len(_HIGH) >= 64:
            _HIGH.clear()
        high = _HIGH[n >> 35] = varint(n >> 35)
    return bytes((
        n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21 & 0x7F | 0x80,
        n >> 28 & 0x7F | 0x80,
    )) + high


_HIGH: dict[int, bytes] = {}


class PutEvent(NamedTuple):
    """A PUT event not built as a protobuf yet: `packed` is the record bytes put at `dkey`."""

    keyb: bytes
    dkey: bytes
    packed: bytes
    version: int
    create_version: int
    expires_at: int
    updated_at: int
    value: bytes


def _put_event(e: PutEvent, revision: int, rv: bytes, with_value: bool) -> bytes:
    """Event{type=PUT, revision, record{key, [value], version, create_version, expires, updated}}
    (rv: the varint of the entry's revision, usually the record's version too)."""
    keyb = e.keyb
    rec = [b"\x0a", uvarint(len(keyb)), keyb]
    if with_value and e.value:
        rec += (b"\x12", uvarint(len(e.value)), e.value)
    rec += (b"\x18", rv if e.version == revision else uvarint(e.version))
    rec += (b"\x20", rv if e.create_version == revision else uvarint(e.create_version))
    if e.expires_at:
        rec += (b"\x28", uvarint(e.expires_at))
    rec += (b"\x30", uvarint(e.updated_at))
    body = b"".join(rec)
    return b"".join((_PUT_EVENT, rv, b"\x1a", uvarint(len(body)), body))


def encode(
    revision: int, namespace: bytes, session_id: bytes, ts_ms: int, ops: list[Op],
    events: list[types_pb2.Event | PutEvent], pending: dict[bytes, bytes | None] | None = None,
) -> bytes:
    """The serialized ChangeEntry. `pending` (key -> what this write stores there): a PutEvent
    whose record is still what `pending` holds at its key leaves its value to that op.
    namespace / session_id: UTF-8, empty for a write not tied to a session."""
    rv = uvarint(revision)
    out = [b"\x08", rv]
    if namespace:
        out += (b"\x12", uvarint(len(namespace)), namespace)
    if session_id:
        out += (b"\x1a", uvarint(len(session_id)), session_id)
    out += (b"\x20", uvarint(ts_ms))
    small = _BYTE  # most lengths here are < 128: index it inline rather than call uvarint
    for k, v in ops:
        lk = len(k)
        sk = small[lk] if lk < 128 else uvarint(lk)
        if v is None:
            n = 3 + len(sk) + lk
            out += (b"\x2a", small[n] if n < 128 else uvarint(n), b"\x0a", sk, k, b"\x18\x01")
        elif v:
            lv = len(v)
            sv = small[lv] if lv < 128 else uvarint(lv)
            n = 2 + len(sk) + lk + len(sv) + lv
            out += (b"\x2a", small[n] if n < 128 else uvarint(n), b"\x0a", sk, k, b"\x12", sv, v)
        else:
            n = 1 + len(sk) + lk
            out += (b"\x2a", small[n] if n < 128 else uvarint(n), b"\x0a", sk, k)
    refs: list[int] = []
    for ev in events:
        ref = 0
        if isinstance(ev, PutEvent):
            if pending is not None and pending.get(ev.dkey) is ev.packed:
                ref = ops.index((ev.dkey, ev.packed)) + 1
            body = _put_event(ev, revision, rv, with_value=not ref)
        else:
            body = ev.SerializeToString()
        refs.append(ref)
        out += (b"\x32", uvarint(len(body)), body)
    if any(refs):
        packed = b"".join(uvarint(r) for r in refs)
        out += (b"\x3a", uvarint(len(packed)), packed)
    return b"".join(out)


def events_of(entry: replication_pb2.ChangeEntry) -> list[types_pb2.Event]:
    """The entry's events with every record value in place (filled from the ops that hold them)."""
    events = entry.events
    refs = entry.event_value_op
    if refs:
        ops = entry.ops
        for ev, ref in zip(events, refs, strict=False):
            if ref:
                ev.record.value = ops[ref - 1].value[RECORD_HEADER:]
    return list(events)


def parse(raw: bytes) -> replication_pb2.ChangeEntry:
    """A stored entry with its events complete (and event_value_op cleared)."""
    entry = replication_pb2.ChangeEntry.FromString(raw)
    if entry.event_value_op:
        events_of(entry)
        del entry.event_value_op[:]
    return entry
