"""A poison client beside normal ones, through one router in front of 2 shards.

The poison client sends, raw: unary Puts whose session id is not UTF-8, Batches holding an op
that does not parse and one with a bad session id, oversize values and requests a few bytes
under the router's receive limit (over the shard's once framed), unknown enum values
(`consistency`, a Txn compare's `result`), and the same over the router's Pipeline stream.
The router coalesces every caller's ops into shared shard messages, so before issue 13 one
bad op failed the good ops it shared a message with.

The normal callers use the real client library: `shardstate.Client`, and `AsyncClient` with
batching on. They see zero errors, every acknowledged write reads back exactly once, and the
poison client gets INVALID_ARGUMENT / RESOURCE_EXHAUSTED, never INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc

import shardstate
from shardstate.v1 import state_pb2
from tests.faults.report import Tally, fault_line
from tests.procs import Procs
from tests.routercluster import RouterCluster, T
from tests.stubs import uid

ROUNDS = 40  # poison rounds, each a handful of bad calls
SYNC_WRITES = 300
ASYNC_WRITES = 600  # in waves of 30 concurrent ops: batched into Pipeline messages
MiB = 1024 * 1024
EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
ST = state_pb2

BAD_SID_PUT = b"\x12\x02\xff\xfe\x1a\x01k"  # PutRequest{session_id=<not UTF-8>, key="k"}
BAD_SID_OP = b"\x12" + bytes([len(BAD_SID_PUT)]) + BAD_SID_PUT  # BatchOp{put=...}
TRUNCATED_OP = b"\x12\x09a"  # BatchOp{put: claims 9 bytes, has 1}


def _framed(field: int, payload: bytes) -> bytes:
    from shardstate.common.protowire import varint

    return varint(field << 3 | 2) + varint(len(payload)) + payload


class Poison:
    """Bad calls in a loop; counts what came back by status."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
        self.codes: dict[str, int] = {}
        self.unexpected: list[str] = []
        self.calls = 0

    def _seen(self, code: grpc.StatusCode, what: str, details: str = "") -> None:
        self.calls += 1
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        if code not in EXPECTED:
            self.unexpected.append(f"{what}: {code.name} {details}")

    def unary(self, method: str, data: bytes) -> None:
        try:
            self.channel.unary_unary(f"/shardstate.v1.State/{method}")(data, timeout=T)
            self._seen(grpc.StatusCode.OK, method)
        except grpc.RpcError as e:
            self._seen(e.code(), method, e.details())  # type: ignore[attr-defined]

    def batch_results(self, results: Any, what: str) -> None:
        for r in results:
            if r.code:  # the good op in the poison batch may succeed; bad ones must fail alone
                self._seen(grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == r.code)), what, r.message)

    def run(self) -> None:
        sid = uid("poison")
        good = ST.BatchOp(put=ST.PutRequest(session_id=sid, key="g", value=b"g")).SerializeToString()
        bad_batch = b"".join(_framed(1, op) for op in (good, TRUNCATED_OP, BAD_SID_OP))
        big = ST.PutRequest(session_id=sid, key="big", value=b"x" * (MiB + 10)).SerializeToString()
        # Requests the router takes (up to max_request_bytes + 64 KiB) that the shard would
        # not once framed in its Pipeline message: refused by the router, alone.
        receive = 4 * MiB + 64 * 1024
        n = len(ST.PutRequest(session_id=sid, key="huge", value=b"x" * (receive - 64)).SerializeToString())
        huge = [ST.PutRequest(session_id=sid, key="huge", value=b"x" * (receive - 64 + receive - n - k)).SerializeToString()
                for k in range(10)]
        get7 = ST.GetRequest(session_id=sid, key="k", consistency=7).SerializeToString()  # type: ignore[arg-type]
        txn9 = ST.TxnRequest(session_id=sid, compares=[ST.Compare(result=9, key="k", version=1)],  # type: ignore[arg-type]
                             success=[ST.TxnOp(put=ST.PutRequest(key="k", value=b"t"))]).SerializeToString()
        pipe = self.channel.stream_stream("/shardstate.v1.State/Pipeline")
        for i in range(ROUNDS):
            self.unary("Put", BAD_SID_PUT)
            self.unary("Get", get7)
            self.unary("Txn", txn9)
            if i % 4 == 0:
                self.unary("Put", big)
                self.unary("Put", huge[i // 4 % len(huge)])
            try:
                resp = ST.BatchResponse.FromString(
                    self.channel.unary_unary("/shardstate.v1.State/Batch")(bad_batch, timeout=T))
                assert [r.code == 0 for r in resp.results] == [True, False, False], resp
                self.batch_results(resp.results, "Batch")
            except grpc.RpcError as e:
                self._seen(e.code(), "Batch", e.details())  # type: ignore[attr-defined]
            msgs = [_framed(2, bad_batch) + b"\x08" + bytes([i + 1]), b"\xff\xff\xff", _framed(2, _framed(1, BAD_SID_OP))]
            try:
                for raw in pipe(iter(msgs), timeout=T):
                    r = ST.PipelineResponse.FromString(raw)
                    if r.code:
                        self._seen(grpc.StatusCode.INVALID_ARGUMENT if r.code == 3 else grpc.StatusCode.UNKNOWN,
                                   "Pipeline message", r.message)
                    else:
                        self.batch_results(r.batch.results, "Pipeline op")
            except grpc.RpcError as e:
                self._seen(e.code(), "Pipeline stream", e.details())  # type: ignore[attr-defined]

    def close(self) -> None:
        self.channel.close()


def test_poison_client_beside_normal_clients(procs: Procs) -> None:
    c = RouterCluster(procs, shards=2, routers=1)
    router = c.routers[0].address
    tally = Tally("poison-client")
    errors: list[str] = []
    acked: dict[tuple[str, str], bytes] = {}
    appended: dict[str, list[bytes]] = {}
    try:
        poison = Poison(router)

        def sync_writer() -> None:
            with shardstate.Client(router) as cl:
                sessions = [cl.session(uid("sync")) for _ in range(4)]
                for i in range(SYNC_WRITES):
                    s = sessions[i % len(sessions)]
                    try:
                        s.put(f"k{i}", b"s%d" % i)
                        acked[(s.session_id, f"k{i}")] = b"s%d" % i
                        s.append("log", [b"e%d" % i])
                        appended.setdefault(s.session_id, []).append(b"e%d" % i)
                    except Exception as e:
                        errors.append(f"sync: {e!r}")

        async def async_writer() -> None:
            async with shardstate.AsyncClient(router, batching=True) as cl:
                sessions = [cl.session(uid("async")) for _ in range(8)]

                async def one(i: int) -> None:
                    s = sessions[i % len(sessions)]
                    try:
                        await s.put(f"a{i}", b"a%d" % i)
                        acked[(s.session_id, f"a{i}")] = b"a%d" % i
                    except Exception as e:
                        errors.append(f"async: {e!r}")

                for wave in range(0, ASYNC_WRITES, 30):
                    await asyncio.gather(*(one(i) for i in range(wave, wave + 30)))

        threads = [threading.Thread(target=poison.run), threading.Thread(target=sync_writer),
                   threading.Thread(target=lambda: asyncio.run(async_writer()))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not any(t.is_alive() for t in threads)

        tally.acked = len(acked) + sum(len(v) for v in appended.values())
        tally.caller_errors = len(errors)
        with shardstate.Client(router) as cl:
            for (sid, key), value in acked.items():
                rec = cl.session(sid).get(key)
                if rec is None or rec.value != value:
                    tally.lost += 1
            for sid, entries in appended.items():
                got = [e.data for e in cl.session(sid).read("log")]
                tally.lost += len(set(entries) - set(got))
                tally.duplicated += len(got) - len(set(got))
        tally.note = f"poison_calls={poison.calls} poison_unexpected={len(poison.unexpected)}"
        fault_line(tally)
        poison.close()
        assert errors == [], errors[:5]
        assert poison.unexpected == [], poison.unexpected[:5]
        assert tally.acked == 2 * SYNC_WRITES + ASYNC_WRITES
        assert (tally.lost, tally.duplicated, tally.caller_errors) == (0, 0, 0)
        assert poison.calls >= ROUNDS * 8
        assert poison.codes.get("RESOURCE_EXHAUSTED", 0) >= ROUNDS // 2
        assert all(p.alive() for p in [*c.shards, *c.routers])
        for p in [*c.shards, *c.routers]:  # e.g. the router's shard writer dying on a bad answer
            log = p.log_path.read_text(errors="replace")
            assert "Task exception was never retrieved" not in log and "Traceback" not in log, p.log_tail()
    finally:
        c.close()
