"""The etcd backend: etcd v3 KV over grpc.aio stubs (shardstate.bench.etcd_pb), one channel.

A step (read-cas) is Range of the session's key, then Txn(compare mod_revision == seen, success
Put); a Txn that does not succeed is a conflict. Step "cached" skips the Range and CASes on the
mod_revision this client saw last (the Txn's failure branch reads the current one). etcd has no
lists, so a log entry is a key under log/<session>/ named by time and a counter, and "read the
last N" is a descending range with a limit.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from shardstate.bench.backends import CACHED_ATTEMPTS, LOAD_PARALLELISM, LOG_STREAM
from shardstate.bench.etcd_pb import rpc_pb2 as pb
from shardstate.bench.etcd_pb import rpc_pb2_grpc

CALL_TIMEOUT_S = 30.0


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key with this prefix" (the prefix with its last byte + 1)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class EtcdBackend:
    name = "etcd"

    def __init__(self, address: str, step_impl: str = "read-cas") -> None:
        self.address = address
        self.step_impl = step_impl
        self.channel = grpc.aio.insecure_channel(address)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self._seq = itertools.count()
        self._seen: dict[str, int] = {}  # cached mode: session -> mod_revision last seen
        if step_impl == "cached":
            self.step = self._step_cached  # type: ignore[method-assign]
        elif step_impl != "read-cas":
            raise ValueError(f"etcd: unknown step implementation {step_impl!r}")

    @staticmethod
    def _key(session_id: str) -> bytes:
        return f"s/{session_id}".encode()

    async def setup(self, session_ids: Sequence[str], value: bytes,
                    progress: Callable[[int], None]) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), 30)
        it = iter(session_ids)

        async def loader() -> None:
            for sid in it:
                resp = await self.kv.Put(pb.PutRequest(key=self._key(sid), value=value),
                                         timeout=CALL_TIMEOUT_S)
                self._seen[sid] = resp.header.revision  # the revision of this put = mod_revision
                progress(1)

        await asyncio.gather(*(loader() for _ in range(LOAD_PARALLELISM)))
        if self.step_impl != "cached":
            self._seen.clear()

    def _cas(self, key: bytes, seen: int, value: bytes, read_on_failure: bool) -> pb.TxnRequest:
        return pb.TxnRequest(
            # mod_revision 0 = absent: create only
            compare=[pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.MOD, key=key, mod_revision=seen)],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=value))],
            failure=[pb.RequestOp(request_range=pb.RangeRequest(key=key, keys_only=True))]
            if read_on_failure else [],
        )

    async def step(self, session_id: str, value: bytes) -> bool:
        key = self._key(session_id)
        got = await self.kv.Range(pb.RangeRequest(key=key), timeout=CALL_TIMEOUT_S)
        seen = got.kvs[0].mod_revision if got.kvs else 0
        txn = await self.kv.Txn(self._cas(key, seen, value, False), timeout=CALL_TIMEOUT_S)
        return bool(txn.succeeded)

    async def _step_cached(self, session_id: str, value: bytes) -> bool:
        key = self._key(session_id)
        seen = self._seen.get(session_id)
        if seen is None:
            got = await self.kv.Range(pb.RangeRequest(key=key, keys_only=True), timeout=CALL_TIMEOUT_S)
            seen = got.kvs[0].mod_revision if got.kvs else 0
        for _ in range(CACHED_ATTEMPTS):
            txn = await self.kv.Txn(self._cas(key, seen, value, True), timeout=CALL_TIMEOUT_S)
            if txn.succeeded:
                seen = txn.header.revision
                break
            kvs = txn.responses[0].response_range.kvs if txn.responses else []
            seen = kvs[0].mod_revision if kvs else 0
        self._seen[session_id] = seen
        return bool(txn.succeeded)

    async def read(self, session_id: str) -> bool:
        got = await self.kv.Range(pb.RangeRequest(key=self._key(session_id)), timeout=CALL_TIMEOUT_S)
        return bool(got.kvs)

    async def append(self, session_id: str, entry: bytes, last: int) -> int:
        prefix = f"log/{session_id}/{LOG_STREAM}/".encode()
        name = f"{time.time_ns():020d}-{next(self._seq):012d}".encode()
        await self.kv.Put(pb.PutRequest(key=prefix + name, value=entry), timeout=CALL_TIMEOUT_S)
        got = await self.kv.Range(pb.RangeRequest(
            key=prefix, range_end=prefix_end(prefix), limit=last,
            sort_order=pb.RangeRequest.DESCEND, sort_target=pb.RangeRequest.KEY,
        ), timeout=CALL_TIMEOUT_S)
        return len(got.kvs)

    async def close(self) -> None:
        await self.channel.close()

    def describe(self) -> dict[str, Any]:
        step = {
            "read-cas": "Range (linearizable); then Txn(compare mod_revision == seen, success Put)",
            "cached": "Txn(compare mod_revision == last seen, success Put, failure Range keys_only); "
                      "one retry from the mod_revision a lost Txn returns",
        }[self.step_impl]
        return {
            "client": f"grpcio {grpc.__version__} aio, one channel, stubs generated from a minimal rpc.proto",
            "step_impl": self.step_impl,
            "step": step,
            "read": "Range (linearizable)",
            "append": "Put log/<session>/events/<time>-<n>; then Range of the prefix, DESCEND, limit 10",
        }
