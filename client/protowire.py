"""Protobuf wire-format pieces for code that builds messages from already-encoded bytes
(routers forwarding requests, leaders streaming stored change-log entries)."""

from __future__ import annotations


def varint(n: int) -> bytes:
    """Base-128 varint of a non-negative integer."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_HEADS: dict[int, bytes] = {}


def field_head(field: int, n: int) -> bytes:
    """What precedes an n-byte length-delimited value of `field` (< 16): its tag and length.
    Remembered for lengths below 16 KiB (two-byte varints): the sizes that repeat when one
    kind of message is framed again and again (ops in a batch, change-log entries)."""
    key = field << 32 | n
    head = _HEADS.get(key)
    if head is None:
        head = bytes((field << 3 | 2,)) + varint(n)
        if n < 16384:
            _HEADS[key] = head
    return head
