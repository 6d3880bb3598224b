"""`RouterCluster`: shards behind routers as real processes for the router tests (and the
calls a test makes on them; `uid`, `expect_error` and `wait_until` are tests/stubs.py's); `owners_by_reading_shards` asks each shard which sessions it owns."""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest

from shardstate.common.clustermap import ClusterView
from shardstate.v1 import admin_pb2, admin_pb2_grpc, state_pb2, state_pb2_grpc
from tests.procs import Proc, Procs

T = 30.0  # per-call timeout: generous, the machine is shared; never asserted


class Stubs:
    """Plain generated stubs (shardstate.v1 only) to one process."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.state = state_pb2_grpc.StateStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    def put(self, sid: str, key: str, value: bytes, ns: str = "", **kw: Any) -> state_pb2.PutResponse:
        return self.state.Put(state_pb2.PutRequest(namespace=ns, session_id=sid, key=key, value=value, **kw), timeout=T)

    def get(self, sid: str, key: str, ns: str = "") -> state_pb2.GetResponse:
        return self.state.Get(state_pb2.GetRequest(namespace=ns, session_id=sid, key=key), timeout=T)

    def view(self) -> ClusterView:
        return ClusterView.of(self.admin.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T))

    def list_all(self, ns: str = "", prefix: str = "", limit: int = 7) -> list[list[str]]:
        pages, token = [], ""
        while True:
            resp = self.state.ListSessions(
                state_pb2.ListSessionsRequest(namespace=ns, prefix=prefix, limit=limit, page_token=token), timeout=T
            )
            pages.append([s.session_id for s in resp.sessions])
            token = resp.next_page_token
            if not token:
                return pages
            assert len(pages) < 10_000, "ListSessions does not terminate"

    def close(self) -> None:
        self.channel.close()


class RouterCluster:
    """N shards (s1..sN) and M routers seeded with every shard, as real processes."""

    def __init__(self, procs: Procs, shards: int = 3, routers: int = 2, router_args: Sequence[str] = ()) -> None:
        self.procs = procs
        self.shards: list[Proc] = [procs.shard(f"s{i}") for i in range(1, shards + 1)]
        self.routers: list[Proc] = [self.start_router(*router_args) for _ in range(routers)]
        self.stubs: dict[str, Stubs] = {}

    def start_router(self, *args: str) -> Proc:
        return self.procs.router([s.address for s in self.shards], *args)

    def stub(self, proc: Proc | str) -> Stubs:
        addr = proc if isinstance(proc, str) else proc.address
        if addr not in self.stubs:
            self.stubs[addr] = Stubs(addr)
        return self.stubs[addr]

    def shard_stub(self, shard_id: str) -> Stubs:
        return self.stub(next(p for p in self.shards if p.args[1] == shard_id))

    def close(self) -> None:
        for s in self.stubs.values():
            s.close()
        self.stubs.clear()


def cluster_fixture(scope: str = "module", router_variants: Sequence[Sequence[str]] = ((),), **kw: Any) -> Any:
    """A cluster shared by `scope`; one per router flag set in `router_variants`."""

    @pytest.fixture(scope=scope, params=list(router_variants),  # type: ignore[call-overload]
                    ids=lambda v: " ".join(v) or "defaults")
    def _fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterCluster]:
        procs = Procs(tmp_path_factory.mktemp("cluster"))
        try:
            c = RouterCluster(procs, router_args=request.param, **kw)
            yield c
            c.close()
        finally:
            procs.close()

    return _fixture


def owners_by_reading_shards(c: RouterCluster, sids: Sequence[str], key: str, ns: str = "") -> dict[str, list[str]]:
    """For each session, the shards that answer a direct read of `key` with the record
    (the others must answer WrongShard): read with one direct Batch per shard."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    ops = [state_pb2.BatchOp(get=state_pb2.GetRequest(namespace=ns, session_id=s, key=key)) for s in sids]
    for shard in c.shards:
        sid_ = shard.args[1]
        resp = c.stub(shard).state.Batch(state_pb2.BatchRequest(ops=ops), timeout=T)
        assert len(resp.results) == len(sids)
        for s, r in zip(sids, resp.results, strict=True):
            if r.code == 0:
                assert r.get.found, (s, sid_)
                found[s].append(sid_)
            else:
                assert r.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], (r.code, r.message)
                assert r.HasField("wrong_shard"), r
    return found
