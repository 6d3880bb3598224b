"""Leader messages built from the change log's stored bytes, without parsing the entries.

Grammar (protobuf wire format, replication.proto field numbers):

    LeaderMessage(changes|heartbeat) = tag(2|3, LEN) len ChangeBatch  [tag(4, VARINT) epoch]
    ChangeBatch = ( tag(1, LEN) len ChangeEntry-bytes )* [tag(2) leader_revision]
                  [tag(3) leader_ts_ms] [tag(4) backlog]

Zero-valued scalars are omitted, as protobuf itself does.
"""

from __future__ import annotations

from collections.abc import Sequence

from shardstate.common.protowire import field_head, varint

SERVICE = "shardstate.v1.Replication"
FOLLOW_METHOD = f"/{SERVICE}/Follow"
_LEN = 2
_VARINT = 0
CHANGES = 2
HEARTBEAT = 3




def _tag(field: int, wire: int) -> bytes:
    return varint((field << 3) | wire)


def _scalar(field: int, n: int) -> bytes:
    return _tag(field, _VARINT) + varint(n) if n else b""


def change_batch(entries: Sequence[bytes], leader_revision: int, leader_ts_ms: int, backlog: int = 0,
                 ack_lazily: bool = False, traces: Sequence[tuple[int, str]] = ()) -> bytes:
    parts: list[bytes] = []
    add = parts.extend
    for e in entries:
        add((field_head(1, len(e)), e))
    parts.append(_scalar(2, leader_revision))
    parts.append(_scalar(3, leader_ts_ms))
    parts.append(_scalar(4, backlog))
    parts.append(_scalar(5, int(ack_lazily)))
    for revision, traceparent in traces:
        tp = traceparent.encode()
        ref = _scalar(1, revision) + field_head(2, len(tp)) + tp
        add((field_head(6, len(ref)), ref))
    return b"".join(parts)


def leader_message(kind: int, batch: bytes, epoch: int) -> bytes:
    """kind = CHANGES or HEARTBEAT."""
    return b"".join((_tag(kind, _LEN), varint(len(batch)), batch, _scalar(4, epoch)))
