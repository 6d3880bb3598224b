"""Fuzzing at the gRPC level: random and mutated (bit-flipped, truncated, field-shuffled) valid
messages for every RPC of State and Admin, as raw bytes, against a real router with 2 shards
behind it and against one of those shards directly; and valid messages whose fields take
extreme values (0, 2^64-1, -2^63, unknown enum numbers, NUL and long strings).

Asserted: no INTERNAL or UNKNOWN status, every process alive at the end, the data stored before
read back exactly, and a normal client writing through the router meanwhile sees no error.
Seeded and bounded (about 1 300 messages).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor as FD

import shardstate
from shardstate.common.protowire import WireError, read_fields, varint
from shardstate.v1 import admin_pb2, state_pb2, types_pb2
from tests.procs import Procs
from tests.routercluster import RouterCluster, T
from tests.stubs import uid

SEED = 1313
PER_METHOD = 24  # mutated messages per method and target
EXTREMES = 80  # messages with extreme field values per target
STREAM_TIMEOUT_S = 0.5  # a valid Watch never ends by itself
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

SID = "fz-" + "q" * 12  # the fuzz's own session: far (many bits) from the sentinel's
ST = state_pb2
SEEDS: dict[str, Any] = {
    "Get": ST.GetRequest(session_id=SID, key="k", consistency=types_pb2.STRONG, min_revision=1),
    "Put": ST.PutRequest(session_id=SID, key="k", value=b"v" * 20, expected_version=0, ttl_ms=60_000, request_id="r1"),
    "Delete": ST.DeleteRequest(session_id=SID, key="k", expected_version=3),
    "Txn": ST.TxnRequest(
        session_id=SID,
        compares=[ST.Compare(result=ST.Compare.GREATER, key="k", version=1)],
        success=[ST.TxnOp(put=ST.PutRequest(key="k", value=b"t"))],
        failure=[ST.TxnOp(get=ST.GetRequest(key="k"))],
    ),
    "Increment": ST.IncrementRequest(session_id=SID, key="n", delta=-5, ttl_ms=1000),
    "Scan": ST.ScanRequest(session_id=SID, prefix="k", limit=5, page_token="k", keys_only=True),
    "Append": ST.AppendRequest(session_id=SID, stream="s", entries=[b"a", b"bb"], request_id="r2"),
    "ReadLog": ST.ReadLogRequest(session_id=SID, stream="s", from_seq=1, to_seq=9, last=2, limit=3),
    "TrimLog": ST.TrimLogRequest(session_id=SID, stream="s", before_seq=2, keep_last=1),
    "PopLast": ST.PopLastRequest(session_id=SID, stream="s"),
    "Touch": ST.TouchRequest(session_id=SID, ttl_ms=600_000),
    "DeleteSession": ST.DeleteSessionRequest(session_id=SID),
    "GetSession": ST.GetSessionRequest(session_id=SID, consistency=types_pb2.EVENTUAL),
    "ListSessions": ST.ListSessionsRequest(namespace="fz", prefix="fz", limit=3),
    "Batch": ST.BatchRequest(ops=[
        ST.BatchOp(put=ST.PutRequest(session_id=SID, key="b", value=b"1")),
        ST.BatchOp(get=ST.GetRequest(session_id=SID + "2", key="b")),
        ST.BatchOp(append=ST.AppendRequest(session_id=SID, stream="s", entries=[b"z"])),
    ]),
    "Pipeline": ST.PipelineRequest(id=7, batch=ST.BatchRequest(ops=[
        ST.BatchOp(increment=ST.IncrementRequest(session_id=SID, key="p", delta=1)),
        ST.BatchOp(read_log=ST.ReadLogRequest(session_id=SID, stream="s")),
    ])),
    "Watch": ST.WatchRequest(session_id=SID, from_revision=1, prefix="k"),
}
# Admin: the reads get every mutation; the calls that change the cluster (publish a map, add a
# shard, promote, back up to a path) only bytes that do not parse, or the fuzz would rightly
# reshape the cluster under the normal client.
AD = admin_pb2
ADMIN_READS: dict[str, Any] = {"GetClusterMap": AD.GetClusterMapRequest(), "Status": AD.StatusRequest()}
ADMIN_CHANGES: dict[str, Any] = {
    "PublishClusterMap": AD.ClusterMap(epoch=1, shards=[AD.ShardInfo(id="zz", primary="127.0.0.1:1")]),
    "AddShard": AD.AddShardRequest(id="zz", primary="127.0.0.1:1"),
    "RemoveShard": AD.RemoveShardRequest(id="zz"),
    "SetWeight": AD.SetWeightRequest(id="zz", weight=3),
    "Rebalance": AD.RebalanceRequest(),
    "PromoteReplica": AD.PromoteReplicaRequest(shard_id="zz"),
    "Backup": AD.BackupRequest(shard_id="zz"),
    "Restore": AD.BackupChunk(header=AD.BackupHeader(shard_id="zz")),
}
STREAMING_OUT = {"Watch", "Rebalance", "Backup"}
STREAMING_IN = {"Restore"}


def _encode(fields: list[tuple[int, int | bytes]], wires: dict[int, int]) -> bytes:
    out = bytearray()
    for number, value in fields:
        if isinstance(value, int):
            out += varint(number << 3) + varint(value)
        elif wires.get(number) in (1, 5):
            out += varint(number << 3 | wires[number]) + value
        else:
            out += varint(number << 3 | 2) + varint(len(value)) + value
    return bytes(out)


def mutate(data: bytes, rnd: random.Random) -> bytes:
    kind = rnd.randrange(7)
    if kind == 0 and data:  # flip 1-3 bits
        b = bytearray(data)
        for _ in range(rnd.randint(1, 3)):
            b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
        return bytes(b)
    if kind == 1 and data:  # truncate
        return data[: rnd.randrange(len(data))]
    if kind == 2:  # shuffle (and sometimes duplicate) the top-level fields
        try:
            fields = read_fields(data)
        except WireError:
            return data
        wires = {n: (1 if len(v) == 8 else 5) for n, v in fields if isinstance(v, bytes) and rnd.random() < 0.05}
        rnd.shuffle(fields)
        if fields and rnd.random() < 0.5:
            fields.append(rnd.choice(fields))
        return _encode(fields, wires)
    if kind == 3:  # random bytes
        return rnd.randbytes(rnd.randrange(1, 40))
    if kind == 4 and data:  # insert random bytes
        i = rnd.randrange(len(data) + 1)
        return data[:i] + rnd.randbytes(rnd.randint(1, 6)) + data[i:]
    if kind == 5:  # a string field's bytes made invalid UTF-8
        return data.replace(b"q", b"\xff", 1) if b"q" in data else data + b"\x12\x01\xff"
    return bytes(bytearray(data)[::-1])  # reversed


_U64 = [0, 2**32 - 1, 2**63 - 1, 2**64 - 1]
_EXTREME: dict[int, list[Any]] = {
    FD.TYPE_UINT64: _U64, FD.TYPE_FIXED64: _U64, FD.TYPE_UINT32: [0, 2**31, 2**32 - 1],
    FD.TYPE_SINT64: [-(2**63), -1, 2**63 - 1], FD.TYPE_INT64: [-(2**63), 2**63 - 1],
    FD.TYPE_INT32: [-1, 2**31 - 1], FD.TYPE_ENUM: [-1, 5, 2**31 - 1],
    FD.TYPE_STRING: ["", "\x00", "\U0010ffff", "a" * 2000], FD.TYPE_BYTES: [b"", b"\x00" * 100],
}


def extremes(msg: Any, depth: int = 0) -> list[Any]:
    """Copies of `msg` with one scalar field (also inside its sub-messages) set to an extreme."""
    out: list[Any] = []
    for f in msg.DESCRIPTOR.fields:
        if f.type == FD.TYPE_MESSAGE:
            subs = list(getattr(msg, f.name)) if f.is_repeated else (
                [getattr(msg, f.name)] if msg.HasField(f.name) else [])
            for i, sub in enumerate(subs):
                for changed in extremes(sub, depth + 1) if depth < 2 else []:
                    m = type(msg)()
                    m.CopyFrom(msg)
                    (getattr(m, f.name)[i] if f.is_repeated else getattr(m, f.name)).CopyFrom(changed)
                    out.append(m)
            continue
        if f.is_repeated:
            continue
        for v in _EXTREME.get(f.type, []):
            m = type(msg)()
            m.CopyFrom(msg)
            setattr(m, f.name, v)
            out.append(m)
    return out


def unparseable(cls: Any, rnd: random.Random) -> bytes:
    while True:
        data = rnd.randbytes(rnd.randrange(1, 30))
        try:
            cls.FromString(data)
        except Exception:
            return data


class Fuzzer:
    def __init__(self, address: str, rnd: random.Random) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.rnd = rnd
        self.sent = 0
        self.bad: list[str] = []
        self.codes: dict[str, int] = {}

    def _check(self, method: str, data: bytes, fn: Callable[[], Any]) -> None:
        self.sent += 1
        try:
            fn()
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            if code in BAD:
                self.bad.append(f"{self.address} {method} {data!r}: {code} {e.details()}")  # type: ignore[attr-defined]
        self.codes[code.name] = self.codes.get(code.name, 0) + 1

    def call(self, service: str, method: str, data: bytes) -> None:
        path = f"/shardstate.v1.{service}/{method}"
        if method == "Pipeline":
            msgs = [data, mutate(data, self.rnd), SEEDS["Pipeline"].SerializeToString()]
            call = self.channel.stream_stream(path)
            self._check(method, data, lambda: list(call(iter(msgs), timeout=T)))
        elif method in STREAMING_IN:
            call_in = self.channel.stream_unary(path)
            self._check(method, data, lambda: call_in(iter([data]), timeout=T))
        elif method in STREAMING_OUT:
            call_s = self.channel.unary_stream(path)

            def drain() -> None:
                try:
                    list(call_s(data, timeout=STREAM_TIMEOUT_S))
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                        raise

            self._check(method, data, drain)
        else:
            call_u = self.channel.unary_unary(path)
            self._check(method, data, lambda: call_u(data, timeout=T))

    def run(self) -> None:
        rnd = self.rnd
        for service, seeds, mutated in (("State", SEEDS, True), ("Admin", ADMIN_READS, True),
                                        ("Admin", ADMIN_CHANGES, False)):
            for method, seed in seeds.items():
                n = PER_METHOD // 3 if method in STREAMING_OUT else PER_METHOD
                for _ in range(n):
                    data = mutate(seed.SerializeToString(), rnd) if mutated else unparseable(type(seed), rnd)
                    self.call(service, method, data)
        pool = [(m, x) for m, seed in SEEDS.items() for x in extremes(seed)]
        for method, msg in rnd.sample(pool, EXTREMES):
            self.call("State", method, msg.SerializeToString())

    def close(self) -> None:
        self.channel.close()


def test_fuzz_router_and_shard(procs: Procs) -> None:
    c = RouterCluster(procs, shards=2, routers=1)
    router = c.routers[0].address
    try:
        # Data stored before the fuzz, through the real client.
        with shardstate.Client(router) as client:
            sentinels = {f"sentinel-{i}-{uid()}": b"precious-%d" % i for i in range(8)}
            for sid, value in sentinels.items():
                s = client.session(sid)
                s.put("k", value)
                s.append("log", [value, b"second"])

        normal_errors: list[str] = []
        acked: dict[str, bytes] = {}
        stop = threading.Event()

        def normal() -> None:
            with shardstate.Client(router) as cl:
                s = cl.session(uid("normal"))
                i = 0
                while not stop.is_set() and i < 3000:
                    try:
                        s.put(f"k{i}", b"n%d" % i)
                        acked[f"k{i}"] = b"n%d" % i
                        assert s.get(f"k{i}").value == b"n%d" % i  # type: ignore[union-attr]
                    except Exception as e:
                        normal_errors.append(repr(e))
                    i += 1
                stop.wait(0)
                acked["__session"] = s.session_id.encode()

        t = threading.Thread(target=normal)
        t.start()
        fuzzers = [Fuzzer(router, random.Random(SEED)), Fuzzer(c.shards[0].address, random.Random(SEED + 1))]
        try:
            for f in fuzzers:
                f.run()
        finally:
            stop.set()
            t.join(60)
        sent = sum(f.sent for f in fuzzers)
        print(f"fuzz: {sent} messages; " + "; ".join(f"{f.address} {sorted(f.codes.items())}" for f in fuzzers))
        assert [b for f in fuzzers for b in f.bad] == []
        assert 1000 <= sent <= 1500
        assert all(p.alive() for p in [*c.shards, *c.routers])
        for p in [*c.shards, *c.routers]:  # nothing the servers took for a bug of their own
            log = p.log_path.read_text(errors="replace")
            for sign in ("Task exception was never retrieved", "unexpected error", "internal error", "Traceback"):
                assert sign not in log, f"{p.name}: {sign}\n{p.log_tail()}"
        assert normal_errors == []
        with shardstate.Client(router) as client:
            for sid, value in sentinels.items():
                s = client.session(sid)
                rec = s.get("k")
                assert rec is not None and rec.value == value
                assert [e.data for e in s.read("log")] == [value, b"second"]
            s = client.session(acked.pop("__session").decode())
            assert acked and all(s.get(k).value == v for k, v in acked.items())  # type: ignore[union-attr]
        for f in fuzzers:
            f.close()
    finally:
        c.close()
