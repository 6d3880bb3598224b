"""The sync Client with and without batching (`Client(batching=...)`), from T threads: an agent
step per call, `update()` of 1 KiB on a long-lived session handle (one CAS when the handle's
version is current), a session per thread, through a router.

    .venv/bin/python benchmarks/sync_batching.py                        # starts `shardstate dev`
    .venv/bin/python benchmarks/sync_batching.py --address 127.0.0.1:7400 --threads 1,8,32
    .venv/bin/python benchmarks/sync_batching.py --json out.json

Cells alternate (unary, batching, unary, ... per thread count, `--rounds` times); each line is a
cell's median round. Client CPU is this process's (all its threads) per step.
"""

from __future__ import annotations

import shardstate.bench  # noqa: F401  (first: chooses grpc's transport before grpc loads)

# isort: split

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from shardstate import Client
from shardstate.server import launch

VALUE = b"x" * 1024


def positive_ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"want a comma-separated list of positive ints, got {text!r}")
    return out


def cell(address: str, threads: int, batching: bool, duration: float, warmup: float, tag: str) -> dict[str, Any]:
    """One cell: `threads` callers for warm-up + duration; steps counted in the window only."""
    with Client(address, timeout=30, batching=batching) as c:
        handles = [c.session(f"sync-{tag}-{threads}-{i}") for i in range(threads)]
        for h in handles:
            h.put("state", VALUE)
        window = threading.Event()
        stop = threading.Event()
        lat: list[list[float]] = [[] for _ in range(threads)]
        errors: list[BaseException] = []

        def new(_old: Any) -> bytes:
            return VALUE

        def caller(i: int) -> None:
            h, mine = handles[i], lat[i]
            try:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    h.update("state", new)
                    if window.is_set():
                        mine.append(time.perf_counter() - t0)
            except BaseException as e:  # reported in the cell
                errors.append(e)

        ts = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(threads)]
        for t in ts:
            t.start()
        time.sleep(warmup)
        window.set()
        cpu0, t0 = time.process_time(), time.perf_counter()
        time.sleep(duration)
        window.clear()
        cpu, elapsed = time.process_time() - cpu0, time.perf_counter() - t0
        stop.set()
        for t in ts:
            t.join(60)
        stats = c.batching_stats()
    all_lat = sorted(x for xs in lat for x in xs)
    n = len(all_lat)

    def q(p: float) -> float | None:
        return all_lat[min(n - 1, int(p * n))] * 1000 if n else None

    ops = sum(s["ops"] for s in stats.values())
    batches = sum(s["batches"] for s in stats.values())
    return {"threads": threads, "batching": batching, "steps": n, "steps_s": n / elapsed,
            "p50_ms": q(0.5), "p99_ms": q(0.99), "client_cpu_us_per_step": cpu / n * 1e6 if n else None,
            "ops_per_message": ops / batches if batches else None, "errors": len(errors),
            "first_error": repr(errors[0]) if errors else ""}


def median_cell(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    rounds = sorted(rounds, key=lambda r: r["steps_s"])
    out = dict(rounds[len(rounds) // 2])
    out["rounds_steps_s"] = [round(r["steps_s"]) for r in rounds]
    out["errors"] = sum(r["errors"] for r in rounds)
    return out


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="", help="a running router (default: start `shardstate dev --port 0`)")
    p.add_argument("--threads", type=positive_ints, default=[1, 4, 16, 32])
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per cell")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default="", help="write the cells here")
    args = p.parse_args()
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1:
        p.error("--duration must be > 0, --warmup >= 0 and --rounds >= 1")
    console = Console(width=80)
    with tempfile.TemporaryDirectory() as tmp:
        dev = None
        address = args.address
        if not address:
            dev = launch.Dev(Path(tmp), port=0, log_path=Path(tmp) / "dev.log")
            address = dev.wait_router()
        try:
            got: dict[tuple[int, bool], list[dict[str, Any]]] = {}
            with console.status("measuring") as status:
                for r in range(args.rounds):
                    for threads in args.threads:
                        for batching in (False, True):
                            status.update(f"round {r + 1}/{args.rounds}: {threads} threads, "
                                          f"{'batching' if batching else 'unary'}")
                            got.setdefault((threads, batching), []).append(
                                cell(address, threads, batching, args.duration, args.warmup, f"r{r}"))
        finally:
            if dev is not None:
                dev.stop()
    cells = [median_cell(got[k]) for k in sorted(got)]
    table = Table(title=f"sync Client update() through a router, median of {args.rounds}")
    for col in ("threads", "client", "steps/s", "p50 ms", "p99 ms", "CPU µs/step", "ops/msg"):
        table.add_column(col, justify="left" if col == "client" else "right")
    for c in cells:
        table.add_row(str(c["threads"]), "batching" if c["batching"] else "unary", f"{c['steps_s']:,.0f}",
                      fmt(c["p50_ms"], ".2f"), fmt(c["p99_ms"], ".2f"), fmt(c["client_cpu_us_per_step"], ".0f"),
                      fmt(c["ops_per_message"], ".1f"))
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1))
    bad = [c for c in cells if c["errors"]]
    for c in bad:
        console.print(f"[red]{c['threads']} threads, batching={c['batching']}: {c['errors']} errors, "
                      f"first {c['first_error']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
