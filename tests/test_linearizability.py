"""The versioned-register history checker (tests/faults/linearizability.py) on hand-made good
and bad histories (each kind of violation caught), and on random histories produced by a
register that applies each op atomically between its invoke and complete times (never flagged).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.faults.linearizability import CAS, FAIL, OK, READ, UNKNOWN, WRITE, Op, check


def w(t0: float, t1: float, version: int, key: str = "k") -> Op:
    return Op(0, WRITE, key, t0, t1, OK, written=version)


def cas(t0: float, t1: float, expected: int, written: int = 0, outcome: str = OK, read: int = 0,
        key: str = "k", client: int = 1) -> Op:
    return Op(client, CAS, key, t0, t1, outcome, read=read, expected=expected, written=written)


def rd(t0: float, t1: float, version: int, key: str = "k", outcome: str = OK) -> Op:
    return Op(2, READ, key, t0, t1, outcome, read=version)


def kinds(history: list[Op]) -> list[str]:
    return sorted(v.kind for v in check(history))


def test_a_good_history_passes() -> None:
    h = [
        w(0, 1, 10),
        rd(1.5, 2, 10),
        cas(2, 3, 10, 20),
        cas(2.1, 3.1, 10, outcome=FAIL, read=20, client=3),  # lost the race, saw the winner
        rd(2.5, 2.6, 10),  # concurrent with the CAS: either version is fine
        rd(2.7, 3.5, 20),
        rd(4, 5, 20),
        cas(5, 6, 20, 30),
        rd(5.5, 7, 30),
        cas(7, 8, 30, outcome=UNKNOWN),  # an error: may or may not have applied
        rd(9, 10, 31),  # ... it did; its version was never reported to its caller
        rd(9, 10, 0, key="other"),  # a key never written reads as absent
    ]
    assert check(h) == []


def test_a_stale_read_after_a_completed_write_is_caught() -> None:
    h = [w(0, 1, 10), cas(2, 3, 10, 20), rd(4, 5, 10)]
    assert kinds(h) == ["stale_read"]


def test_a_failed_cas_that_saw_a_stale_version_is_caught() -> None:
    h = [w(0, 1, 10), cas(2, 3, 10, 20), cas(4, 5, 10, outcome=FAIL, read=10, client=3)]
    assert kinds(h) == ["stale_read"]


def test_a_read_going_back_after_an_earlier_read_is_caught() -> None:
    # the write never completed (unknown), so only the earlier read shows the regression
    h = [w(0, 1, 10), cas(2, 9, 10, outcome=UNKNOWN), rd(3, 4, 20), rd(5, 6, 10)]
    assert kinds(h) == ["read_regress"]
    assert kinds([w(0, 1, 10), cas(2, 9, 10, outcome=UNKNOWN), rd(3, 6, 20), rd(5, 7, 10)]) == []  # overlapping


def test_a_read_of_a_later_write_is_caught() -> None:
    h = [w(0, 1, 10), rd(2, 3, 20), cas(4, 5, 10, 20)]
    assert kinds(h) == ["future_read"]


def test_a_read_of_a_version_nobody_wrote_is_caught() -> None:
    assert kinds([w(0, 1, 10), rd(2, 3, 15)]) == ["unwritten_read"]
    # ... unless an unknown write could have produced it before the read completed
    assert kinds([w(0, 1, 10), cas(1, 2, 10, outcome=UNKNOWN), rd(2, 3, 15)]) == []
    assert kinds([w(0, 1, 10), rd(2, 3, 15), cas(4, 5, 10, outcome=UNKNOWN)]) == ["unwritten_read"]


def test_two_successful_cas_from_one_version_are_caught() -> None:
    h = [w(0, 1, 10), cas(2, 3, 10, 20), cas(2.5, 3.5, 10, 21, client=3)]
    assert "double_cas" in kinds(h)
    # concurrent CAS from one version: exactly one may win
    assert kinds([w(0, 1, 10), cas(2, 3, 10, 20), cas(2.5, 3.5, 10, outcome=FAIL, read=20, client=3)]) == []


def test_a_cas_applied_from_an_overwritten_version_is_caught() -> None:
    h = [w(0, 1, 10), cas(2, 3, 10, 20), cas(4, 5, 10, 30, client=3)]
    assert sorted(set(kinds(h))) == ["double_cas", "stale_cas"]
    h = [w(0, 1, 10), w(2, 3, 20), cas(4, 5, 10, 30, client=3)]
    assert kinds(h) == ["stale_cas"]


def test_versions_going_backwards_in_real_time_are_caught() -> None:
    h = [w(0, 1, 10), cas(2, 3, 10, 20), w(4, 5, 15)]
    assert kinds(h) == ["version_order"]
    h = [w(0, 1, 10), cas(2, 3, 10, 20), w(2.5, 5, 15)]  # concurrent: either order is fine
    assert kinds(h) == []


def test_keys_are_independent() -> None:
    h = [w(0, 1, 10, key="a"), w(0, 1, 5, key="b"), rd(2, 3, 5, key="b"), rd(2, 3, 10, key="a")]
    assert check(h) == []
    assert kinds([*h, rd(4, 5, 5, key="a")]) == ["read_regress", "stale_read", "unwritten_read"]  # b's version, on a


# ---- random linearizable histories: each op takes effect at a point inside its interval ----

op_plan = st.tuples(
    st.sampled_from(["read", "cas", "cas_stale", "unknown"]),
    st.sampled_from(["a", "b"]),
    st.floats(0, 100), st.floats(0, 5), st.floats(0, 1),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(op_plan, max_size=40))
def test_histories_of_an_atomic_register_are_never_flagged(plans: list[tuple[str, str, float, float, float]]) -> None:
    # (linearization point, invoke, complete, what, key), executed in point order on a model
    steps = sorted((t0 + d * f, t0, t0 + d, what, key) for what, key, t0, d, f in plans)
    current = {"a": 1, "b": 1}
    clock = 1
    history = [w(-2, -1, 1, key="a"), w(-2, -1, 1, key="b")]
    for _, t0, t1, what, key in steps:
        cur = current[key]
        if what == "read":
            history.append(rd(t0, t1, cur, key=key))
        elif what == "cas_stale" and cur > 1:
            history.append(cas(t0, t1, cur - 1, outcome=FAIL, read=cur, key=key))
        else:
            clock += 1
            current[key] = clock
            applied = cas(t0, t1, cur, clock, key=key)
            history.append(applied if what != "unknown" else cas(t0, t1, cur, outcome=UNKNOWN, key=key))
    assert check(history) == []
