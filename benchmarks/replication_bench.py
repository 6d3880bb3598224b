"""Replication figures on this machine, with real processes (one shard, its replica, a router):

  1. throughput of the `step` workload (Get + CAS Put of 1 KiB per step, through the router,
     with the AsyncClient auto-batching concurrent calls) with 0 replicas, 1 replica, and
     1 replica with --min-replica-acks 1;
  2. replication lag under that workload: for sampled writes, the time from the write's ack
     to the replica serving it (`Get min_revision=version` sent straight to the replica, so
     one read round trip is included), p50/p99;
  3. failover: kill -9 of the primary while a writer runs through the router, then
     `PromoteReplica`; the time from the promote call to the first write the router accepts.

    .venv/bin/python -m benchmarks.replication_bench               # from the repository root
    .venv/bin/python -m benchmarks.replication_bench --duration 5 --concurrency 32 --failovers 3
"""

from __future__ import annotations

import shardstate.bench  # noqa: F401  (first: chooses grpc's transport before grpc loads)

# isort: split

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table

from shardstate import AsyncClient, ConflictError, ShardstateError
from shardstate.v1 import admin_pb2, admin_pb2_grpc, state_pb2, state_pb2_grpc
from tests.procs import Procs

VALUE = b"x" * 1024


@dataclass
class StepResult:
    label: str
    steps: int = 0
    seconds: float = 0.0
    errors: int = 0
    conflicts: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


async def step_load(router: str, replica: str | None, label: str, duration: float, concurrency: int,
                    sessions: int, warmup: float = 1.0) -> StepResult:
    """`concurrency` callers doing get + CAS put on random sessions; a probe measures lag."""
    res = StepResult(label)
    stop_at = 0.0
    measuring = False
    ids = [f"bench-{i}" for i in range(sessions)]
    # The client library: concurrent calls are auto-batched onto one Pipeline stream (docs/design.md §8).
    async with AsyncClient(router) as client, grpc.aio.insecure_channel(router) as ch:
        stub = state_pb2_grpc.StateStub(ch)

        async def caller(n: int) -> None:
            rng = random.Random(n)
            while time.monotonic() < stop_at:
                s = client.session(rng.choice(ids))
                t0 = time.perf_counter()
                try:
                    rec = await s.get("state")
                    await s.put("state", VALUE, expect=rec.version if rec else 0)
                except ConflictError:
                    if measuring:
                        res.conflicts += 1
                    continue
                except ShardstateError:
                    if measuring:
                        res.errors += 1
                    continue
                if measuring:
                    res.steps += 1
                    res.latencies_ms.append((time.perf_counter() - t0) * 1000)

        async def probe() -> None:
            if replica is None:
                return
            async with grpc.aio.insecure_channel(replica) as rch:
                rstub = state_pb2_grpc.StateStub(rch)
                i = 0
                while time.monotonic() < stop_at:
                    i += 1
                    put = await stub.Put(state_pb2.PutRequest(session_id=f"probe-{i % 50}", key="p", value=b"%d" % i),
                                         timeout=10)
                    acked = time.perf_counter()
                    await rstub.Get(state_pb2.GetRequest(session_id=f"probe-{i % 50}", key="p",
                                                         min_revision=put.version), timeout=10)
                    if measuring:
                        res.lag_ms.append((time.perf_counter() - acked) * 1000)
                    await asyncio.sleep(0.01)

        stop_at = time.monotonic() + warmup + duration
        tasks = [asyncio.create_task(caller(n)) for n in range(concurrency)] + [asyncio.create_task(probe())]
        await asyncio.sleep(warmup)
        measuring = True
        t0 = time.monotonic()
        await asyncio.gather(*tasks)
        res.seconds = time.monotonic() - t0
    return res


def throughput_and_lag(args: argparse.Namespace) -> list[StepResult]:
    out = []
    configs = [("0 replicas", 0, []), ("1 replica (async)", 1, []),
               ("1 replica, --min-replica-acks 1", 1, ["--min-replica-acks", "1"])]
    for label, replicas, flags in configs:
        with tempfile.TemporaryDirectory() as tmp:
            procs = Procs(Path(tmp))
            try:
                primary = procs.shard("s1", *flags)
                reps = [procs.shard("s1", "--replica-of", primary.address) for _ in range(replicas)]
                router = procs.router([primary.address, *(r.address for r in reps)])
                out.append(asyncio.run(step_load(router.address, reps[0].address if reps else None, label,
                                                 args.duration, args.concurrency, args.sessions)))
            finally:
                procs.close()
    return out


