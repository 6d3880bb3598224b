"""Per-namespace limits (issue 19) against real processes: two shards and a router with a token
file holding [namespace.X] limits. Over max_ops_per_s an op gets RESOURCE_EXHAUSTED naming the
limit, a throttled tenant leaves another's calls alone, and max_sessions / max_bytes refuse the
write that would pass them, storing nothing. Counts are asserted, never durations."""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from shardstate import NO_RETRY, AsyncClient, Client, Retry
from shardstate.common import errors
from shardstate.common.authwire import with_token
from shardstate.v1 import replication_pb2, replication_pb2_grpc, state_pb2, state_pb2_grpc
from tests.authcluster import CLUSTER_TOKEN, AuthCluster
from tests.procs import Proc, Procs
from tests.stubs import uid, wait_until

T = 30.0
SLOW, FAST, FEW, SMALL = (f"sst_limits-{n}-0123456789" for n in ("slow", "fast", "few", "small"))
TOKENS = {SLOW: ("write", ["slow"]), FAST: ("write", ["fast"]), FEW: ("write", ["few"]), SMALL: ("write", ["small"])}
LIMITS = """
[namespace.slow]
max_ops_per_s = 5

[namespace.few]
max_sessions = 3

[namespace.small]
max_bytes = 3000
"""
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthCluster]:
    procs = Procs(tmp_path_factory.mktemp("limits"))
    try:
        metrics = ("--metrics-port", "0")
        yield AuthCluster(procs, TOKENS, LIMITS, shards=2, shard_args=metrics, router_args=metrics)
    finally:
        procs.close()


def client(c: AuthCluster, token: str, ns: str, retry: Retry | None = None) -> Client:
    return Client(c.router.address, token=token, namespace=ns, retry=retry or Retry())


def batch_of_gets(address: str, token: str, ns: str, n: int) -> state_pb2.BatchResponse:
    with grpc.insecure_channel(address) as ch:
        stub = state_pb2_grpc.StateStub(with_token(ch, token))
        ops = [state_pb2.BatchOp(get=state_pb2.GetRequest(namespace=ns, session_id=f"s{i}", key="k")) for i in range(n)]
        return stub.Batch(state_pb2.BatchRequest(ops=ops), timeout=T)


def cluster_figures(c: AuthCluster, ns: str) -> list[tuple[int, int]]:
    """(sessions, bytes) of `ns` as each shard judges a write: its own plus the others' as last heard."""
    out = []
    for shard in c.shards:
        with grpc.insecure_channel(shard.address) as ch:
            stub = replication_pb2_grpc.ReplicationStub(with_token(ch, CLUSTER_TOKEN))
            resp = stub.NamespaceUsage(replication_pb2.NamespaceUsageRequest(namespaces=[ns]), timeout=T)
        out.append((int(resp.cluster[0].sessions), int(resp.cluster[0].bytes)))
    return out


def settled(c: AuthCluster, ns: str, sessions: int) -> tuple[int, int]:
    """Wait until every shard counts `sessions` sessions of `ns` across the cluster (they ask
    each other every --usage-poll-s); the figures then."""
    def same() -> tuple[int, int] | None:
        figs = cluster_figures(c, ns)
        return figs[0] if all(f == figs[0] for f in figs) and figs[0][0] == sessions else None
    got: tuple[int, int] = wait_until(same)
    return got


def test_over_max_ops_per_s_an_op_gets_resource_exhausted_naming_the_limit(cluster: AuthCluster) -> None:
    # One Batch of 50 ops is admitted in one instant: the bucket holds 5 (a second's worth).
    for address in (cluster.router.address, cluster.shards[0].address):  # router, and a shard (direct mode)
        resp = batch_of_gets(address, SLOW, "slow", 50)
        codes = [r.code for r in resp.results]
        refused = [r for r in resp.results if r.code == EXHAUSTED]
        assert len(refused) >= 44 and len(codes) - len(refused) <= 6, codes
        assert all(r.code in (0, EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION.value[0]) for r in resp.results)
        r = refused[0]
        assert "'slow'" in r.message and "max_ops_per_s=5" in r.message
        assert r.limit_exceeded.limit == "max_ops_per_s" and r.limit_exceeded.value == 5
    with client(cluster, SLOW, "slow", retry=NO_RETRY) as c:  # a client that does not wait it out
        seen: list[errors.LimitExceededError] = []
        for _ in range(200):
            try:
                c.session("one").get("k")
            except errors.LimitExceededError as e:
                seen.append(e)
                break
        assert seen and isinstance(seen[0], errors.RateLimitedError)
        assert seen[0].limit == "max_ops_per_s" and "'slow'" in seen[0].message


def test_the_default_retry_waits_out_max_ops_per_s_and_every_call_lands(cluster: AuthCluster) -> None:
    # 5 ops/s: 12 puts in a row from one client and 10 at once from an async one go past the
    # bucket; with the default Retry each refused call waits and tries again, and none fails.
    sid = uid("ride")
    with client(cluster, SLOW, "slow") as c:
        s = c.session(sid)
        for i in range(12):
            s.put("k", str(i))

    async def at_once() -> list[object]:
        async with AsyncClient(cluster.router.address, token=SLOW, namespace="slow") as ac:
            return await asyncio.gather(*(ac.session(f"ride-{i}").put("k", str(i)) for i in range(10)),
                                        return_exceptions=True)

    out = asyncio.run(at_once())
    assert [type(r).__name__ for r in out if isinstance(r, BaseException)] == []
    with client(cluster, SLOW, "slow") as c:
        rec = c.session(sid).get("k")
        assert rec is not None and rec.value == b"11"
        got = [c.session(f"ride-{i}").get("k") for i in range(10)]
        assert [r.value if r else None for r in got] == [str(i).encode() for i in range(10)]


