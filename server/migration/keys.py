"""Which session a stored key belongs to, for the families a session owns (docs/design.md
§4.1): what a migration copies, and what a shard drops once sessions moved away."""

from __future__ import annotations

from collections.abc import Callable

from ..storage import encoding as enc

# Families whose key starts with ns, session / with expires_at:u64, ns, session.
_LEADING = frozenset(t[0] for t in (enc.DATA, enc.META, enc.TOMBSTONE, enc.LOG, enc.IDEMPOTENCY))
_AFTER_U64 = frozenset(t[0] for t in (enc.IDEMPOTENCY_EXPIRY, enc.SESSION_EXPIRY, enc.KEY_EXPIRY))
_TERM = enc.TERM
_ESC, _RAW = b"\x00\xff", b"\x00"


def session_of(key: bytes) -> tuple[bytes, bytes] | None:
    """(namespace, session_id) as stored, None for a key of no session (node meta, change log)."""
    if not key:
        return None
    tag = key[0]
    if tag in _LEADING:
        pos = 1
    elif tag in _AFTER_U64:
        pos = 9
    else:
        return None
    a = key.find(_TERM, pos)
    if a < 0:
        return None
    b = key.find(_TERM, a + 2)
    if b < 0:
        return None
    ns, sid = key[pos:a], key[a + 2:b]
    if _RAW in ns:
        ns = ns.replace(_ESC, _RAW)
    if _RAW in sid:
        sid = sid.replace(_ESC, _RAW)
    return ns, sid


class SessionFilter:
    """`pick(key)`: does the key belong to a session `test(namespace, session_id)` accepts?
    Answers are remembered per session (a session has many keys)."""

    def __init__(self, test: Callable[[str, str], bool]) -> None:
        self._test = test
        self._seen: dict[tuple[bytes, bytes], bool] = {}

    def session(self, ns: bytes, sid: bytes) -> bool:
        got = self._seen.get((ns, sid))
        if got is None:
            got = self._seen[(ns, sid)] = self._test(ns.decode(), sid.decode())
            if len(self._seen) > 500_000:
                self._seen.clear()
        return got

    def pick(self, key: bytes) -> bool:
        s = session_of(key)
        return s is not None and self.session(*s)
