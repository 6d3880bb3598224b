"""One tenant at its limit beside another: a `shardstate dev --auth` cluster whose token file
gains two write tokens, for namespaces `a` and `b`, and `[namespace.a] max_ops_per_s`. In
interleaved rounds, tenant b runs a closed loop of puts alone, then with tenant a hammering
far over its limit from another process (every call beyond it answered RESOURCE_EXHAUSTED).
Tenant a uses the library's client: by default its Retry waits out each refusal, as a
well-behaved caller does; `--a-retry none` makes it come straight back instead, as a caller
that ignores the refusals would. Prints b's ops/s alone and beside a, and what a got through
and was refused (refusals that reached a's callers, after their retries).

    .venv/bin/python benchmarks/tenant_bench.py                        # 3 rounds x 10 s
    .venv/bin/python benchmarks/tenant_bench.py --rounds 5 --limit 200 --json tenants.json
"""

from __future__ import annotations

import shardstate.bench  # noqa: F401  (first: chooses grpc's transport before grpc loads)

# isort: split

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from shardstate import NO_RETRY, AsyncClient, Retry
from shardstate.bench import procstat
from shardstate.common.errors import LimitExceededError
from shardstate.server import launch


async def loop(router: str, token: str, namespace: str, callers: int, duration: float,
               rate: float = 0.0, retry: bool = True) -> dict[str, int]:
    """`callers` callers putting for `duration` s: as fast as answers come, or together at
    `rate` calls/s (each on its own schedule, so a refused call does not speed the others).
    `retry`: the client's default Retry (refusals waited out), else none."""
    done = {"ok": 0, "refused": 0}
    async with AsyncClient(router, token=token, namespace=namespace, timeout=30,
                           retry=Retry() if retry else NO_RETRY) as c:
        end = time.monotonic() + duration

        async def caller(i: int) -> None:
            s = c.session(f"{namespace}-{i}")
            n = 0
            start = time.monotonic()
            while time.monotonic() < end:
                if rate:
                    wait = start + n * callers / rate - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                try:
                    await s.put("state", b"x" * 256)
                    done["ok"] += 1
                except LimitExceededError:
                    done["refused"] += 1
                n += 1

        await asyncio.gather(*(caller(i) for i in range(callers)))
    done["cpu_ms"] = int(time.process_time() * 1000)  # this process's, for the hammer's report
    return done


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    return {name: procstat.cpu_seconds(pid) for name, pid in pids.items()}


def cpu_per_s(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Each node's CPU in ms per wall second over a window."""
    return {n: round((after[n] - before[n]) * 1000 / seconds) for n in before if n in after}


def new_token(file: Path, namespace: str) -> str:
    out = subprocess.run(launch.shardstate_cmd("auth", "new-token", "--role", "write", "-n", namespace,
                                               "--append", str(file)), capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/tenant_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--limit", type=int, default=200, help="tenant a's max_ops_per_s")
    p.add_argument("--callers", type=int, default=16, help="tenant b's concurrent callers")
    p.add_argument("--hammer", type=int, default=64, help="tenant a's concurrent callers")
    p.add_argument("--offered", type=float, default=0.0,
                   help="tenant a's calls/s (0: a closed loop, as fast as the answers come)")
    p.add_argument("--a-retry", choices=("default", "none"), default="default",
                   help="tenant a's client: the default Retry (waits out refusals) or none")
    p.add_argument("--json", metavar="FILE")
    ns = p.parse_args(argv)
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="ss-tenants-"))
    dev = launch.Dev(work / "data", "--shards", "2", "--replicas", "1", "--auth", log_path=work / "dev.log")
    rows: list[dict[str, Any]] = []
    # one event loop for every window: grpc.aio's poller outlives a loop that asyncio.run closed
    # and would call into it ("Event loop is closed")
    runner = asyncio.Runner()
    try:
        router = dev.wait_router(120)
        tokens_file = work / "data" / "tokens.toml"
        ta, tb = new_token(tokens_file, "a"), new_token(tokens_file, "b")
        with tokens_file.open("a") as f:
            f.write(f"\n[namespace.a]\nmax_ops_per_s = {ns.limit}\n")
        time.sleep(3)  # the servers reload the file within a second or two
        runner.run(loop(router, tb, "b", ns.callers, 2.0))  # warm-up: b's sessions exist
        pids = dev.node_pids()
        for rnd in range(1, ns.rounds + 1):
            c0 = cpu_now(pids)
            alone = runner.run(loop(router, tb, "b", ns.callers, ns.duration))
            c1 = cpu_now(pids)
            hammer = subprocess.Popen([sys.executable, __file__, "--hammer-only", router, ta, str(ns.hammer),
                                       str(ns.duration + 2), str(ns.offered), ns.a_retry], stdout=subprocess.PIPE, text=True)
            time.sleep(1.0)  # a's load is on before b's window opens
            c2 = cpu_now(pids)
            beside = runner.run(loop(router, tb, "b", ns.callers, ns.duration))
            c3 = cpu_now(pids)
            out, _ = hammer.communicate(timeout=ns.duration * 3 + 60)
            a = json.loads(out.strip().splitlines()[-1])
            row = {"round": rnd, "b_alone_ops_s": alone["ok"] / ns.duration,
                   "b_beside_ops_s": beside["ok"] / ns.duration, "b_refused": alone["refused"] + beside["refused"],
                   "a_ok_ops_s": a["ok"] / (ns.duration + 2), "a_refused": a["refused"],
                   "cpu_ms_per_s_alone": cpu_per_s(c0, c1, ns.duration),
                   "cpu_ms_per_s_beside": cpu_per_s(c2, c3, ns.duration),
                   "a_client_cpu_ms_per_s": round(a["cpu_ms"] / (ns.duration + 2))}
            rows.append(row)
            console.print(f"round {rnd}: b alone {row['b_alone_ops_s']:,.0f} ops/s, beside a "
                          f"{row['b_beside_ops_s']:,.0f} ({row['b_beside_ops_s'] / row['b_alone_ops_s']:.2f}x); "
                          f"a got {row['a_ok_ops_s']:,.0f}/s through, {a['refused']:,} refused")
            alone_cpu, beside_cpu = row["cpu_ms_per_s_alone"], row["cpu_ms_per_s_beside"]
            console.print("  CPU ms/s alone -> beside: " + ", ".join(
                f"{n} {alone_cpu[n]}->{beside_cpu[n]}" for n in sorted(alone_cpu))
                + f"; a's client {row['a_client_cpu_ms_per_s']}")
    finally:
        runner.close()
        dev.terminate()
    alone_m = statistics.median(r["b_alone_ops_s"] for r in rows)
    beside_m = statistics.median(r["b_beside_ops_s"] for r in rows)
    offered = f"{ns.offered:,.0f} calls/s" if ns.offered else f"a closed loop of {ns.hammer} callers"
    offered += ", retrying" if ns.a_retry == "default" else ", not retrying"
    console.print(f"median: b alone {alone_m:,.0f} ops/s, beside a at its limit {beside_m:,.0f} "
                  f"({beside_m / alone_m:.2f}x); a's limit {ns.limit}/s per process, a offered {offered}")
    m = procstat.machine()
    console.print(f"machine: {m.get('cores')} cores ({m.get('cpu_model')}); dev --auth, 2 shards x 1 replica")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"machine": m, "rounds": rows, "args": vars(ns)}, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "--hammer-only":
        _, _, r, t, n, d, rate, retry = sys.argv
        print(json.dumps(asyncio.run(loop(r, t, "a", int(n), float(d), float(rate), retry == "default"))))
        sys.exit(0)
    sys.exit(main())