def test_a_throttled_tenant_does_not_stop_another_tenants_calls(cluster: AuthCluster) -> None:
    stop = threading.Event()
    slow_refused = [0]

    def hammer() -> None:
        with client(cluster, SLOW, "slow") as c:
            while not stop.is_set():
                out = c.batch()
                for i in range(20):
                    out.get(f"h{i}", "k")
                slow_refused[0] += sum(isinstance(r, errors.LimitExceededError) for r in out.execute(raise_on_error=False))

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    ok = 0
    try:
        with client(cluster, FAST, "fast") as c:
            for i in range(100):
                s = c.session(f"f{i % 10}")
                s.put("k", str(i))
                assert s.get("k").value == str(i).encode()  # type: ignore[union-attr]
                ok += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert ok == 100
    assert slow_refused[0] > 0


def test_refusals_are_counted_by_reason_in_metrics_without_a_token_or_namespace(cluster: AuthCluster) -> None:
    router, shard = cluster.router, cluster.shards[0]
    before, shard_before = refusals(router), refusals(shard)
    for _ in range(2):  # no token: UNAUTHENTICATED
        with grpc.insecure_channel(router.address) as ch, pytest.raises(grpc.RpcError) as info:
            state_pb2_grpc.StateStub(ch).Get(state_pb2.GetRequest(namespace="fast", session_id="s", key="k"), timeout=T)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with client(cluster, FAST, "fast", retry=NO_RETRY) as c:  # a namespace not granted, 3 times
        for i in range(3):
            with pytest.raises(errors.PermissionDeniedError):
                c.session(f"x{i}", namespace="slow").get("k")
    resp = batch_of_gets(router.address, SLOW, "slow", 50)
    over = sum(r.code == EXHAUSTED for r in resp.results)
    with grpc.insecure_channel(shard.address) as ch, pytest.raises(grpc.RpcError):  # at a shard (direct mode)
        state_pb2_grpc.StateStub(ch).Get(state_pb2.GetRequest(namespace="fast", session_id="s", key="k"), timeout=T)
    after, shard_after = refusals(router), refusals(shard)
    assert over >= 44
    assert {r: after[r] - before[r] for r in after} == {"unauthenticated": 2, "permission_denied": 3, "rate_limited": over}
    assert {r: shard_after[r] - shard_before[r] for r in shard_after} == {
        "unauthenticated": 1, "permission_denied": 0, "rate_limited": 0}
    text = metrics_text(router) + metrics_text(shard)
    assert SLOW not in text and FAST not in text and "namespace=" not in text.split("shardstate_auth_refusals")[1][:400]


def metrics_text(node: Proc) -> str:
    with urllib.request.urlopen(f"http://{node.metrics_address()}/metrics", timeout=T) as resp:
        return str(resp.read().decode())


def refusals(node: Proc) -> dict[str, float]:
    out = dict.fromkeys(("unauthenticated", "permission_denied", "rate_limited"), 0.0)
    for line in metrics_text(node).splitlines():
        m = re.match(r'shardstate_auth_refusals_total\{reason="(\w+)"\} ([0-9.e+]+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_max_sessions_refuses_the_write_that_would_pass_it_and_stores_nothing(cluster: AuthCluster) -> None:
    sids = [uid("few") for _ in range(3)]
    with client(cluster, FEW, "few") as c:
        for s in sids:
            c.session(s).put("k", "v")
        settled(cluster, "few", 3)
        extra = uid("few-extra")
        with pytest.raises(errors.LimitExceededError) as info:
            c.session(extra).put("k", "v")
        assert info.value.limit == "max_sessions" and "'few'" in info.value.message
        assert "max_sessions=3" in info.value.message
        with pytest.raises(errors.LimitExceededError):
            c.session(extra).append("log", ["a"])
        # In a Batch, the op that would create a session fails alone.
        out = c.batch().put(sids[0], "k2", "v2").put(extra, "k", "v").execute(raise_on_error=False)
        assert isinstance(out[0], int) and isinstance(out[1], errors.LimitExceededError)
        assert c.session(extra).info() is None and c.session(extra).get("k") is None
        assert sorted(s.session_id for s in c.list_sessions()) == sorted(sids)
        assert c.session(sids[0]).get("k2").value == b"v2"  # type: ignore[union-attr]  # existing sessions still take writes
        assert c.session(sids[1]).drop()
        settled(cluster, "few", 2)
        c.session(extra).put("k", "v")  # room again
        assert c.session(extra).get("k").value == b"v"  # type: ignore[union-attr]


def test_max_bytes_refuses_the_write_that_would_pass_it_and_stores_nothing(cluster: AuthCluster) -> None:
    a, b = uid("small"), uid("small")
    with client(cluster, SMALL, "small") as c:
        c.session(a).put("k", "x" * 1000)
        c.session(b).put("k", "y" * 1000)
        sessions, held = settled(cluster, "small", 2)
        assert 2000 <= held < 2100
        with pytest.raises(errors.LimitExceededError) as info:
            c.session(b).put("big", "z" * 1500)
        assert info.value.limit == "max_bytes" and "'small'" in info.value.message and "max_bytes=3000" in info.value.message
        with pytest.raises(errors.LimitExceededError):
            c.session(a).append("log", ["z" * 1500])
        assert c.session(b).get("big") is None and c.session(a).read("log") == []
        assert cluster_figures(cluster, "small")[0] == (sessions, held)
        c.session(a).put("small", "ok")  # what fits still goes in
        c.session(a).put("k", "x")  # shrinking is always allowed
        assert c.session(a).get("small").value == b"ok"  # type: ignore[union-attr]
