"""A primary's CAS write path in-process: `StateService.batch` on a real LevelDB, no gRPC, CPU per
op of the calling thread and of the whole process (LevelDB's flush and compaction thread too).

    .venv/bin/python benchmarks/write_path.py                         # 100 000 CAS per cell
    .venv/bin/python benchmarks/write_path.py --ops 200000 --write-buffer-mib 4
    .venv/bin/python benchmarks/write_path.py --json cells.json

Each op is a CAS Put of `--value-bytes` on key "state" of one of `--sessions` sessions, from
the version the last answer gave, with a request_id as the client library sends, in batches of
`--batch` ops on distinct sessions (what a router's Pipeline message holds). Cells, run one
after the other on fresh data directories:

- sessions in order (s0..s15, s16..s31, ...) or at random, as clients pick them;
- with or without the change-log tail a primary keeps for its replicas and watches
  (`changelog.keep_tail`, on whenever a shard is a primary).

Only the batches are timed; building the requests is not. What this leaves out of a shard's
cost is gRPC and the Pipeline stream: `shard_bench.py --pipeline` measures those.
"""

from __future__ import annotations

import shardstate.bench  # noqa: F401  (first: chooses grpc's transport before grpc loads)

# isort: split

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shardstate.bench.cas import cas_request, note_cas
from shardstate.common.errors import InvalidArgumentError
from shardstate.server.config import ShardConfig
from shardstate.server.node import Node
from shardstate.server.service import StateService
from shardstate.server.storage import changelog
from shardstate.server.storage.engine import Engine
from shardstate.v1 import state_pb2


@dataclass
class Cell:
    order: str  # "in order" or "random"
    tail: bool
    ops: int
    conflicts: int
    errors: int
    thread_us_per_op: float  # the thread running the batches
    process_us_per_op: float  # every thread of the process


def batch_of(sids: list[str], versions: dict[str, int], value: bytes) -> state_pb2.BatchRequest:
    return state_pb2.BatchRequest(ops=[state_pb2.BatchOp(put=cas_request(sid, value, versions[sid], True))
                                       for sid in sids])


async def run_cell(args: argparse.Namespace, order: str, tail: bool) -> Cell:
    d = tempfile.mkdtemp(prefix="write-path-")
    try:
        engine = Engine.open(ShardConfig(id="bench", data_dir=d, write_buffer_mib=args.write_buffer_mib))
        svc = StateService(engine, Node("bench", engine))
        if tail:
            changelog.keep_tail(engine.store, True)
        sids = [f"s{i}" for i in range(args.sessions)]
        versions: dict[str, int] = {}
        for start in range(0, len(sids), args.batch):  # load: one record per session
            chunk = sids[start:start + args.batch]
            req = state_pb2.BatchRequest()
            for sid in chunk:
                req.ops.add(put=state_pb2.PutRequest(session_id=sid, key="state", value=args.value))
            for sid, r in zip(chunk, (await svc.batch(req)).results, strict=True):
                versions[sid] = r.put.version
        rng = random.Random(1)
        n_batches = args.ops // args.batch
        # Warm-up (a tenth, unmeasured), then the measured batches.
        conflicts = errors = done = 0
        thread = process = 0.0
        for k in range(n_batches // 10 + n_batches):
            if order == "random":
                chosen = rng.sample(sids, args.batch)
            else:
                first = k * args.batch % len(sids)
                chosen = [sids[(first + i) % len(sids)] for i in range(args.batch)]
            req = batch_of(chosen, versions, args.value)
            t0, p0 = time.thread_time(), time.process_time()
            resp = await svc.batch(req)
            t1, p1 = time.thread_time(), time.process_time()
            measuring = k >= n_batches // 10
            for sid, r in zip(chosen, resp.results, strict=True):
                if r.code:
                    errors += measuring
                    continue
                conflicts += note_cas(versions, sid, r.put) and measuring
            if measuring:
                thread += t1 - t0
                process += p1 - p0
                done += len(chosen)
        await engine.close()
        return Cell(order, tail, done, conflicts, errors, 1e6 * thread / done, 1e6 * process / done)
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def bench(args: argparse.Namespace) -> list[Cell]:
    cells = []
    for order in ("in order", "random"):
        for tail in (False, True):
            cells.append(await run_cell(args, order, tail))
    return cells


def render(cells: list[Cell], args: argparse.Namespace) -> None:
    t = Table(title=f"CAS Put in-process, {args.batch} per batch, {len(args.value)} B values, "
                    f"{args.sessions} sessions, memtable {args.write_buffer_mib} MiB")
    for col in ("sessions", "tail", "ops", "µs/op thread", "µs/op process", "conflicts", "errors"):
        t.add_column(col, justify="left" if col in ("sessions", "tail") else "right")
    for c in cells:
        t.add_row(c.order, "on" if c.tail else "off", str(c.ops), f"{c.thread_us_per_op:.1f}",
                  f"{c.process_us_per_op:.1f}", str(c.conflicts), str(c.errors))
    Console().print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=100_000, help="measured CAS per cell")
    ap.add_argument("--sessions", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=16, help="ops per batch, each on another session")
    ap.add_argument("--value-bytes", type=int, default=1024)
    ap.add_argument("--write-buffer-mib", type=int, default=ShardConfig.write_buffer_mib,
                    help="LevelDB's memtable (the shard's --write-buffer-mib)")
    ap.add_argument("--json", default="", help="also write the cells to this JSON file")
    args = ap.parse_args(argv)
    if not 1 <= args.batch <= args.sessions:
        ap.error(f"--batch must be between 1 and --sessions ({args.sessions}), got {args.batch}")
    if args.ops < args.batch:
        ap.error(f"--ops must be at least --batch ({args.batch}), got {args.ops}")
    try:
        ShardConfig(id="bench", data_dir="-", write_buffer_mib=args.write_buffer_mib).validate()
    except InvalidArgumentError as e:
        ap.error(e.message)
    args.value = b"x" * args.value_bytes
    cells = asyncio.run(bench(args))
    render(cells, args)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(c) for c in cells], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
