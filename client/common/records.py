"""Plain Python views of what the server returns: records, log entries, sessions, changes.

They are what the client library hands to callers instead of protobuf messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from shardstate.v1 import types_pb2


@dataclass(frozen=True, slots=True, init=False)
class Record:
    key: str
    value: bytes
    version: int
    create_version: int = 0
    expires_at: int = 0  # ms since the epoch; 0 = never
    updated_at: int = 0

    def __init__(self, key: str, value: bytes, version: int, create_version: int = 0,
                 expires_at: int = 0, updated_at: int = 0) -> None:
        # The slots' own setters: a frozen dataclass's __init__ goes through
        # object.__setattr__ per field, at nearly twice the cost (one Record per write).
        _set_key(self, key)
        _set_value(self, value)
        _set_version(self, version)
        _set_create_version(self, create_version)
        _set_expires_at(self, expires_at)
        _set_updated_at(self, updated_at)

    @classmethod
    def from_pb(cls, r: types_pb2.Record) -> Record:
        return cls(r.key, r.value, r.version, r.create_version, r.expires_at_ms, r.updated_at_ms)


_set_key, _set_value, _set_version, _set_create_version, _set_expires_at, _set_updated_at = (
    Record.__dict__[f.name].__set__ for f in fields(Record)
)


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    data: bytes
    appended_at: int = 0

    @classmethod
    def from_pb(cls, e: types_pb2.LogEntry) -> Entry:
        return cls(e.seq, e.data, e.appended_at_ms)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    namespace: str
    session_id: str
    created_at: int
    updated_at: int
    expires_at: int
    key_count: int
    bytes: int
    max_version: int
    streams: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> first, last, count

    @classmethod
    def from_pb(cls, s: types_pb2.SessionInfo) -> SessionInfo:
        return cls(
            s.namespace, s.session_id, s.created_at_ms, s.updated_at_ms, s.expires_at_ms,
            s.key_count, s.bytes, s.max_version,
            {st.name: (st.first_seq, st.last_seq, st.count) for st in s.streams},
        )


@dataclass(frozen=True, slots=True)
class Change:
    """One change of a session, as `watch()` yields it. `type` is the event name in lower case:
    put, delete, append, trim, pop, touch, session_delete, session_expire, key_expire, and
    progress (only with `watch(progress=True)`: everything up to `revision` has been seen)."""

    type: str
    revision: int
    key: str = ""
    value: bytes = b""
    version: int = 0
    stream: str = ""
    entries: tuple[Entry, ...] = ()
    seq: int = 0
    expires_at: int = 0
    record: Record | None = None

    @classmethod
    def from_pb(cls, ev: types_pb2.Event) -> Change:
        name = types_pb2.EventType.Name(ev.type).lower() if ev.type else "unspecified"
        rec = Record.from_pb(ev.record) if ev.HasField("record") else None
        return cls(
            name, ev.revision, ev.record.key, ev.record.value, ev.record.version, ev.stream,
            tuple(Entry.from_pb(e) for e in ev.entries), ev.seq, ev.expires_at_ms, rec,
        )
