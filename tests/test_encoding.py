"""Property tests of the storage key encoding: order-preserving, prefix-safe, round trip,
for any bytes (0x00 and 0xFF inside components included)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstate.server.storage import encoding as enc

# Bias towards the bytes the escaping is about.
tricky = st.binary(max_size=12) | st.lists(st.sampled_from([0x00, 0x01, 0xFE, 0xFF, 0x61]), max_size=8).map(bytes)
u64s = st.integers(min_value=0, max_value=2**64 - 1)
SCHEMAS = ["b", "bb", "bbb", "qbb", "bbbq", "qbbb"]


@st.composite
def tuples(draw: st.DrawFn, schema: str) -> tuple[bytes | int, ...]:
    return tuple(draw(u64s) if kind == "q" else draw(tricky) for kind in schema)


@st.composite
def schema_and_two(draw: st.DrawFn) -> tuple[str, tuple[bytes | int, ...], tuple[bytes | int, ...]]:
    schema = draw(st.sampled_from(SCHEMAS))
    return schema, draw(tuples(schema)), draw(tuples(schema))


@settings(max_examples=500)
@given(schema_and_two())
def test_order_preserving(case: tuple[str, tuple[bytes | int, ...], tuple[bytes | int, ...]]) -> None:
    _, a, b = case
    ea, eb = enc.encode(b"d", *a), enc.encode(b"d", *b)
    assert (ea < eb) == (a < b)
    assert (ea == eb) == (a == b)


@settings(max_examples=500)
@given(schema_and_two())
def test_round_trip(case: tuple[str, tuple[bytes | int, ...], tuple[bytes | int, ...]]) -> None:
    schema, a, _ = case
    assert enc.decode(enc.encode(b"l", *a), schema) == a


@settings(max_examples=500)
@given(st.lists(tricky, min_size=1, max_size=4), st.lists(tricky, max_size=3))
def test_tuple_prefix_is_byte_prefix(head: list[bytes], tail: list[bytes]) -> None:
    assert enc.encode(b"d", *head, *tail).startswith(enc.prefix(b"d", *head))


@settings(max_examples=1000)
@given(tricky, tricky, tricky)
def test_prefix_scan_is_exact(parent: bytes, p: bytes, c: bytes) -> None:
    """A prefix scan for component prefix p under `parent` matches key c exactly when c
    starts with p: no false hits across the terminator, even with 0x00/0xFF inside."""
    scan = enc.prefix(b"d", parent, partial=p)
    key = enc.encode(b"d", parent, c)
    assert key.startswith(scan) == c.startswith(p)
    # a different parent never falls into the scan, even one that extends `parent`
    for sibling in (parent + b"\x00" + p, parent + b"\xff" + p, parent + p):
        if sibling != parent:
            assert not enc.encode(b"d", sibling, c).startswith(scan)


@settings(max_examples=500)
@given(tricky, tricky, tricky)
def test_prefix_end_bounds_exactly_the_prefix(parent: bytes, p: bytes, c: bytes) -> None:
    scan = enc.prefix(b"d", parent, partial=p)
    end = enc.prefix_end(scan)
    key = enc.encode(b"d", parent, c)
    inside = scan <= key and (end is None or key < end)
    assert inside == c.startswith(p)


@given(tricky, tricky, tricky)
def test_family_helpers_match_generic(ns: bytes, sid: bytes, key: bytes) -> None:
    assert enc.data_key(ns, sid, key) == enc.encode(enc.DATA, ns, sid, key)
    assert enc.data_key(ns, sid, key).startswith(enc.data_prefix(ns, sid))
    assert enc.meta_key(ns, sid) == enc.encode(enc.META, ns, sid)
    assert enc.log_key(ns, sid, key, 7) == enc.encode(enc.LOG, ns, sid, key, 7)
    assert enc.log_key(ns, sid, key, 7).startswith(enc.log_prefix(ns, sid, key))
    assert enc.last_component(enc.data_key(ns, sid, key), len(enc.data_prefix(ns, sid))) == key
    assert enc.decode(enc.key_expiry_key(5, ns, sid, key), "qbbb") == (5, ns, sid, key)
    part = enc.session_part(ns, sid)
    assert enc.data_prefix_in(part) == enc.data_prefix(ns, sid)
    assert enc.idempotency_key_in(part, key) == enc.idempotency_key(ns, sid, key)
    assert enc.idempotency_expiry_key_in(9, part, key) == enc.idempotency_expiry_key(9, ns, sid, key)


def test_log_seqs_sort_numerically() -> None:
    keys = [enc.log_key(b"ns", b"s", b"m", n) for n in (1, 2, 255, 256, 2**40)]
    assert keys == sorted(keys)


def test_decode_rejects_garbage() -> None:
    for bad, schema in ((b"d\x01\x02", "b"), (b"c\x00", "q"), (enc.encode(b"d", b"a") + b"x", "b")):
        with pytest.raises(ValueError):
            enc.decode(bad, schema)
