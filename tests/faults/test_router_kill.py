"""kill -9 of one of the two routers a client was given (Client("r1,r2")) while 8 threads
increment a counter and append to a log, with the client's default retry policy: the caller
sees no error, and the retried in-flight calls (one request_id for all their attempts) apply
once — every counter value handed out once and matching the count, every append stored once.
"""

from __future__ import annotations

import threading
from collections import Counter

from shardstate import Client
from tests.faults.report import Tally, fault_line
from tests.procs import Procs
from tests.stubs import uid, wait_until

THREADS = 8


def test_kill_router_with_two_routers_given(procs: Procs) -> None:
    shard = procs.shard("s1")
    r1, r2 = procs.router([shard.address]), procs.router([shard.address])
    sid = uid("rk")
    incrs: list[int] = []
    appended: list[bytes] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()

    def worker(n: int) -> None:
        with Client(f"{r1.address},{r2.address}") as c:
            s = c.session(sid)
            for i in range(100_000):
                if stop.is_set():
                    return
                try:
                    v = s.incr("n")
                    data = f"{n}-{i}".encode()
                    s.append("log", data)
                except BaseException as e:  # every error the caller sees is counted
                    with lock:
                        failures.append(e)
                    continue
                with lock:
                    incrs.append(v)
                    appended.append(data)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(incrs) >= 200, timeout=60)
        r1.kill()
        n = len(incrs)
        wait_until(lambda: len(incrs) >= n + 300, timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(120)

    with Client(r2.address) as c:
        s = c.session(sid)
        count = int(s.get("n").value)
        stored: list[bytes] = []
        after = 0
        while True:
            page = s.read("log", after_seq=after, limit=1000)  # by after-ranges, not last=
            if not page:
                break
            stored += [e.data for e in page]
            after = page[-1].seq
    dup_incr = sum(k - 1 for k in Counter(incrs).values() if k > 1)
    dup_log = sum(k - 1 for k in Counter(stored).values() if k > 1)
    # lost: acknowledged appends not stored, acknowledged counter values above the stored count;
    # duplicated: appends stored twice, counter values handed out twice, increments applied
    # beyond those acknowledged (with no caller error, each is a retry applied twice)
    lost = len(set(appended) - set(stored)) + sum(1 for v in incrs if v > count)
    extra = max(0, count - len(incrs)) if not failures else 0
    t = Tally("kill -9 router, client given two", acked=len(incrs) + len(appended), lost=lost,
              duplicated=dup_incr + dup_log + extra,
              caller_errors=len(failures), note=f"increments={len(incrs)} appends={len(appended)}")
    fault_line(t)
    assert len(incrs) >= 500
    assert t.caller_errors == 0, failures[:3]
    assert sorted(incrs) == list(range(1, count + 1))  # each increment applied once, none lost
    assert sorted(stored) == sorted(appended)  # each append stored once, none lost
    assert t.lost == 0 and t.duplicated == 0