async def _writer(router: str, state: dict[str, float], stop: asyncio.Event) -> None:
    async with grpc.aio.insecure_channel(router) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        i = 0
        while not stop.is_set():
            i += 1
            try:
                await stub.Put(state_pb2.PutRequest(session_id=f"fo-{i % 20}", key="k", value=b"%d" % i), timeout=2)
            except grpc.RpcError:
                await asyncio.sleep(0.005)
                continue
            state["last_ok"] = time.monotonic()
            if "promote_at" in state and "first_ok" not in state and state["last_ok"] > state["promote_at"]:
                state["first_ok"] = state["last_ok"]


async def one_failover(router: str, kill: callable) -> tuple[float, float]:  # type: ignore[valid-type]
    """(seconds of the PromoteReplica call, seconds from the call to the first accepted write)."""
    state: dict[str, float] = {}
    stop = asyncio.Event()
    w = asyncio.create_task(_writer(router, state, stop))
    await asyncio.sleep(1.0)
    await asyncio.to_thread(kill)
    await asyncio.sleep(0.2)
    async with grpc.aio.insecure_channel(router) as ch:
        state["promote_at"] = time.monotonic()
        await admin_pb2_grpc.AdminStub(ch).PromoteReplica(admin_pb2.PromoteReplicaRequest(shard_id="s1"), timeout=60)
        promoted = time.monotonic()
    while "first_ok" not in state and time.monotonic() - promoted < 30:
        await asyncio.sleep(0.001)
    stop.set()
    await w
    return promoted - state["promote_at"], state.get("first_ok", float("nan")) - state["promote_at"]


def failovers(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    out = []
    for i in range(args.failovers):
        for label, flags in (("async", []), ("--min-replica-acks 1", ["--min-replica-acks", "1"])):
            with tempfile.TemporaryDirectory() as tmp:
                procs = Procs(Path(tmp))
                try:
                    primary = procs.shard("s1", *flags)
                    replica = procs.shard("s1", "--replica-of", primary.address)
                    router = procs.router([primary.address, replica.address])
                    call, first = asyncio.run(one_failover(router.address, primary.kill))
                    out.append((f"{label} #{i + 1}", call, first))
                finally:
                    procs.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per configuration")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent callers")
    p.add_argument("--sessions", type=int, default=10_000, help="sessions the step workload spreads over")
    p.add_argument("--failovers", type=int, default=2, help="failovers measured per mode")
    args = p.parse_args()
    console = Console(width=None if Console().is_terminal else 150)

    results = throughput_and_lag(args)
    t = Table(title=f"step workload (get + CAS put, 1 KiB) through the router · {args.concurrency} callers · "
                    f"{args.sessions} sessions · {args.duration:g}s each")
    for col in ("configuration", "steps/s", "step p50 ms", "step p99 ms", "conflicts", "errors",
                "replication lag p50 ms", "lag p99 ms", "lag samples"):
        t.add_column(col, justify="left" if col == "configuration" else "right")
    for r in results:
        t.add_row(r.label, f"{r.rate:,.0f}", f"{pct(r.latencies_ms, 50):.1f}", f"{pct(r.latencies_ms, 99):.1f}",
                  str(r.conflicts), str(r.errors), f"{pct(r.lag_ms, 50):.2f}" if r.lag_ms else "-",
                  f"{pct(r.lag_ms, 99):.2f}" if r.lag_ms else "-", str(len(r.lag_ms)) if r.lag_ms else "-")
    console.print(t)
    console.print("lag = from the write's ack (through the router) to the replica serving it "
                  "(Get min_revision on the replica; includes one read round trip)")

    fo = failovers(args)
    t2 = Table(title="failover: kill -9 of the primary, then PromoteReplica through the router")
    for col in ("run", "promote call s", "promote → first accepted write s"):
        t2.add_column(col, justify="left" if col == "run" else "right")
    for label, call, first in fo:
        t2.add_row(label, f"{call:.3f}", f"{first:.3f}")
    firsts = [f for _, _, f in fo]
    t2.add_row("median", f"{statistics.median(c for _, c, _ in fo):.3f}", f"{statistics.median(firsts):.3f}")
    console.print(t2)


if __name__ == "__main__":
    main()
