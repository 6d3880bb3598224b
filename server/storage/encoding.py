"""Order-preserving, escape-safe encoding of tuple keys for LevelDB, and the key families.

Every key of the shard's LevelDB is a family tag byte followed by typed components:

    key        = tag component*
    tag        = one byte, the family (table below)
    component  = bytes-comp / u64-comp
    bytes-comp = escaped 0x00 0x01          ; any bytes, terminated
    escaped    = *( 0x00 0xFF / byte other than 0x00 )   ; 0x00 is written as 0x00 0xFF
    u64-comp   = 8 bytes, big-endian        ; fixed width, no terminator

Properties (tested with hypothesis in tests/test_encoding.py), for components of any bytes,
0x00 and 0xFF included:
  - order: comparing encoded keys byte-wise compares the tuples component by component
    (bytes lexicographically, u64 numerically); a shorter bytes component sorts before any
    extension of it because its terminator 0x00 0x01 sorts below 0x00 0xFF and any byte > 0x00;
  - prefix: the encoding of a tuple's first n components is a byte prefix of the whole key,
    and `escape(p)` (no terminator) is a byte prefix of the encoded component c exactly when
    p is a prefix of c, because an escaped component never contains 0x00 0x01;
  - round trip: decode(encode(t)) == t; the first 0x00 0x01 after a component's start is its
    terminator (inside `escaped` every 0x00 is followed by 0xFF).

Families (strings are UTF-8; "" namespace is stored as "default"):

    d ns session key                    -> record (values.py)
    m ns session                        -> session meta (SessionInfo protobuf, values.py)
    t ns session                        -> tombstone: u64 max_version of a deleted session
    l ns session stream seq:u64         -> log entry (values.py)
    ~ revision:u64                      -> change-log entry (replication_pb2.ChangeEntry)
    i ns session request_id             -> idempotency record (values.py)
    j expires_at:u64 ns session request_id -> ""  (idempotency expiry index)
    x expires_at:u64 ns session         -> ""  (session expiry index)
    y expires_at:u64 ns session key     -> ""  (key expiry index)
    _ name                              -> node meta ("revision", "compacted", "clustermap")

The change log's tag sorts after every other family (docs/design.md §4; stores written
before this used `c`, moved at open by store.py). Its keys only ever grow, so with nothing
after them in the key space each new table of entries lies beyond every older table and
LevelDB moves it down the levels without rewriting it. Under `c`, between the node meta and
the data, the table at the end of the log's range also covered the start of the `d` range, so
every new table of entries overlapped it and was merged with it, level after level (with
the step benchmark: ~40 such merges and 1.4-2.3 s of compaction per primary in 20 s, against
0.5-0.8 s after the move).
"""

from __future__ import annotations

import struct

DATA = b"d"
META = b"m"
TOMBSTONE = b"t"
LOG = b"l"
CHANGE = b"~"  # sorts last: see the module docstring
LEGACY_CHANGE = b"c"  # the change log's tag in stores written before
IDEMPOTENCY = b"i"
IDEMPOTENCY_EXPIRY = b"j"
SESSION_EXPIRY = b"x"
KEY_EXPIRY = b"y"
NODE = b"_"

TERM = b"\x00\x01"
_ESC_FROM = b"\x00"
_ESC_TO = b"\x00\xff"
_U64 = struct.Struct(">Q")
u64 = _U64.pack


def escape(part: bytes) -> bytes:
    """A bytes component without its terminator: a prefix-scan bound for partial components."""
    return part.replace(_ESC_FROM, _ESC_TO)


def component(part: bytes) -> bytes:
    return part.replace(_ESC_FROM, _ESC_TO) + TERM


def encode(tag: bytes, *parts: bytes | int) -> bytes:
    """tag + each part: bytes are escaped and terminated, ints are u64 big-endian."""
    out = [tag]
    for p in parts:
        out.append(_U64.pack(p) if isinstance(p, int) else p.replace(_ESC_FROM, _ESC_TO) + TERM)
    return b"".join(out)


