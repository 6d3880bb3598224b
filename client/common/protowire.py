"""Protobuf wire-format pieces for code that builds messages from already-encoded bytes
(routers forwarding requests, leaders streaming stored change-log entries), and the UTF-8
check of a string field read as raw bytes."""

from __future__ import annotations

from shardstate.common.errors import InvalidArgumentError


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


class WireError(ValueError):
    """Bytes that are not a protobuf message at the wire level (a bad tag, a length past the end)."""


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise WireError("truncated or overlong varint")
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


def read_fields(data: bytes, out: list[tuple[int, int | bytes]] | None = None) -> list[tuple[int, int | bytes]]:
    """The top-level fields of an encoded message, in wire order: (number, value), a varint as
    an int and a length-delimited field as its bytes (fixed32/64 as their raw bytes). Raises
    WireError when the framing is broken (`out`, when given, then holds the fields before the
    break). For taking a malformed message apart field by field (which op of a batch is bad,
    which id a broken message had), never for the common path."""
    out = [] if out is None else out
    i = 0
    while i < len(data):
        tag, i = _read_varint(data, i)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == 0:
            v, i = _read_varint(data, i)
            out.append((number, v))
        elif wire == 2:
            n, i = _read_varint(data, i)
            if i + n > len(data):
                raise WireError(f"field {number} claims {n} bytes, {len(data) - i} left")
            out.append((number, data[i:i + n]))
            i += n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if i + n > len(data):
                raise WireError(f"field {number} is truncated")
            out.append((number, data[i:i + n]))
            i += n
        else:
            raise WireError(f"field {number} has wire type {wire}")
    return out


def last_varint(data: bytes, field: int) -> int:
    """The last value of varint `field` readable in `data` before any break in its framing
    (0 when there is none): the id of a malformed tagged message."""
    seen: list[tuple[int, int | bytes]] = []
    try:
        read_fields(data, seen)
    except WireError:
        pass
    ids = [v for n, v in seen if n == field and isinstance(v, int)]
    return ids[-1] if ids else 0


def utf8(raw: bytes, field: str) -> str:
    """A string field read as raw bytes (routers, malformed messages): its text, or
    InvalidArgumentError naming the field when it is not UTF-8 (protobuf requires it)."""
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{field} is not valid UTF-8 (byte {e.start} of {len(raw)})") from None
