"""LevelDB alone with a shard's write pattern: CPU per write, flushes and compactions included,
for several table block sizes (and write-buffer / table-file sizes).

Each write is what a CAS step stores on a primary: the record (1 KiB value, 10 000 sessions),
the session meta, an idempotency record and its expiry-index key, and the change-log entry
(sequential key, the value again), with the shard's own key encoding; a WriteBatch holds 11 such writes plus `_|revision`, as a
shard's grouped batch does. CPU is the process's (every LevelDB thread included), measured
until the background compactions have finished.

    .venv/bin/python benchmarks/leveldb_blocks.py                    # 4, 16, 32, 64 KiB blocks
    .venv/bin/python benchmarks/leveldb_blocks.py --writes 400000 --block-kib 4,32
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import struct
import tempfile
import time

import plyvel
from rich.console import Console
from rich.table import Table

from shardstate.server.storage import encoding as enc

MB = 1 << 20
PER_BATCH = 11


def run(block_kib: int, writes: int, write_buffer_mb: int, file_mb: int) -> dict[str, float]:
    d = tempfile.mkdtemp(prefix="leveldb-blocks-")
    try:
        db = plyvel.DB(d, create_if_missing=True, write_buffer_size=write_buffer_mb * MB,
                       lru_cache_size=64 * MB, bloom_filter_bits=10, block_size=block_kib * 1024,
                       max_file_size=file_mb * MB, compression=None)
        value, entry = os.urandom(1056), os.urandom(1321)
        rng = random.Random(1)
        rev = 1 << 60
        revision_key = enc.node_key("revision")
        t0, w0 = time.process_time(), time.perf_counter()
        for _ in range(0, writes, PER_BATCH):
            wb = db.write_batch()
            for _ in range(PER_BATCH):
                rev += 1
                sid = b"agent-%d" % rng.randrange(10_000)
                rid = rng.randbytes(8).hex().encode()
                wb.put(enc.data_key(b"default", sid, b"state"), value)
                wb.put(enc.meta_key(b"default", sid), value[:29])
                wb.put(enc.idempotency_key(b"default", sid, rid), value[:21])
                wb.put(enc.idempotency_expiry_key(rev >> 20, b"default", sid, rid), b"")
                wb.put(enc.change_key(rev), entry)
            wb.put(revision_key, struct.pack(">Q", rev))
            wb.write()
        writing = time.process_time() - t0
        last = -1.0
        while True:  # until the background thread stops using CPU: compactions done
            time.sleep(1)
            now = time.process_time()
            if now - last < 0.02:
                break
            last = now
        total = time.process_time() - t0
        db.close()
        return {"us_per_write": total / writes * 1e6, "us_while_writing": writing / writes * 1e6,
                "wall_s": time.perf_counter() - w0}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--writes", type=int, default=400_000)
    p.add_argument("--block-kib", default="4,16,32,64", help="comma-separated block sizes to compare")
    p.add_argument("--write-buffer-mb", type=int, default=32)
    p.add_argument("--file-mb", type=int, default=2, help="LevelDB max_file_size")
    a = p.parse_args()
    console = Console()
    table = Table(title=f"LevelDB, {a.writes:,} shard writes, write buffer {a.write_buffer_mb} MiB")
    for col in ("block", "CPU µs / write (all threads)", "while writing", "wall s"):
        table.add_column(col, justify="right")
    for kib in (int(x) for x in a.block_kib.split(",")):
        with console.status(f"block {kib} KiB: writing {a.writes:,} and waiting for compactions"):
            r = run(kib, a.writes, a.write_buffer_mb, a.file_mb)
        table.add_row(f"{kib} KiB", f"{r['us_per_write']:.1f}", f"{r['us_while_writing']:.1f}", f"{r['wall_s']:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
