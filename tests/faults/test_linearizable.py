"""Linearizability of strong reads and CAS writes through a kill -9 of the primary and a
`promote` of its replica, with semi-sync acks (--min-replica-acks 1): 16 clients on one
router, 20 keys, every op recorded (invoke/complete times, version read / expected / written,
outcome; an error is "unknown") and checked by tests/faults/linearizability.py.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import grpc

from shardstate.v1 import state_pb2, state_pb2_grpc
from tests.faults.linearizability import CAS, FAIL, OK, READ, UNKNOWN, WRITE, Op, check
from tests.faults.report import Tally, fault_line
from tests.faults.test_failover import promote
from tests.procs import Procs
from tests.stubs import wait_until

CLIENTS = 16
KEYS = [f"lin-{i:02d}" for i in range(20)]  # one session per key (key "k")
CALL_S = 5.0
PHASE_S = 1.5  # load before the kill and after the promotion


class Recorder:
    def __init__(self, router: str) -> None:
        self.router = router
        self.history: list[Op] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _client(self, n: int) -> None:
        rng = random.Random(n)
        known: dict[str, int] = {}
        async with grpc.aio.insecure_channel(self.router) as ch:
            stub = state_pb2_grpc.StateStub(ch)
            for i in range(1_000_000):
                if self.stop.is_set():
                    return
                key = rng.choice(KEYS)
                t0 = time.monotonic()
                if key not in known or rng.random() < 0.5:
                    try:
                        g = await stub.Get(state_pb2.GetRequest(session_id=key, key="k"), timeout=CALL_S)
                    except grpc.RpcError:
                        self.history.append(Op(n, READ, key, t0, time.monotonic(), UNKNOWN))
                        await asyncio.sleep(0.05)
                        continue
                    known[key] = g.record.version
                    self.history.append(Op(n, READ, key, t0, time.monotonic(), OK, read=g.record.version))
                    continue
                exp = known[key]
                try:
                    p = await stub.Put(state_pb2.PutRequest(session_id=key, key="k", value=b"%d-%d" % (n, i),
                                                            expected_version=exp), timeout=CALL_S)
                except grpc.RpcError:
                    self.history.append(Op(n, CAS, key, t0, time.monotonic(), UNKNOWN, expected=exp))
                    known.pop(key)
                    await asyncio.sleep(0.05)
                    continue
                t1 = time.monotonic()
                if p.applied:
                    known[key] = p.version
                    self.history.append(Op(n, CAS, key, t0, t1, OK, expected=exp, written=p.version))
                else:
                    known[key] = p.current.version
                    self.history.append(Op(n, CAS, key, t0, t1, FAIL, expected=exp, read=p.current.version))

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(n) for n in range(CLIENTS)))


def test_reads_and_cas_stay_linearizable_through_kill_and_promote(procs: Procs) -> None:
    primary = procs.shard("s1", "--min-replica-acks", "1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, replica.address], "--refresh-interval-s", "0.5")
    rec = Recorder(router.address)
    with grpc.insecure_channel(router.address) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        for key in KEYS:
            t0 = time.monotonic()
            v = stub.Put(state_pb2.PutRequest(session_id=key, key="k", value=b"init"), timeout=30).version
            rec.history.append(Op(-1, WRITE, key, t0, time.monotonic(), OK, written=v))
    rec.thread.start()
    try:
        time.sleep(PHASE_S)
        killed_at = time.monotonic()  # before: callers see the kill before kill() returns
        primary.kill()
        assert promote(router) == replica.address
        promoted_at = time.monotonic()
        n = len(rec.history)
        wait_until(lambda: len(rec.history) >= n + 200, timeout=60)  # ops complete again
        time.sleep(PHASE_S)
    finally:
        rec.stop.set()
        rec.thread.join(60)
    assert not rec.thread.is_alive()

    h = rec.history
    violations = check(h)
    ok = [o for o in h if o.outcome == OK]
    unknown = [o for o in h if o.outcome == UNKNOWN]
    cas_ok = sum(1 for o in ok if o.kind == CAS)
    after = sum(1 for o in ok if o.invoke > promoted_at)
    kinds = sorted({v.kind for v in violations})
    t = Tally("linearizability: kill -9 primary + promote (semi-sync)", acked=cas_ok,
              lost=sum(1 for v in violations if v.kind in ("stale_read", "stale_cas", "read_regress")),
              duplicated=sum(1 for v in violations if v.kind == "double_cas"), caller_errors=len(unknown),
              note=(f"ops={len(h)} reads={sum(1 for o in ok if o.kind == READ)} "
                    f"cas_failed={sum(1 for o in h if o.outcome == FAIL)} ok_after_promote={after} "
                    f"unknown_before_kill={sum(1 for o in unknown if o.complete < killed_at)} "
                    f"violations={len(violations)} {','.join(kinds)}"))
    fault_line(t)
    assert cas_ok >= 100 and after >= 200
    assert violations == [], violations[:5]
    # Errors only around the failover: none completed before the kill.
    assert not [o for o in unknown if o.complete < killed_at]
