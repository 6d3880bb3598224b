"""shardstate.common.metrics: one registry per process; counters, gauges, the Status rate."""

from __future__ import annotations

import pytest

from shardstate.common.metrics import RateMeter, Registry


def test_counters_and_gauges_count_per_label_set_and_sum() -> None:
    r = Registry()
    sent = r.counter("shardstate_test_sent_total", "sent", ("replica",))
    sent.inc(replica="a")
    sent.inc(3, replica="b")
    sent.inc(replica="a")
    assert (sent.value(replica="a"), sent.value(replica="b"), sent.value(replica="c"), sent.total()) == (2, 3, 0, 5)
    g = r.gauge("shardstate_test_in_flight", "in flight")
    g.inc()
    g.inc()
    g.dec()
    assert g.value() == 1
    r.gauge("shardstate_test_sessions", "sessions", fn=lambda: 42)
    assert r.snapshot() == {'shardstate_test_sent_total{replica="a"}': 2, 'shardstate_test_sent_total{replica="b"}': 3,
                            "shardstate_test_in_flight": 1, "shardstate_test_sessions": 42}


def test_a_name_is_registered_once_counters_end_in_total_and_labels_must_match() -> None:
    r = Registry()
    c = r.counter("shardstate_x_total", "x", ("address",))
    with pytest.raises(ValueError, match="registered twice"):
        r.counter("shardstate_x_total", "x")
    with pytest.raises(ValueError, match="_total"):
        r.counter("shardstate_y", "y")
    with pytest.raises(ValueError, match=r"takes labels \('address',\)"):
        c.inc(shard="s1")
    assert r.get("shardstate_x_total") is c


def test_the_rate_is_per_second_since_the_previous_reading() -> None:
    now = [100.0]
    r = Registry()
    c = r.counter("shardstate_ops_total", "ops")
    meter = RateMeter(c, clock=lambda: now[0])
    c.inc(50)
    now[0] = 102.0
    assert meter.rate() == 25.0
    assert meter.rate() == 0.0  # no time passed, nothing counted
    c.inc(10)
    now[0] = 104.0
    assert meter.rate() == 5.0
