"""One-shard benchmark: Get and CAS Put throughput, p50/p99 latency and the shard's CPU per op,
at several client concurrencies, over loopback with plain grpc.aio stubs (no client library).

    .venv/bin/python benchmarks/shard_bench.py                      # starts its own shard
    .venv/bin/python benchmarks/shard_bench.py --duration 2 --sessions 2000
    .venv/bin/python benchmarks/shard_bench.py --address 127.0.0.1:7401 --pid 1234
    .venv/bin/python benchmarks/shard_bench.py --baseline   # also a no-op grpc.aio server
    .venv/bin/python benchmarks/shard_bench.py --pipeline 1,4,16,64 --request-ids

Each cell runs a short warm-up, then `--duration` seconds of measurement. CPU comes from
/proc/<pid>/stat (utime + stime) of the shard before and after the measured window.

--pipeline N,...: cells of one Pipeline stream with one message in flight, N ops per message
(each on another session), as a router or the client library sends them; then a least-squares
fit of the shard's CPU per message as `a + b * N`: what a message costs whatever it holds (a)
and what each op in it adds (b). --request-ids gives every CAS a request_id, as the client
library does (the shard then stores an idempotency record with each write).
"""

from __future__ import annotations

import shardstate.bench  # noqa: F401  (first: chooses grpc's transport before grpc loads)

# isort: split

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc
from rich.console import Console
from rich.table import Table

from shardstate.bench.cas import cas_request, note_cas
from shardstate.common import portfile
from shardstate.server import launch
from shardstate.v1 import state_pb2, state_pb2_grpc

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Cell:
    server: str  # "shard", or "no-op" for the bare grpc.aio floor
    op: str
    concurrency: int
    ops: int
    seconds: float
    p50_ms: float
    p99_ms: float
    shard_cpu_us_per_op: float | None
    client_cpu_us_per_op: float
    shard_cores: float | None
    conflicts: int
    errors: int
    ops_per_message: int = 0  # --pipeline cells: ops per Pipeline message (0: unary calls)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0


# ---- the shard process ----


class NoopNode(launch.Node):
    """serve_noop below in its own process, started and health-checked like a shard."""

    def command(self, listen: str, extra: Sequence[str] = ()) -> list[str]:
        return [sys.executable, __file__, "--serve-noop", str(self.port_file)]


class ShardProc:
    """A shard on 127.0.0.1:0 in a temporary data directory, stopped with SIGTERM at the end."""

    def __init__(self, extra: list[str], noop: bool = False) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="shard-bench-")
        d = Path(self.tmp.name)
        kind = NoopNode if noop else launch.Node
        self.node = kind("shard", ["--id", "bench", "--data-dir", str(d / "data"), *extra],
                         port_file=d / "port", log_path=d / "shard.log")
        self.node.start(wait=False)

    @property
    def pid(self) -> int:
        return self.node.pid

    def wait_ready(self, timeout: float = 60.0) -> str:
        self.node.wait_ready(timeout)
        return self.node.address

    def stop(self) -> None:
        self.node.stop(30)
        self.tmp.cleanup()


