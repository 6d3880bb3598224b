"""Replication test helpers: waits on a node's Status, dumps of a shard's data through the State
API and from its LevelDB, a mixed write workload, and the CLI as a child process. Used by the
replication, failover, CPU-priority and fault tests."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import plyvel

from shardstate.server import launch
from shardstate.server.storage import encoding as enc
from shardstate.v1 import admin_pb2, admin_pb2_grpc, state_pb2, state_pb2_grpc, types_pb2
from tests.procs import Proc

T = 30.0  # per-call timeout: generous, the machine is shared; never asserted
WAIT_S = 90.0  # how long a test waits for a condition before failing; never asserted
SESSIONS = 500
EVENTUAL = types_pb2.EVENTUAL


def wait_for(cond: Any, what: str, timeout: float = WAIT_S, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except grpc.RpcError as e:
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last})")


def status(address: str) -> admin_pb2.NodeStatus:
    """A node's own Status line."""
    with grpc.insecure_channel(address) as ch:
        return admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=T).nodes[0]


def cluster_map(address: str) -> admin_pb2.ClusterMap:
    with grpc.insecure_channel(address) as ch:
        return admin_pb2_grpc.AdminStub(ch).GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T)


def wait_converged(primary: str, replica: str) -> int:
    """Waits until the replica applied the primary's revision; returns it."""
    def same() -> int:
        want = status(primary).revision
        return want if status(replica).revision == want else 0

    return int(wait_for(same, f"{replica} to catch up with {primary}"))


def session_ids(n: int = SESSIONS) -> list[str]:
    return [f"agent-{i:03d}" for i in range(n)]


async def _one_op(stub: state_pb2_grpc.StateStub, rng: random.Random, sid: str) -> None:
    key = f"k{rng.randrange(8)}"
    r = rng.random()
    if r < 0.35:
        await stub.Put(state_pb2.PutRequest(session_id=sid, key=key, value=rng.randbytes(rng.randrange(1, 200)),
                                            request_id=uuid.uuid4().hex if rng.random() < 0.3 else ""), timeout=T)
    elif r < 0.5:
        got = await stub.Get(state_pb2.GetRequest(session_id=sid, key=key), timeout=T)
        await stub.Put(state_pb2.PutRequest(session_id=sid, key=key, value=b"cas-%d" % rng.randrange(1000),
                                            expected_version=got.record.version if got.found else 0), timeout=T)
    elif r < 0.65:
        await stub.Increment(state_pb2.IncrementRequest(session_id=sid, key="counter", delta=rng.randrange(1, 5)), timeout=T)
    elif r < 0.85:
        await stub.Append(state_pb2.AppendRequest(session_id=sid, stream="events",
                                                  entries=[b"e%d" % i for i in range(rng.randrange(1, 4))]), timeout=T)
    elif r < 0.92:
        await stub.Delete(state_pb2.DeleteRequest(session_id=sid, key=key), timeout=T)
    elif r < 0.96:
        try:
            await stub.TrimLog(state_pb2.TrimLogRequest(session_id=sid, stream="events", keep_last=3), timeout=T)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
    elif r < 0.98:
        await stub.Touch(state_pb2.TouchRequest(session_id=sid, ttl_ms=3_600_000), timeout=T)
    else:
        await stub.DeleteSession(state_pb2.DeleteSessionRequest(session_id=sid), timeout=T)


async def workload(address: str, ops: int, seed: int, concurrency: int = 16,
                   sessions: list[str] | None = None) -> int:
    """`ops` mixed writes (put, CAS, increment, append, delete, trim, touch, drop) from
    `concurrency` concurrent callers over the sessions; returns how many ran."""
    sids = sessions or session_ids()
    done = 0
    async with grpc.aio.insecure_channel(address) as ch:
        stub = state_pb2_grpc.StateStub(ch)

        async def caller(i: int) -> None:
            nonlocal done
            rng = random.Random(seed * 1000 + i)
            for _ in range(ops // concurrency):
                sid = rng.choice(sids)
                try:
                    await _one_op(stub, rng, sid)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:  # Touch of a dropped session
                        raise
                done += 1

        await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return done


def _strip(msg: Any) -> Any:
    msg.ClearField("header")
    return msg.SerializeToString(deterministic=True)


async def _dump_async(address: str, sessions: list[str], consistency: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(address) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        sem = asyncio.Semaphore(32)

        async def one(sid: str) -> None:
            async with sem:
                recs: list[bytes] = []
                token = ""
                while True:
                    page = await stub.Scan(state_pb2.ScanRequest(session_id=sid, limit=1000, page_token=token,
                                                                  consistency=consistency), timeout=T)  # type: ignore[arg-type]
                    recs += [r.SerializeToString(deterministic=True) for r in page.records]
                    token = page.next_page_token
                    if not token:
                        break
                try:
                    log = _strip(await stub.ReadLog(state_pb2.ReadLogRequest(
                        session_id=sid, stream="events", consistency=consistency), timeout=T))  # type: ignore[arg-type]
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    log = None
                try:
                    meta = _strip(await stub.GetSession(state_pb2.GetSessionRequest(
                        session_id=sid, consistency=consistency), timeout=T))  # type: ignore[arg-type]
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    meta = None
                out[sid] = (recs, log, meta)

        await asyncio.gather(*(one(s) for s in sessions))
    return out


def dump(address: str, sessions: list[str] | None = None, consistency: int = types_pb2.STRONG) -> dict[str, Any]:
    """Every key (value, versions, expiry), the events log and the session meta of each session,
    read through the State API."""
    return asyncio.run(_dump_async(address, sessions or session_ids(), consistency))


def raw_dump(data_dir: Path) -> tuple[dict[bytes, bytes], bytes | None]:
    """All data keys of a stopped shard's LevelDB (no change log, no node meta) and its
    `_|revision`."""
    db = plyvel.DB(str(data_dir))
    try:
        data = {k: v for k, v in db.iterator() if k[:1] not in (enc.CHANGE, enc.NODE)}
        return data, db.get(enc.node_key("revision"))
    finally:
        db.close()


def log_has(p: Proc, text: str) -> bool:
    return text in p.log_path.read_text(errors="replace")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(launch.shardstate_cmd(*args), capture_output=True, text=True, timeout=120)


def audit_lines(proc: Proc) -> list[dict[str, Any]]:
    """The lines of a node's diverged-writes.jsonl (none when it has no such file)."""
    p = proc.data_dir / "diverged-writes.jsonl"  # type: ignore[attr-defined]
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
