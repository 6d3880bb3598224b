"""What the per-op metrics cost the shard: Batches of gets and of puts through
`StateService.batch` in-process (one LevelDB, no gRPC), with the shard's `OpMetrics` as built
and with its per-op calls replaced by no-ops; CPU per op of each and the difference; and the
per-op call alone.

    .venv/bin/python benchmarks/metrics_overhead.py
    .venv/bin/python benchmarks/metrics_overhead.py --ops 200000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from typing import Any

from shardstate.server.config import ShardConfig
from shardstate.server.node import Node
from shardstate.server.service import StateService
from shardstate.server.storage.engine import Engine
from shardstate.v1 import state_pb2

BATCH = 100


def batches(kind: str, ops: int) -> list[state_pb2.BatchRequest]:
    out = []
    for b in range(ops // BATCH):
        req = state_pb2.BatchRequest()
        for i in range(BATCH):
            sid, key = f"s{(b * BATCH + i) % 1000}", f"k{i % 10}"
            if kind == "get":
                req.ops.add(get=state_pb2.GetRequest(session_id=sid, key=key))
            else:
                req.ops.add(put=state_pb2.PutRequest(session_id=sid, key=key, value=b"v" * 100))
        out.append(req)
    return out


async def cpu_per_op(svc: StateService, reqs: list[state_pb2.BatchRequest]) -> float:
    t0 = time.process_time()
    for req in reqs:
        await svc.batch(req)
    return (time.process_time() - t0) / (len(reqs) * BATCH)


def noop(*_: Any) -> None:
    return None


async def main(ops: int, rounds: int) -> None:
    d = tempfile.mkdtemp(prefix="metrics-overhead-")
    try:
        engine = Engine.open(ShardConfig(id="s1", data_dir=d))
        svc = StateService(engine, Node("s1", engine))
        real = (svc.opm.done, svc.opm.failed)
        work = {k: batches(k, ops) for k in ("put", "get")}
        await cpu_per_op(svc, work["put"])  # the keys exist; warm caches
        print(f"{ops} ops per run, batches of {BATCH}, best of {rounds} rounds (CPU us per op)")
        for kind, reqs in work.items():
            best = {"with metrics": float("inf"), "without": float("inf")}
            for r in range(rounds):
                for label in list(best)[:: 1 if r % 2 else -1]:  # alternate: no order bias
                    if label == "without":
                        svc.opm.done, svc.opm.failed = noop, noop  # type: ignore[method-assign]
                    else:
                        svc.opm.done, svc.opm.failed = real  # type: ignore[method-assign]
                    best[label] = min(best[label], await cpu_per_op(svc, reqs))
            w, wo = best["with metrics"] * 1e6, best["without"] * 1e6
            print(f"  {kind:<4} with metrics {w:6.2f}  without {wo:6.2f}  "
                  f"metrics {w - wo:+5.2f} us/op ({(w - wo) / wo * 100:+.1f}%)")
        resp = await svc.put(work["put"][0].ops[0].put)
        n = 1_000_000
        t0 = time.perf_counter()
        for _ in range(n):
            svc.opm.done("put", resp, t0)
        print(f"  OpMetrics.done alone: {(time.perf_counter() - t0) / n * 1e6:.2f} us per call")
        await engine.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    asyncio.run(main(a.ops, a.rounds))