def decode(key: bytes, schema: str) -> tuple[bytes | int, ...]:
    """Components of `key` after its tag; schema has one letter per component:
    'b' bytes, 'q' u64. Raises ValueError when the key does not match the schema."""
    pos = 1
    out: list[bytes | int] = []
    for kind in schema:
        if kind == "q":
            if pos + 8 > len(key):
                raise ValueError(f"key too short for u64 at {pos}: {key!r}")
            out.append(_U64.unpack_from(key, pos)[0])
            pos += 8
        else:
            end = key.find(TERM, pos)
            if end < 0:
                raise ValueError(f"unterminated component at {pos}: {key!r}")
            out.append(key[pos:end].replace(_ESC_TO, _ESC_FROM))
            pos = end + 2
    if pos != len(key):
        raise ValueError(f"trailing bytes after {schema!r} at {pos}: {key!r}")
    return tuple(out)


def prefix(tag: bytes, *parts: bytes | int, partial: bytes | None = None) -> bytes:
    """Byte prefix of every key whose first components are `parts` (and whose next bytes
    component starts with `partial`, when given)."""
    p = encode(tag, *parts)
    return p + escape(partial) if partial else p


def prefix_end(p: bytes) -> bytes | None:
    """The smallest key greater than every key starting with p (None: no upper bound)."""
    stripped = p.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


CHANGE_END = prefix_end(CHANGE)  # the bound after every change-log key
LEGACY_CHANGE_END = prefix_end(LEGACY_CHANGE)


# ---- the families (hot paths build keys with these, so they skip the generic loop) ----


def session_part(ns: bytes, sid: bytes) -> bytes:
    """The encoded (ns, session) components: the *_in() builders below take it pre-built."""
    return component(ns) + component(sid)


def data_prefix_in(part: bytes) -> bytes:
    return DATA + part


def idempotency_key_in(part: bytes, request_id: bytes) -> bytes:
    return b"".join((IDEMPOTENCY, part, component(request_id)))


def idempotency_expiry_key_in(expires_at: int, part: bytes, request_id: bytes) -> bytes:
    return b"".join((IDEMPOTENCY_EXPIRY, _U64.pack(expires_at), part, component(request_id)))


def data_key(ns: bytes, sid: bytes, key: bytes) -> bytes:
    return b"".join((DATA, component(ns), component(sid), component(key)))


def data_prefix(ns: bytes, sid: bytes) -> bytes:
    return data_prefix_in(session_part(ns, sid))


def meta_key(ns: bytes, sid: bytes) -> bytes:
    return b"".join((META, component(ns), component(sid)))


def tombstone_key(ns: bytes, sid: bytes) -> bytes:
    return b"".join((TOMBSTONE, component(ns), component(sid)))


def log_prefix(ns: bytes, sid: bytes, stream: bytes | None = None) -> bytes:
    p = b"".join((LOG, component(ns), component(sid)))
    return p + component(stream) if stream is not None else p


def log_key(ns: bytes, sid: bytes, stream: bytes, seq: int) -> bytes:
    return b"".join((LOG, component(ns), component(sid), component(stream), _U64.pack(seq)))


def change_key(revision: int) -> bytes:
    return CHANGE + _U64.pack(revision)


def idempotency_key(ns: bytes, sid: bytes, request_id: bytes) -> bytes:
    return idempotency_key_in(session_part(ns, sid), request_id)


def idempotency_expiry_key(expires_at: int, ns: bytes, sid: bytes, request_id: bytes) -> bytes:
    return idempotency_expiry_key_in(expires_at, session_part(ns, sid), request_id)


def session_expiry_key(expires_at: int, ns: bytes, sid: bytes) -> bytes:
    return b"".join((SESSION_EXPIRY, _U64.pack(expires_at), component(ns), component(sid)))


def key_expiry_key(expires_at: int, ns: bytes, sid: bytes, key: bytes) -> bytes:
    return b"".join((KEY_EXPIRY, _U64.pack(expires_at), component(ns), component(sid), component(key)))


def node_key(name: str) -> bytes:
    return NODE + component(name.encode())


def revision_of_change_key(key: bytes) -> int:
    return int(_U64.unpack_from(key, 1)[0])


def expiry_bound(tag: bytes, now_ms: int) -> bytes:
    """Upper bound (exclusive) of an expiry index for everything due at or before now_ms."""
    return tag + _U64.pack(now_ms + 1)


def last_component(key: bytes, start: int) -> bytes:
    """The bytes component that runs from `start` to the end of `key` (its terminator last)."""
    return key[start:-2].replace(_ESC_TO, _ESC_FROM)
