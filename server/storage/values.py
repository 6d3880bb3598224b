"""Byte formats of the values stored under each key family (keys are in encoding.py).

    record     (d|)  = version:u64 create_version:u64 expires_at_ms:u64 updated_at_ms:u64 value
    log entry  (l|)  = appended_at_ms:u64 revision:u64 data
    idempotency(i|)  = expires_at_ms:u64 kind:u8 [request_crc32:u32] response
                       ; response = serialized reply proto; kind's high bit set: the crc32 of
                       ; the serialized request follows (records from before it have none)
    tombstone  (t|)  = max_version:u64
    meta       (m|)  = shardstate.v1.SessionInfo without namespace/session_id/shard_id
    change     (~|)  = shardstate.v1.ChangeEntry
    _|revision, _|compacted = u64; _|clustermap = shardstate.v1.ClusterMap
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from shardstate.v1 import types_pb2

_RECORD = struct.Struct(">QQQQ")
_ENTRY = struct.Struct(">QQ")
_IDEM = struct.Struct(">QB")
_CRC = struct.Struct(">I")
FINGERPRINTED = 0x80  # in an idempotency record's kind byte: a request crc32 follows
_U64 = struct.Struct(">Q")
RECORD_HEADER = _RECORD.size


class StoredRecord(NamedTuple):
    version: int
    create_version: int
    expires_at: int
    updated_at: int
    value: bytes

    def live(self, now_ms: int) -> bool:
        return not self.expires_at or self.expires_at > now_ms

    def to_pb(self, key: str, keys_only: bool = False) -> types_pb2.Record:
        return types_pb2.Record(
            key=key, value=b"" if keys_only else self.value, version=self.version,
            create_version=self.create_version, expires_at_ms=self.expires_at,
            updated_at_ms=self.updated_at,
        )


def pack_record(version: int, create_version: int, expires_at: int, updated_at: int, value: bytes) -> bytes:
    return _RECORD.pack(version, create_version, expires_at, updated_at) + value


def unpack_record(raw: bytes) -> StoredRecord:
    v, c, e, u = _RECORD.unpack_from(raw)
    return StoredRecord(v, c, e, u, raw[RECORD_HEADER:])


def record_expires_at(raw: bytes) -> int:
    return int(_RECORD.unpack_from(raw)[2])


def pack_entry(appended_at: int, revision: int, data: bytes) -> bytes:
    return _ENTRY.pack(appended_at, revision) + data


def unpack_entry(seq: int, raw: bytes) -> types_pb2.LogEntry:
    appended_at, revision = _ENTRY.unpack_from(raw)
    return types_pb2.LogEntry(seq=seq, data=raw[_ENTRY.size:], appended_at_ms=appended_at, revision=revision)


def entry_data_len(raw: bytes) -> int:
    return len(raw) - _ENTRY.size


def pack_idempotency(expires_at: int, kind: int, response: bytes, request_crc: int | None = None) -> bytes:
    if request_crc is None:
        return _IDEM.pack(expires_at, kind) + response
    return _IDEM.pack(expires_at, kind | FINGERPRINTED) + _CRC.pack(request_crc) + response


def unpack_idempotency(raw: bytes) -> tuple[int, int, int | None, bytes]:
    """(expires_at, kind, the request's crc32 or None, response)."""
    expires_at, kind = _IDEM.unpack_from(raw)
    if kind & FINGERPRINTED:
        crc = _CRC.unpack_from(raw, _IDEM.size)[0]
        return expires_at, kind & ~FINGERPRINTED, crc, raw[_IDEM.size + _CRC.size:]
    return expires_at, kind, None, raw[_IDEM.size:]


def pack_u64(n: int) -> bytes:
    return _U64.pack(n)


def unpack_u64(raw: bytes | None) -> int:
    return int(_U64.unpack(raw)[0]) if raw else 0
