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
