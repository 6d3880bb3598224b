"""Tokens and roles (issue 19) against real processes: two shards (s1 with a replica) and a
router, every node with --auth-file and the cluster token. Reads need read, writes write,
Admin RPCs admin; a token reaches only its namespaces, op by op in a Batch or Pipeline; no
token is UNAUTHENTICATED; node-to-node calls need the cluster token; the file is reloaded."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shardstate import AsyncClient, Client
from shardstate.common import auth, errors
from shardstate.common.authwire import with_token
from shardstate.server import launch
from shardstate.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    replication_pb2,
    replication_pb2_grpc,
    state_pb2,
    state_pb2_grpc,
    types_pb2,
)
from tests.authcluster import CLUSTER_TOKEN, AuthCluster
from tests.devcluster import Dev, cli
from tests.procs import Procs
from tests.stubs import expect_error, uid, wait_until
from tests.test_readme import README

T = 30.0
ADMIN = "sst_test-admin-0123456789"
RW = "sst_test-readwrite-0123456789"
RD = "sst_test-read-0123456789"
A = "sst_test-namespace-a-0123456789"
B = "sst_test-namespace-b-0123456789"
TOKENS = {
    ADMIN: ("admin", ["*"]), RW: ("write", ["default"]), RD: ("read", ["default"]),
    A: ("write", ["a"]), B: ("write", ["b"]),
}
SECRETS = (ADMIN, RW, RD, A, B, CLUSTER_TOKEN)
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthCluster]:
    procs = Procs(tmp_path_factory.mktemp("auth"))
    try:
        yield AuthCluster(procs, TOKENS, shards=2, replicas=1)
    finally:
        procs.close()


def client(c: AuthCluster, token: str | None, **kw: object) -> Client:
    return Client(c.router.address, token=token, **kw)  # type: ignore[arg-type]


def stubs(address: str, token: str | None) -> tuple[state_pb2_grpc.StateStub, admin_pb2_grpc.AdminStub, grpc.Channel]:
    ch = grpc.insecure_channel(address)
    wrapped = with_token(ch, token)
    return state_pb2_grpc.StateStub(wrapped), admin_pb2_grpc.AdminStub(wrapped), ch


SEEN: list[str] = []  # every error message a test saw: none may hold a token


def denied(fn: object, *args: object, **kw: object) -> errors.ShardstateError:
    with pytest.raises(errors.PermissionDeniedError) as info:
        fn(*args, **kw)  # type: ignore[operator]
    SEEN.append(info.value.message)
    return info.value


def test_a_read_token_gets_but_a_put_is_denied_and_writes_nothing(cluster: AuthCluster) -> None:
    sid = uid("rd")
    with client(cluster, RW) as rw, client(cluster, RD) as rd:
        rw.session(sid).put("k", "v1")
        assert rd.session(sid).get("k").value == b"v1"  # type: ignore[union-attr]
        e = denied(rd.session(sid).put, "k", "v2")
        assert "write" in e.message and "'default'" in e.message
        denied(rd.session(sid).put, "new", "x")
        denied(rd.session(sid).append, "log", ["x"])
        denied(rd.session(uid("rd-new")).put, "k", "x")
        got = rw.session(sid).get("k")
        assert got is not None and got.value == b"v1"
        assert rw.session(sid).get("new") is None
        assert rw.session(sid).read("log") == []
        assert rd.session(sid).info().key_count == 1  # type: ignore[union-attr]


def test_a_token_for_namespace_a_reads_nothing_of_b(cluster: AuthCluster) -> None:
    sa, sb = uid("a"), uid("b")
    with client(cluster, B, namespace="b") as cb, client(cluster, A, namespace="a") as ca:
        cb.session(sb).put("k", "secret of b")
        ca.session(sa).put("k", "of a")
        e = denied(ca.session(sb, namespace="b").get, "k")
        assert "'b'" in e.message
        denied(ca.session(sb, namespace="b").info)
        denied(ca.session(sb, namespace="b").read, "log")
        denied(lambda: list(ca.list_sessions(namespace="b")))
        denied(lambda: next(iter(ca.session(sb, namespace="b").watch())))
        assert [s.session_id for s in ca.list_sessions()] == [sa]
        # A Batch mixing namespaces: the b ops fail alone, the a ops run.
        out = (ca.batch().put(sa, "k2", "2").get(sb, "k", namespace="b").put(sb, "k", "overwritten", namespace="b")
               .get(sa, "k").execute(raise_on_error=False))
        assert isinstance(out[0], int) and out[0] > 0
        assert isinstance(out[1], errors.PermissionDeniedError) and "'b'" in out[1].message
        assert isinstance(out[2], errors.PermissionDeniedError)
        assert out[3].value == b"of a"
        SEEN.extend([out[1].message, out[2].message])
        assert ca.session(sa).get("k2").value == b"2"  # type: ignore[union-attr]
        assert cb.session(sb).get("k").value == b"secret of b"  # type: ignore[union-attr]


def test_a_pipeline_mixing_namespaces_denies_only_the_other_namespaces_ops(cluster: AuthCluster) -> None:
    sa, sb = uid("pa"), uid("pb")
    with client(cluster, B, namespace="b") as cb:
        cb.session(sb).put("k", "b's")

    async def go() -> tuple[list[object], dict[str, dict[str, object]]]:
        async with AsyncClient(cluster.router.address, token=A, namespace="a") as ac:
            await ac.session(sa).put("k", "a's")
            ops = [ac.session(sa).get("k"), ac.session(sb, namespace="b").get("k"),
                   ac.session(sb, namespace="b").put("x", "y"), ac.session(sa).put("k2", "v")]
            out = await asyncio.gather(*ops, return_exceptions=True)
            return list(out), ac.batching_stats()

    out, stats = asyncio.run(go())
    assert any(s.get("mode") == "pipeline" for s in stats.values()), stats
    assert out[0].value == b"a's"  # type: ignore[attr-defined]
    assert isinstance(out[1], errors.PermissionDeniedError) and isinstance(out[2], errors.PermissionDeniedError)
    assert isinstance(out[3], int)
    SEEN.extend([out[1].message, out[2].message])
    with client(cluster, B, namespace="b") as cb:
        assert cb.session(sb).get("x") is None


def test_no_token_or_an_unknown_one_is_unauthenticated(cluster: AuthCluster) -> None:
    for token in (None, "sst_not-a-known-token-at-all"):
        for address in (cluster.router.address, cluster.shards[0].address):
            state, admin, ch = stubs(address, token)
            try:
                e = expect_error(grpc.StatusCode.UNAUTHENTICATED, state.Get,
                                 state_pb2.GetRequest(session_id="x", key="k"), timeout=T)
                SEEN.append(e.message)
                expect_error(grpc.StatusCode.UNAUTHENTICATED, admin.Status, admin_pb2.StatusRequest(), timeout=T)
                expect_error(grpc.StatusCode.UNAUTHENTICATED, state.Batch, state_pb2.BatchRequest(), timeout=T)
            finally:
                ch.close()
    with client(cluster, None) as anon, pytest.raises(errors.UnauthenticatedError):
        anon.session("x").get("k")


def test_admin_rpcs_need_the_admin_role_and_a_refused_promote_changes_nothing(cluster: AuthCluster) -> None:
    _, admin_rw, ch = stubs(cluster.router.address, RW)
    _, admin_rd, ch2 = stubs(cluster.router.address, RD)
    try:
        before = admin_rd.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T)  # any token reads the map
        assert before.epoch > 0
        e = expect_error(grpc.StatusCode.PERMISSION_DENIED, admin_rw.PromoteReplica,
                         admin_pb2.PromoteReplicaRequest(shard_id="s1"), timeout=T)
        assert "admin" in e.message
        SEEN.append(e.message)
        expect_error(grpc.StatusCode.PERMISSION_DENIED, admin_rd.RemoveNode,
                     admin_pb2.RemoveNodeRequest(address=cluster.replicas[0].address), timeout=T)
        expect_error(grpc.StatusCode.PERMISSION_DENIED, admin_rw.AddShard,
                     admin_pb2.AddShardRequest(id="s9", primary="127.0.0.1:1"), timeout=T)
        after = admin_rd.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T)
        assert after == before
        assert len(admin_rd.Status(admin_pb2.StatusRequest(), timeout=T).nodes) == 4  # router + 3 nodes
    finally:
        ch.close()
        ch2.close()
    # The CLI takes --token (or SHARDSTATE_TOKEN).
    out = cli("admin", "--router", cluster.router.address, "--token", RW, "promote", "s1")
    assert out.returncode == 1 and "PERMISSION_DENIED" in out.stderr
    assert RW not in out.stderr + out.stdout
    assert cli("admin", "--router", cluster.router.address, "--token", ADMIN, "map").returncode == 0


def test_the_kv_commands_send_the_token(cluster: AuthCluster, tmp_path: Path) -> None:
    sid = uid("cli")
    (tmp_path / "rw").write_text(RW + "\n")
    put = cli("put", "--router", cluster.router.address, "--token-file", str(tmp_path / "rw"), sid, "k", "v")
    assert put.returncode == 0, put.stderr
    got = cli("get", "--router", cluster.router.address, "--token", RD, sid, "k")
    assert got.returncode == 0 and got.stdout.strip() == "v"
    refused = cli("put", "--router", cluster.router.address, "--token", RD, sid, "k", "w")
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr and RD not in refused.stderr
    assert cli("get", "--router", cluster.router.address, sid, "k").returncode == 1  # no token


def test_the_bench_sends_the_token(cluster: AuthCluster, tmp_path: Path) -> None:
    """`shardstate bench --token-file`: every step succeeds with a write token; with a read
    token the load itself is refused (exit 2, PermissionDeniedError) and the token is not printed."""
    (tmp_path / "rw").write_text(RW + "\n")
    out = tmp_path / "bench.json"
    args = ("bench", "--router", cluster.router.address, "--sessions", "20", "--concurrency", "4",
            "--warmup", "0", "--duration", "1", "--quiet")
    ok = cli(*args, "--token-file", str(tmp_path / "rw"), "--json", str(out))
    assert ok.returncode == 0, ok.stderr
    r = json.loads(out.read_text())
    assert r["completed"] > 0 and r["errors"] == 0 and r["completed"] == r["successes"] + r["conflicts"]
    refused = cli(*args, "--token", RD)
    assert refused.returncode == 2 and "PermissionDeniedError" in refused.stderr, refused.stderr
    assert RD not in refused.stderr + refused.stdout


def test_the_token_file_is_reloaded_without_a_restart(cluster: AuthCluster) -> None:
    new = "sst_test-added-later-0123456789"
    shard = cluster.shards[0].address

    def works(address: str) -> bool:
        state, _, ch = stubs(address, new)
        try:
            state.Get(state_pb2.GetRequest(session_id="reload", key="k"), timeout=T)
            return True
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION), e
            return e.code() == grpc.StatusCode.FAILED_PRECONDITION  # s1 may not own it: the token passed
        finally:
            ch.close()

    assert not works(cluster.router.address) and not works(shard)
    cluster.tokens[new] = ("read", ["default"])
    cluster.write()
    try:
        wait_until(lambda: works(cluster.router.address) and works(shard))
    finally:
        del cluster.tokens[new]
        cluster.write()
    wait_until(lambda: not works(cluster.router.address) and not works(shard))


def test_a_token_file_that_no_longer_parses_keeps_the_last_tokens(cluster: AuthCluster) -> None:
    text = cluster.token_file.read_text()
    cluster.token_file.write_text(text + "\n[[token]]\nrole = 'superuser'\n")
    try:
        with client(cluster, RD) as rd:
            for _ in range(3):  # across a reload check
                rd.session("still").get("k")
    finally:
        cluster.write()


def test_direct_mode_sends_the_token_to_the_shards(cluster: AuthCluster) -> None:
    sids = [uid("direct") for _ in range(8)]
    with client(cluster, RW, direct=True) as d, client(cluster, RD, direct=True) as dr:
        for s in sids:
            d.session(s).put("k", s)
        assert [dr.session(s).get("k").value for s in sids] == [s.encode() for s in sids]  # type: ignore[union-attr]
        denied(dr.session(sids[0]).put, "k", "no")
        assert d.session(sids[0]).get("k").value == sids[0].encode()  # type: ignore[union-attr]
    # A shard checks as a router does: each op of a Batch, ListSessions, Watch.
    for shard in cluster.shards:
        state, _, ch = stubs(shard.address, A)
        try:
            e = expect_error(grpc.StatusCode.PERMISSION_DENIED, state.Put,
                             state_pb2.PutRequest(namespace="b", session_id="x", key="k", value=b"v"), timeout=T)
            SEEN.append(e.message)
            expect_error(grpc.StatusCode.PERMISSION_DENIED, state.ListSessions,
                         state_pb2.ListSessionsRequest(namespace="b"), timeout=T)
            watch = state.Watch(state_pb2.WatchRequest(namespace="b", session_id="x"), timeout=T)
            expect_error(grpc.StatusCode.PERMISSION_DENIED, next, watch)
            resp = state.Batch(state_pb2.BatchRequest(ops=[
                state_pb2.BatchOp(get=state_pb2.GetRequest(namespace="b", session_id="x", key="k")),
                state_pb2.BatchOp(get_session=state_pb2.GetSessionRequest(namespace="a", session_id="y")),
            ]), timeout=T)
            assert resp.results[0].code == PERMISSION_DENIED
            assert resp.results[1].code != PERMISSION_DENIED  # OK, or WrongShard on the other shard
        finally:
            ch.close()


def test_node_to_node_calls_need_the_cluster_token(cluster: AuthCluster) -> None:
    primary = cluster.shards[0].address
    hello = replication_pb2.FollowerMessage(hello=replication_pb2.FollowHello(
        follower_id="127.0.0.1:1", from_revision=1, shard_id="s1"))
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), (ADMIN, grpc.StatusCode.PERMISSION_DENIED)):
        ch = grpc.insecure_channel(primary)
        try:
            repl = replication_pb2_grpc.ReplicationStub(with_token(ch, token))
            e = expect_error(code, lambda: next(iter(repl.Follow(iter([hello]), timeout=T))))  # noqa: B023
            SEEN.append(e.message)
            expect_error(code, repl.NamespaceUsage, replication_pb2.NamespaceUsageRequest(namespaces=["a"]), timeout=T)
            admin = admin_pb2_grpc.AdminStub(with_token(ch, token))
            pb = admin.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T) if token else None
            if pb is not None:
                bumped = admin_pb2.ClusterMap()
                bumped.CopyFrom(pb)
                bumped.epoch += 100
                expect_error(code, admin.PublishClusterMap, bumped, timeout=T)
                assert admin.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T).epoch == pb.epoch
        finally:
            ch.close()
    # The real replica follows its primary with the cluster token.
    sid = uid("repl")
    with client(cluster, RW) as rw:
        shard_of = rw.session(sid)
        shard_of.put("k", "replicated")
    state, _, ch = stubs(cluster.replicas[0].address, RW)
    try:
        def on_replica() -> bool:
            try:
                r = state.Get(state_pb2.GetRequest(session_id=sid, key="k", consistency=types_pb2.EVENTUAL), timeout=T)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.FAILED_PRECONDITION  # the session is s2's
                return True
            return r.found
        wait_until(on_replica)
    finally:
        ch.close()


def test_rebalancing_and_promotion_run_with_auth_on(cluster: AuthCluster) -> None:
    # Node-to-node paths of a move (the target's Follow, Fence, MigrationStatus, the keeper's
    # swap) and of a failover carry the cluster token; the admin token starts them.
    sids = [uid("move") for _ in range(30)]
    with client(cluster, RW) as rw:
        for s in sids:
            rw.session(s).put("k", s)
    s3 = cluster.procs.shard("s3", *cluster.args)
    out = cli("admin", "--router", cluster.router.address, "--token", ADMIN, "add-shard", "s3", s3.address)
    assert out.returncode == 0, out.stderr
    primary_before = cluster.shards[0].address
    out = cli("admin", "--router", cluster.router.address, "--token", ADMIN, "promote", "s1")
    assert out.returncode == 0, out.stderr
    _, admin, ch = stubs(cluster.router.address, RD)
    try:
        pb = admin.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T)
    finally:
        ch.close()
    shards = {s.id: s for s in pb.shards}
    assert set(shards) == {"s1", "s2", "s3"} and not pb.migrations
    assert shards["s1"].primary == cluster.replicas[0].address != primary_before
    with client(cluster, RD) as rd:
        assert [rd.session(s).get("k").value for s in sids] == [s.encode() for s in sids]  # type: ignore[union-attr]
    state, _, ch = stubs(cluster.router.address, RD)
    try:
        owners = {state.Get(state_pb2.GetRequest(session_id=s, key="k"), timeout=T).header.shard_id for s in sids}
    finally:
        ch.close()
    assert "s3" in owners


def test_no_message_or_log_holds_a_token(cluster: AuthCluster) -> None:
    with client(cluster, A) as ca, client(cluster, "sst_unknown-0123456789") as unknown:
        denied(ca.session("x", namespace="b").get, "k")
        with pytest.raises(errors.UnauthenticatedError) as info:
            unknown.session("x").get("k")
        SEEN.append(info.value.message)
    for m in SEEN:  # with the errors the tests above saw, when they ran first
        assert not any(s in m for s in SECRETS), m
    logs = list(Path(cluster.procs.tmp).glob("*.log"))
    assert len(logs) >= 4
    for log in logs:
        text = log.read_text()
        assert not any(s in text for s in SECRETS), log
        assert not any(auth.hash_token(s) in text for s in SECRETS), log
    assert not any(s in cluster.token_file.read_text() for s in SECRETS)


def test_dev_auth_makes_three_tokens_and_starts_every_node_with_auth(tmp_path: Path, devs: list[Dev]) -> None:
    data = tmp_path / "data"
    dev = Dev(data, "--auth", "--shards", "2", "--replicas", "1")
    devs.append(dev)
    path = data / "dev-tokens.json"
    tokens = json.loads(path.read_text())
    assert set(tokens) == {"admin", "readwrite", "read"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "cluster-token").stat().st_mode) == 0o600
    for key, token in tokens.items():
        assert f"token {key}: {token}" in dev.lines
    assert not any(t in (data / "tokens.toml").read_text() for t in tokens.values())
    assert dev.state()["auth"]["tokens"] == str(path)
    sid = uid("dev")
    with Client(dev.router, token=tokens["readwrite"]) as rw, Client(dev.router, token=tokens["read"]) as rd:
        rw.session(sid).put("k", "v")
        assert rd.session(sid).get("k").value == b"v"  # type: ignore[union-attr]
        with pytest.raises(errors.PermissionDeniedError):
            rd.session(sid).put("k", "w")
    with Client(dev.router) as anon, pytest.raises(errors.UnauthenticatedError):
        anon.session(sid).get("k")
    # Every node checks (a shard reached directly too), and the replica follows with the cluster token.
    for node in dev.state()["nodes"].values():
        if node["kind"] == "shard":
            state, _, ch = stubs(node["address"], None)
            try:
                expect_error(grpc.StatusCode.UNAUTHENTICATED, state.Get, state_pb2.GetRequest(session_id=sid, key="k"),
                             timeout=T)
            finally:
                ch.close()
    out = cli("admin", "--router", dev.router, "--token", tokens["admin"], "status")
    assert out.returncode == 0 and out.stdout.count("replica") >= 2, out.stdout + out.stderr
    assert "down" not in out.stdout
    assert cli("admin", "--router", dev.router, "--token", tokens["read"], "promote", "s1").returncode == 1
    readme_section_runs(dev.router, data, tokens)
    assert dev.terminate() == 0
    # A restart on the same directory keeps auth and the tokens.
    again = Dev(data, "--shards", "2", "--replicas", "1")
    devs.append(again)
    assert json.loads(path.read_text()) == tokens
    with Client(again.router, token=tokens["read"]) as rd:
        assert rd.session(sid).get("k").value == b"v"  # type: ignore[union-attr]
    with Client(again.router) as anon, pytest.raises(errors.UnauthenticatedError):
        anon.session(sid).get("k")


def test_shardstate_auth_makes_token_file_entries(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    made = cli("auth", "new-token", "--role", "write", "-n", "team-a/*", "-n", "default", "--name", "ci",
               "--append", str(path))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("sst_") and token not in path.read_text()
    table = auth.parse(path.read_text())
    grant = table.grants[auth.hash_token(token)]
    assert grant.role == auth.WRITE and grant.covers("team-a/x") and grant.covers("default") and grant.name == "ci"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    hashed = subprocess.run(launch.shardstate_cmd("auth", "hash-token"), input=token + "\n", capture_output=True,
                            text=True, timeout=60)
    assert hashed.stdout.strip() == auth.hash_token(token)
    assert cli("auth", "check", str(path)).stdout.startswith(f"{path}: 1 tokens")
    path.write_text(path.read_text() + "[[token]]\nrole = 'root'\n")
    bad = cli("auth", "check", str(path))
    assert bad.returncode == 1 and "sha256" in bad.stderr


def readme_section_runs(router: str, data: Path, tokens: dict[str, str]) -> None:
    """The README's "Tokens and limits" examples as written (the address and data directory
    aside) against a `dev --auth` cluster."""
    section = README.read_text().split("## Tokens and limits", 1)[1].split("\n## ", 1)[0]

    def written(code: str) -> str:
        return code.replace("127.0.0.1:7400", router).replace(".shardstate/", f"{data}/")

    py = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(py) == 1
    out = subprocess.run([sys.executable, "-c", written(py[0])], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "b'step-1'" and "needs the write role" in out.stdout
    shell = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[1]
    env = {k: v for k, v in os.environ.items() if k != "SHARDSTATE_TOKEN"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # `shardstate`, `python3` of this venv
    out = subprocess.run(["bash", "-euc", written(shell)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    new = out.stdout.strip().splitlines()[-1]
    assert new.startswith("sst_") and "router" in out.stdout

    def works() -> bool:
        try:
            with Client(router, token=new, namespace="team-a/x") as c:
                c.session("readme").put("k", "v")
            return True
        except errors.UnauthenticatedError:
            return False

    wait_until(works)


def test_tokens_and_tls_together(tmp_path: Path, devs: list[Dev]) -> None:
    """`dev --tls --auth`: both layers on every node; node-to-node calls carry a cluster
    certificate and the cluster token, clients a CA (a client certificate in direct mode) and a token."""
    data = tmp_path / "data"
    dev = Dev(data, "--tls", "--auth", "--shards", "2", "--replicas", "1")
    devs.append(dev)
    tokens = json.loads((data / "dev-tokens.json").read_text())
    files = dev.state()["tls"]
    ca = files["ca"]
    sids = [uid("both") for _ in range(10)]
    with Client(dev.router, ca_file=ca, token=tokens["readwrite"]) as rw, \
            Client(dev.router, ca_file=ca, token=tokens["read"]) as rd:
        for s in sids:
            rw.session(s).put("k", s)
        assert [rd.session(s).get("k").value for s in sids] == [s.encode() for s in sids]  # type: ignore[union-attr]
        denied(rd.session(sids[0]).put, "k", "no")
    with Client(dev.router, ca_file=ca) as anon, pytest.raises(errors.UnauthenticatedError):
        anon.session(sids[0]).get("k")
    with Client(dev.router, ca_file=ca, cert_file=files["client_cert"], key_file=files["client_key"],
                token=tokens["read"], direct=True) as direct:
        assert [direct.session(s).get("k").value for s in sids] == [s.encode() for s in sids]  # type: ignore[union-attr]
        denied(direct.session(sids[0]).put, "k", "no")
    out = cli("admin", "--router", dev.router, "--tls-ca", ca, "--token", tokens["admin"], "status")
    assert out.returncode == 0 and "down" not in out.stdout, out.stdout + out.stderr
    assert cli("admin", "--router", dev.router, "--tls-ca", ca, "status").returncode == 1  # no token
