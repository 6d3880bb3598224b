"""The one way the storage engine iterates a key range of LevelDB (a DB or a snapshot).

plyvel 1.5.1 drops a key in reverse iteration: `iterator(start=s, stop=..., reverse=True)`
(and `prefix=p, reverse=True`, whose start is p) yields nothing when the highest key of the
range is `s` itself - a range holding one key, at its start. Its reverse positioning ends
with "stop if start >= key" where include_start needs "start > key" (tests/test_engine.py
reproduces it with plyvel alone). So a reverse read of `ReadLog(last=N)` over a one-entry
range came back empty. `iterate` never hands plyvel a start bound in reverse: it iterates
down from the stop bound and stops itself at the first key below the start. Forward
iteration is plyvel's own, which gets every bound right.

Use `iterate` for every ranged or reverse read in server/ (a test checks no other reverse
iteration appears).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .encoding import prefix_end


def iterate(
    db: Any, *, start: bytes | None = None, stop: bytes | None = None, prefix: bytes | None = None,
    reverse: bool = False, include_start: bool = True, include_stop: bool = False,
    include_value: bool = True,
) -> Iterator[Any]:
    """db.iterator(...) with the same arguments and results (keys, or (key, value) pairs),
    correct in reverse. `prefix` excludes start/stop, as in plyvel."""
    if prefix is not None:
        if start is not None or stop is not None:
            raise TypeError("prefix cannot be given with start or stop")
        start, stop, include_start, include_stop = prefix, prefix_end(prefix), True, False
    if not reverse:
        it: Iterator[Any] = db.iterator(start=start, stop=stop, include_start=include_start,
                                        include_stop=include_stop, include_value=include_value)
        return it
    return _reverse(db, start, stop, include_start, include_stop, include_value)


def _reverse(
    db: Any, start: bytes | None, stop: bytes | None, include_start: bool, include_stop: bool,
    include_value: bool,
) -> Iterator[Any]:
    it = db.iterator(stop=stop, include_stop=include_stop, reverse=True, include_value=include_value)
    try:
        for item in it:
            if start is not None:
                k = item[0] if include_value else item
                if k < start or (k == start and not include_start):
                    return
            yield item
    finally:
        it.close()