async def serve_noop(port_file: str) -> None:
    """The floor: a grpc.aio State server answering Get/Put/Batch with canned replies and no
    storage, so the shard's figures can be read as gRPC cost + shard cost."""
    from grpc_health.v1 import health

    class Noop(state_pb2_grpc.StateServicer):
        async def Get(self, req: state_pb2.GetRequest, ctx: object) -> state_pb2.GetResponse:
            rec = {"key": req.key, "value": NOOP_VALUE, "version": 1}
            return state_pb2.GetResponse(found=True, record=rec)

        async def Put(self, req: state_pb2.PutRequest, ctx: object) -> state_pb2.PutResponse:
            return state_pb2.PutResponse(applied=True, version=req.expected_version + 1)

        async def Batch(self, req: state_pb2.BatchRequest, ctx: object) -> state_pb2.BatchResponse:
            put = state_pb2.PutResponse(applied=True, version=1)
            return state_pb2.BatchResponse(
                results=[state_pb2.BatchResult(put=put) for _ in req.ops]
            )

    server = grpc.aio.server()
    state_pb2_grpc.add_StateServicer_to_server(Noop(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    portfile.write(port_file, port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


NOOP_VALUE = b"x" * 1024


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds (None when /proc is not readable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state) of proc(5)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---- load and measure ----


async def load_sessions(
    stub: state_pb2_grpc.StateStub, sids: list[str], value: bytes
) -> dict[str, int]:
    versions: dict[str, int] = {}
    for start in range(0, len(sids), 500):
        chunk = sids[start : start + 500]
        ops = [
            state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=s, key="state", value=value))
            for s in chunk
        ]
        resp = await stub.Batch(state_pb2.BatchRequest(ops=ops), timeout=60)
        for s, r in zip(chunk, resp.results, strict=True):
            if r.code != 0:
                raise RuntimeError(f"load failed for {s}: {r.code} {r.message}")
            versions[s] = r.put.version
    return versions


@dataclass
class Load:
    """What every cell of a run shares: the sessions (loaded) and their last known versions,
    the value written, the timing, the shard's pid (CPU figures) and whether CAS carries ids."""

    sids: list[str]
    versions: dict[str, int]
    value: bytes
    duration: float
    warmup: float
    pid: int | None
    rid: bool


async def run_pipeline_cell(
    stub: state_pb2_grpc.StateStub, op: str, per_message: int, load: Load
) -> Cell:
    """One Pipeline stream, one message of `per_message` ops in flight (distinct sessions)."""
    sids, versions, value, pid, rid = load.sids, load.versions, load.value, load.pid, load.rid
    rng = random.Random(per_message)
    outbox: asyncio.Queue[state_pb2.PipelineRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[state_pb2.PipelineRequest]:
        while (item := await outbox.get()) is not None:
            yield item

    call = stub.Pipeline(requests())
    lat: list[float] = []
    counters = {"conflicts": 0, "errors": 0}
    n_ops = 0

    async def one(mid: int, measuring: bool) -> None:
        nonlocal n_ops
        chosen = rng.sample(sids, min(per_message, len(sids)))
        req = state_pb2.PipelineRequest(id=mid)
        for sid in chosen:
            if op == "get":
                req.batch.ops.add(get=state_pb2.GetRequest(session_id=sid, key="state"))
            else:
                req.batch.ops.add(put=cas_request(sid, value, versions[sid], rid))
        t0 = time.perf_counter()
        await outbox.put(req)
        resp = await call.read()
        took = time.perf_counter() - t0
        errors = conflicts = 0
        if resp.code:
            errors = len(chosen)
        else:
            for sid, r in zip(chosen, resp.batch.results, strict=True):
                if r.code:
                    errors += 1
                elif op != "get":
                    conflicts += note_cas(versions, sid, r.put)  # in warm-up too: versions stay current
        if measuring:
            lat.append(took)
            n_ops += len(chosen)
            counters["errors"] += errors
            counters["conflicts"] += conflicts

    mid = 0
    end = time.monotonic() + load.warmup
    while time.monotonic() < end:
        mid += 1
        await one(mid, False)
    cpu0, ccpu0, t0 = cpu_seconds(pid) if pid else None, time.process_time(), time.monotonic()
    end = t0 + load.duration
    while time.monotonic() < end:
        mid += 1
        await one(mid, True)
    elapsed = time.monotonic() - t0
    cpu1, ccpu1 = cpu_seconds(pid) if pid else None, time.process_time()
    await outbox.put(None)
    await call.read()  # EOF: the shard ends the stream once the half-close reaches it
    return measured(op, 1, n_ops, lat, elapsed, (cpu0, cpu1), ccpu1 - ccpu0, counters, per_message)


def measured(op: str, conc: int, ops: int, lat: list[float], elapsed: float,
             shard_cpu_s: tuple[float | None, float | None], client_cpu: float,
             counters: dict[str, int], per_message: int = 0) -> Cell:
    """A cell from what a run measured: latencies (per call or message), the shard's CPU
    seconds before and after (None: not readable), the client's CPU seconds."""
    lat.sort()
    n = len(lat)

    def pct(q: float) -> float:
        return lat[min(n - 1, int(q * n))] * 1000 if n else 0.0

    cpu0, cpu1 = shard_cpu_s
    shard_cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
    return Cell(
        server="shard",
        op=op,
        concurrency=conc,
        ops=ops,
        seconds=elapsed,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        shard_cpu_us_per_op=(shard_cpu / ops * 1e6) if shard_cpu is not None and ops else None,
        client_cpu_us_per_op=(client_cpu / ops * 1e6) if ops else 0.0,
        shard_cores=(shard_cpu / elapsed) if shard_cpu is not None else None,
        conflicts=counters["conflicts"],
        errors=counters["errors"],
        ops_per_message=per_message,
    )


def fit(cells: list[Cell]) -> dict[str, tuple[float, float]]:
    """Per op kind with two or more --pipeline cells: (CPU µs per message, per op in it), the
    least-squares line through each cell's CPU per message against its ops per message."""
    out: dict[str, tuple[float, float]] = {}
    for op in sorted({c.op for c in cells if c.ops_per_message}):
        pts = [(c.ops_per_message, c.shard_cpu_us_per_op * c.ops_per_message) for c in cells
               if c.op == op and c.ops_per_message and c.shard_cpu_us_per_op is not None]
        if len({x for x, _ in pts}) < 2:
            continue
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        out[op] = (my - b * mx, b)
    return out


async def run_cell(
    stub: state_pb2_grpc.StateStub, op: str, conc: int, load: Load
) -> Cell:
    sids, versions, value, pid, rid = load.sids, load.versions, load.value, load.pid, load.rid
    lat: list[float] = []
    counters = {"conflicts": 0, "errors": 0}
    measuring = False
    stop_at = 0.0

    async def worker(w: int) -> None:
        rng = random.Random(w)
        mine = sids[w::conc] or sids  # CAS: each worker is the single writer of its sessions
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                if op == "get":
                    await stub.Get(
                        state_pb2.GetRequest(session_id=rng.choice(sids), key="state"), timeout=30
                    )
                else:
                    sid = rng.choice(mine)
                    r = await stub.Put(
                        cas_request(sid, value, versions[sid], rid),
                        timeout=30,
                    )
                    if note_cas(versions, sid, r) and measuring:
                        counters["conflicts"] += 1
            except grpc.RpcError:
                if measuring:
                    counters["errors"] += 1
                continue
            if measuring:
                lat.append(time.perf_counter() - t0)

    # warm-up then measure, with the same workers running throughout
    stop_at = float("inf")
    tasks = [asyncio.create_task(worker(w)) for w in range(conc)]
    await asyncio.sleep(load.warmup)
    cpu0 = cpu_seconds(pid) if pid else None
    ccpu0 = time.process_time()
    t0 = time.monotonic()
    measuring = True
    await asyncio.sleep(load.duration)
    measuring = False
    elapsed = time.monotonic() - t0
    cpu1 = cpu_seconds(pid) if pid else None
    ccpu1 = time.process_time()
    stop_at = 0.0
    await asyncio.gather(*tasks)
    return measured(op, conc, len(lat), lat, elapsed, (cpu0, cpu1), ccpu1 - ccpu0, counters)


async def bench(args: argparse.Namespace, address: str, pid: int | None) -> list[Cell]:
    value = os.urandom(args.value_bytes)
    sids = [f"bench-{i:06d}" for i in range(args.sessions)]
    cells: list[Cell] = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        versions = await load_sessions(stub, sids, value)
        load = Load(sids, versions, value, args.duration, args.warmup, pid, args.request_ids)
        for op in args.ops.split(","):
            if args.pipeline:
                for per in (int(n) for n in args.pipeline.split(",")):
                    cells.append(await run_pipeline_cell(stub, op, per, load))
                continue
            for conc in (int(c) for c in args.concurrency.split(",")):
                cells.append(await run_cell(stub, op, conc, load))
    return cells


def render(cells: list[Cell], args: argparse.Namespace, address: str) -> None:
    t = Table(
        title=f"shard {address}: {args.sessions} sessions, {args.value_bytes} B values, "
        f"{args.duration:g} s per cell, grpc.aio "
        + ("Pipeline, one message in flight" if args.pipeline else "unary stubs")
        + (", request ids" if args.request_ids else "")
    )
    for col in (
        "server",
        "op",
        "ops/msg" if args.pipeline else "conc",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "server CPU µs/op",
        "server cores",
        "client CPU µs/op",
        "ops",
        "conflicts",
        "errors",
    ):
        t.add_column(col, justify="left" if col in ("server", "op") else "right")
    for c in cells:
        t.add_row(
            c.server,
            "Get" if c.op == "get" else "CAS Put",
            str(c.ops_per_message if args.pipeline else c.concurrency),
            f"{c.ops_per_s:,.0f}",
            f"{c.p50_ms:.2f}",
            f"{c.p99_ms:.2f}",
            f"{c.shard_cpu_us_per_op:.0f}" if c.shard_cpu_us_per_op is not None else "-",
            f"{c.shard_cores:.2f}" if c.shard_cores is not None else "-",
            f"{c.client_cpu_us_per_op:.0f}",
            str(c.ops),
            str(c.conflicts),
            str(c.errors),
        )
    console = Console()
    console.width = max(console.width, 150)  # a pipe or CI log is 80 wide: keep one row per cell
    console.print(t)
    for op, (per_msg, per_op) in fit(cells).items():
        console.print(f"{'Get' if op == 'get' else 'CAS Put'}: shard CPU per Pipeline message "
                      f"{per_msg:.0f} µs + {per_op:.1f} µs per op in it (least squares)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--address", default="", help="bench a running shard instead of starting one")
    ap.add_argument(
        "--pid", type=int, default=0, help="pid of the shard at --address, for its CPU figures"
    )
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--value-bytes", type=int, default=1024)
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each cell")
    ap.add_argument("--concurrency", default="1,32", help="comma-separated in-flight requests")
    ap.add_argument("--ops", default="get,cas", help="comma-separated: get, cas")
    ap.add_argument("--pipeline", default="",
                    help="comma-separated ops per Pipeline message: one stream, one message in "
                    "flight (instead of --concurrency unary calls)")
    ap.add_argument("--request-ids", action="store_true",
                    help="a request_id on every CAS, as the client library sends")
    ap.add_argument(
        "--shard-arg", action="append", default=[], help="extra flag for the started shard"
    )
    ap.add_argument("--json", default="", help="also write the cells to this JSON file")
    ap.add_argument(
        "--baseline",
        action="store_true",
        help="also run the cells against a no-op grpc.aio server (the floor of a unary call)",
    )
    ap.add_argument("--serve-noop", default="", help=argparse.SUPPRESS)  # internal: the floor
    args = ap.parse_args(argv)
    if args.pipeline and not all(n.isdigit() and int(n) > 0 for n in args.pipeline.split(",")):
        ap.error(f"--pipeline: comma-separated ops per message, each at least 1 (got {args.pipeline!r})")
    if args.serve_noop:
        asyncio.run(serve_noop(args.serve_noop))
        return 0

    proc: ShardProc | None = None
    try:
        if args.address:
            address, pid = args.address, (args.pid or None)
        else:
            proc = ShardProc(args.shard_arg)
            address, pid = proc.wait_ready(), proc.pid
        cells = asyncio.run(bench(args, address, pid))
    finally:
        if proc is not None:
            proc.stop()
    if args.baseline:
        noop = ShardProc([], noop=True)
        try:
            floor = asyncio.run(bench(args, noop.wait_ready(), noop.pid))
        finally:
            noop.stop()
        for c in floor:
            c.server = "no-op"
        cells += floor
    render(cells, args, address)
    if args.json:
        Path(args.json).write_text(
            json.dumps([asdict(c) | {"ops_per_s": c.ops_per_s} for c in cells], indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
