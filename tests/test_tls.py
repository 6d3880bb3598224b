"""TLS end to end on one `shardstate dev --tls` cluster (2 shards x 1 replica, a router): a client
given the CA reads back what it wrote (through the router, and in direct mode with a client
certificate), plaintext clients and clients trusting another CA cannot connect, node-to-node
calls need a cluster certificate, replication runs over mTLS, and a replaced certificate is
served to new connections without a restart. Plus the checks that need no cluster."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from shardstate import AsyncClient, Client
from shardstate.common import tls
from shardstate.common.errors import InvalidArgumentError, UnavailableError
from shardstate.server import launch
from shardstate.server.cli import devtls
from shardstate.server.nodegate import node_only
from shardstate.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    replication_pb2,
    replication_pb2_grpc,
    state_pb2,
    state_pb2_grpc,
    types_pb2,
)
from tests.devcluster import Dev, cli

TIMEOUT_S = 30.0
README = Path(__file__).resolve().parent.parent / "README.md"


class Cluster:
    def __init__(self, dev: Dev) -> None:
        self.dev = dev
        self.router = dev.router
        self.state = dev.state()
        t = self.state["tls"]
        self.ca, self.client_cert, self.client_key = t["ca"], t["client_cert"], t["client_key"]
        self.client_files = tls.TlsFiles(self.ca, self.client_cert, self.client_key)
        self.tls_dir = Path(self.ca).parent

    def node(self, name: str) -> dict[str, Any]:
        return dict(self.state["nodes"][name])

    def address(self, name: str) -> str:
        return str(self.node(name)["address"])

    def node_files(self, name: str) -> tls.TlsFiles:
        n = self.node(name)
        return tls.TlsFiles(self.ca, n["tls_cert"], n["tls_key"])

    def map(self, files: tls.TlsFiles) -> admin_pb2.ClusterMap:
        with tls.channel(self.address("s1"), tls=files) as ch:
            return admin_pb2_grpc.AdminStub(ch).GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    data = tmp_path_factory.mktemp("tls") / "data"
    dev = Dev(data, "--tls", "--shards", "2", "--replicas", "1")
    try:
        yield Cluster(dev)
    finally:
        dev.kill()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> tls.TlsFiles:
    """Another CA and a certificate it signed that claims to be a node (CN shardstate-node)."""
    d = tmp_path_factory.mktemp("other-ca")
    ca = devtls.make_ca("another CA")
    (d / "ca.pem").write_bytes(ca.cert)
    devtls.save(devtls.issue(ca, tls.DEFAULT_NODE_NAME), d / "node.pem", d / "node-key.pem")
    return tls.TlsFiles(str(d / "ca.pem"), str(d / "node.pem"), str(d / "node-key.pem"))


def served_certificate(address: str, ca: str, client: tls.TlsFiles | None = None) -> str:
    """The PEM certificate a new TLS connection to `address` is served (verified against `ca`)."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["h2"])
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock, \
            ctx.wrap_socket(sock, server_hostname=host) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der)


def same_cert(pem_a: str, pem_b: str) -> bool:
    return x509.load_pem_x509_certificate(pem_a.encode()) == x509.load_pem_x509_certificate(pem_b.encode())


def rpc_error(fn: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value


# ---- what dev --tls made ----

def test_dev_tls_writes_a_ca_node_and_client_certificates_with_private_keys(cluster: Cluster) -> None:
    d = cluster.tls_dir
    assert Path(cluster.ca) == d / "ca.pem" and d == cluster.dev.data / "tls"
    keys = sorted(p.name for p in d.glob("*-key.pem"))
    assert keys == sorted(["ca-key.pem", "client-key.pem", "router-key.pem", "s1-key.pem", "s2-key.pem",
                           "s1-r1-key.pem", "s2-r1-key.pem"])
    for k in keys:
        assert stat.S_IMODE((d / k).stat().st_mode) == 0o600, k
    for name in ("router", "s1", "s2", "s1-r1", "s2-r1"):
        cert = x509.load_pem_x509_certificate(Path(cluster.node(name)["tls_cert"]).read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == tls.DEFAULT_NODE_NAME
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
        assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    client = x509.load_pem_x509_certificate(Path(cluster.client_cert).read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == devtls.CLIENT_NAME
    assert f"tls-ca: {cluster.ca}" in cluster.dev.lines


# ---- clients ----

def test_client_with_the_ca_reads_back_what_it_wrote_through_the_router(cluster: Cluster) -> None:
    with Client(cluster.router, ca_file=cluster.ca) as c:
        s = c.session("tls-sync")
        s.put("k", b"v1")
        assert s.get("k").value == b"v1"

    async def run() -> bytes:
        async with AsyncClient(cluster.router, ca_file=Path(cluster.ca)) as ac:
            s = ac.session("tls-async")
            await asyncio.gather(*(s.put(f"k{i}", b"v%d" % i) for i in range(20)))  # batched, one stream
            got = await s.get("k7")
            assert got is not None
            return got.value

    assert asyncio.run(run()) == b"v7"


def test_direct_mode_reaches_the_shards_with_a_client_certificate(cluster: Cluster) -> None:
    with Client(cluster.router, ca_file=cluster.ca, cert_file=cluster.client_cert, key_file=cluster.client_key,
                direct=True) as c:
        for i in range(10):
            c.session(f"direct-{i}").put("k", b"d%d" % i)
        assert [c.session(f"direct-{i}").get("k").value for i in range(10)] == [b"d%d" % i for i in range(10)]
        routes = c._core.direct
        assert routes is not None and routes.direct_calls >= 20 and routes.fallbacks == 0


def test_direct_mode_with_tls_needs_a_client_certificate(cluster: Cluster) -> None:
    with pytest.raises(InvalidArgumentError, match="cert_file"):
        Client(cluster.router, ca_file=cluster.ca, direct=True)


def test_a_plaintext_client_cannot_connect(cluster: Cluster) -> None:
    with Client(cluster.router, timeout=5) as c, pytest.raises(UnavailableError, match="give the client ca_file="):
        c.session("plain").get("k")
    with grpc.insecure_channel(cluster.address("s1")) as ch:
        err = rpc_error(lambda: state_pb2_grpc.StateStub(ch).Get(state_pb2.GetRequest(session_id="x", key="k"),
                                                                 timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert not launch.healthy(cluster.router, files=None)


def test_a_client_trusting_another_ca_cannot_connect(cluster: Cluster, other_ca: tls.TlsFiles) -> None:
    with Client(cluster.router, ca_file=other_ca.ca, timeout=5) as c, pytest.raises(UnavailableError):
        c.session("other").get("k")


def test_a_shard_requires_a_client_certificate_of_the_cluster_ca(cluster: Cluster, other_ca: tls.TlsFiles) -> None:
    no_cert = tls.TlsFiles(ca=cluster.ca)
    foreign = tls.TlsFiles(ca=cluster.ca, cert=other_ca.cert, key=other_ca.key)
    for files in (no_cert, foreign):
        with tls.channel(cluster.address("s1"), tls=files) as ch:
            err = rpc_error(lambda ch=ch: state_pb2_grpc.StateStub(ch).Get(
                state_pb2.GetRequest(session_id="x", key="k"), timeout=5))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, files


def test_the_cli_takes_tls_flags_and_environment(cluster: Cluster) -> None:
    r = cli("put", "--router", cluster.router, "--tls-ca", cluster.ca, "cli", "greeting", "hello")
    assert r.returncode == 0, r.stderr
    r = cli("get", "--router", cluster.router, "--tls-ca", cluster.ca, "cli", "greeting")
    assert (r.returncode, r.stdout) == (0, "hello")
    r = cli("get", "--router", cluster.router, "cli", "greeting")
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr
    r = cli("get", "--router", cluster.router, "--tls-ca", "/nonexistent/ca.pem", "cli", "greeting")
    assert r.returncode == 2 and "/nonexistent/ca.pem does not exist" in r.stderr
    env = {**os.environ, "SHARDSTATE_TLS_CA": cluster.ca}
    r = subprocess.run(launch.shardstate_cmd("admin", "--router", cluster.router, "status", "--json"),
                              capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    nodes = json.loads(r.stdout)["nodes"]
    assert len(nodes) == 5 and all(n.get("up") for n in nodes)  # the router's Status calls to every shard


def test_the_bench_harness_loads_a_tls_cluster_in_direct_mode(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(launch.shardstate_cmd(
        "bench", "--router", cluster.router, "--direct", *launch.tls_args(cluster.client_files),
        "--sessions", "20", "--concurrency", "2", "--duration", "1", "--warmup", "0.2", "--value-size", "32",
        "--quiet", "--json", str(out)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.read_text())
    assert result["completed"] > 0 and result["errors"] == 0, result.get("error_samples")
    assert result["config"]["tls"]["ca"] == cluster.ca


def test_the_readme_tls_examples_run_as_written(cluster: Cluster) -> None:
    text = README.read_text()
    section = text[text.index("\n## TLS\n"):]
    section = section[: section.index("\n## ", 5)]
    shell, python = re.findall(r"```(?:sh|python)\n(.*?)```", section, flags=re.S)

    def local(code: str) -> str:
        return code.replace("127.0.0.1:7400", cluster.router).replace(".shardstate/tls/", f"{cluster.tls_dir}/")

    cmd = " ".join(shlex.quote(a) for a in launch.shardstate_cmd())
    lines = [ln for ln in shell.splitlines() if ln.strip() and not ln.startswith("shardstate dev")]
    script = "set -e\n" + "\n".join(local(ln).replace("shardstate ", f"{cmd} ", 1) for ln in lines)
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "hello" in r.stdout and "router" in r.stdout
    r = subprocess.run([sys.executable, "-c", local(python)], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (0, "b'hello'\n"), r.stderr


# ---- node-to-node calls ----

def test_node_to_node_calls_need_a_cluster_certificate(cluster: Cluster, other_ca: tls.TlsFiles) -> None:
    node = cluster.node_files("router")
    before = cluster.map(node)
    proposed = admin_pb2.ClusterMap()
    proposed.CopyFrom(before)
    proposed.epoch = before.epoch + 1
    primary = cluster.address("s1")

    def calls(ch: grpc.Channel) -> dict[str, Any]:
        admin = admin_pb2_grpc.AdminStub(ch)
        repl = replication_pb2_grpc.ReplicationStub(ch)
        hello = replication_pb2.FollowerMessage(hello=replication_pb2.FollowHello())
        return {
            "Follow": lambda: list(repl.Follow(iter([hello]), timeout=5)),
            "PublishClusterMap": lambda: admin.PublishClusterMap(proposed, timeout=5),
            "SwapClusterMap": lambda: admin.SwapClusterMap(
                admin_pb2.SwapClusterMapRequest(expected_epoch=before.epoch, map=proposed), timeout=5),
            "Fence": lambda: repl.Fence(replication_pb2.FenceRequest(epoch=before.epoch, release=True), timeout=5),
        }

    # A client certificate of the cluster's own CA: the handshake passes, the call does not.
    with tls.channel(primary, tls=cluster.client_files) as ch:
        for name, call in calls(ch).items():
            err = rpc_error(call)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, name
            assert f".{name} is a node-to-node call" in err.details()
            assert f"subject CN '{tls.DEFAULT_NODE_NAME}'" in err.details()
            assert f"presented subject CN '{devtls.CLIENT_NAME}'" in err.details()
        # ... while what a direct-mode client needs stays open to it.
        admin_pb2_grpc.AdminStub(ch).GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=5)
    # A "node" certificate of another CA: no connection at all.
    with tls.channel(primary, tls=tls.TlsFiles(cluster.ca, other_ca.cert, other_ca.key)) as ch:
        for name, call in calls(ch).items():
            assert rpc_error(call).code() == grpc.StatusCode.UNAVAILABLE, name
    assert cluster.map(node).epoch == before.epoch  # nothing was published or swapped
    # A cluster certificate may (Status is node-to-node too).
    with tls.channel(primary, tls=node) as ch:
        st = admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=TIMEOUT_S)
    assert st.nodes and st.nodes[0].up


def test_replication_runs_over_mtls(cluster: Cluster) -> None:
    with tls.channel(cluster.router, tls=tls.TlsFiles(ca=cluster.ca)) as ch:
        put = state_pb2_grpc.StateStub(ch).Put(
            state_pb2.PutRequest(session_id="replicated", key="k", value=b"to-the-replica"), timeout=TIMEOUT_S)
    shard = next(s for s in cluster.map(cluster.node_files("router")).shards if s.id == put.header.shard_id)
    replica = shard.replicas[0]
    deadline = time.monotonic() + TIMEOUT_S
    with tls.channel(replica, tls=cluster.client_files) as ch:
        st = state_pb2_grpc.StateStub(ch)
        while True:
            got = st.Get(state_pb2.GetRequest(session_id="replicated", key="k", consistency=types_pb2.EVENTUAL),
                         timeout=5)
            if got.found or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert got.found and got.record.value == b"to-the-replica" and got.header.shard_id == shard.id


# ---- reload ----

def test_a_replaced_certificate_is_served_without_a_restart(cluster: Cluster) -> None:
    ca = devtls.Issued(Path(cluster.ca).read_bytes(), (cluster.tls_dir / "ca-key.pem").read_bytes())
    for name, client in (("router", None), ("s1", cluster.client_files)):
        files = cluster.node_files(name)
        address = cluster.address(name)
        pid = cluster.node(name)["pid"]
        old = Path(files.cert).read_text()
        assert same_cert(served_certificate(address, cluster.ca, client), old)
        devtls.save(devtls.issue(ca, tls.DEFAULT_NODE_NAME), Path(files.cert), Path(files.key))
        new = Path(files.cert).read_text()
        assert not same_cert(old, new)
        assert same_cert(served_certificate(address, cluster.ca, client), new), name
        os.kill(pid, 0)  # the same process
    # The cluster goes on serving with the new certificates (the router's calls to s1 included).
    with Client(cluster.router, ca_file=cluster.ca) as c:
        for i in range(10):
            c.session(f"after-reload-{i}").put("k", b"x")
        assert all(c.session(f"after-reload-{i}").get("k").value == b"x" for i in range(10))


def test_a_shard_added_over_tls_takes_its_share(cluster: Cluster, tmp_path: Path) -> None:
    """Rebalancing's node-to-node calls (SwapClusterMap, Follow filtered for the move, Fence,
    MigrationStatus) all pass the cluster-certificate gate."""
    with Client(cluster.router, ca_file=cluster.ca) as c:
        for i in range(40):
            c.session(f"moving-{i}").put("k", b"m%d" % i)
    files = devtls.DevCerts(cluster.tls_dir).node("s3")
    s3 = launch.Node("shard", ["--id", "s3", "--data-dir", str(tmp_path / "s3")], port_file=tmp_path / "s3.port",
                     log_path=tmp_path / "s3.log", tls_files=files)
    try:
        s3.start()
        r = cli("admin", "--router", cluster.router, "--tls-ca", cluster.ca, "add-shard", "s3", s3.address)
        assert r.returncode == 0, r.stdout + r.stderr + s3.log_tail()
        with tls.channel(cluster.router, tls=tls.TlsFiles(ca=cluster.ca)) as ch:
            st = state_pb2_grpc.StateStub(ch)
            got = [st.Get(state_pb2.GetRequest(session_id=f"moving-{i}", key="k"), timeout=TIMEOUT_S)
                   for i in range(40)]
        assert [g.record.value for g in got] == [b"m%d" % i for i in range(40)]
        assert "s3" in {g.header.shard_id for g in got}
    finally:
        s3.stop()


# ---- no cluster needed ----

def test_node_only_methods() -> None:
    for m in ("/shardstate.v1.Replication/Follow", "/shardstate.v1.Replication/Fence",
              "/shardstate.v1.Replication/MigrationStatus", "/shardstate.v1.Admin/PublishClusterMap",
              "/shardstate.v1.Admin/SwapClusterMap", "/shardstate.v1.Admin/Status",
              "/shardstate.v1.Admin/PromoteReplica", "/shardstate.v1.Admin/Backup"):
        assert node_only(m), m
    for m in ("/shardstate.v1.State/Get", "/shardstate.v1.State/Pipeline", "/shardstate.v1.Admin/GetClusterMap",
              "/grpc.health.v1.Health/Check"):
        assert not node_only(m), m


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tls.TlsFiles:
    return devtls.DevCerts(tmp_path_factory.mktemp("pki")).node("n1")


def test_tls_files_say_what_is_wrong(pki: tls.TlsFiles, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="needs its key file"):
        tls.TlsFiles(ca=pki.ca, cert=pki.cert).validate()
    with pytest.raises(InvalidArgumentError, match="all three files"):
        tls.TlsFiles(cert=pki.cert, key=pki.key).validate(server=True)
    with pytest.raises(InvalidArgumentError, match=f"{tmp_path}/nope.pem does not exist"):
        tls.TlsFiles(ca=str(tmp_path / "nope.pem")).validate()
    other = devtls.issue(devtls.make_ca(), "x")
    (tmp_path / "k.pem").write_bytes(other.key)
    with pytest.raises(InvalidArgumentError, match="not a matching PEM pair"):
        tls.TlsFiles(ca=pki.ca, cert=pki.cert, key=str(tmp_path / "k.pem")).validate()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(InvalidArgumentError, match="holds no PEM certificate"):
        tls.TlsFiles(ca=str(tmp_path / "junk.pem")).validate()
    with pytest.raises(InvalidArgumentError, match="not both"):
        Client("127.0.0.1:1", ca_file=pki.ca, credentials=grpc.ssl_channel_credentials())
    r = cli("shard", "--id", "x", "--data-dir", str(tmp_path / "d"), "--tls-cert", pki.cert, timeout=60)
    assert r.returncode == 2 and "needs its key file" in r.stderr
    r = cli("router", "--seeds", "127.0.0.1:1", "--tls-cert", pki.cert, "--tls-key", pki.key, timeout=60)
    assert r.returncode == 2 and "all three files" in r.stderr


def test_the_reloader_waits_for_a_matching_pair(pki: tls.TlsFiles, tmp_path: Path) -> None:
    files = tls.TlsFiles(str(tmp_path / "ca.pem"), str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    for src, dst in zip(pki.paths, files.paths, strict=True):
        Path(dst).write_bytes(Path(src).read_bytes())
    reload = tls.Reloader(files)
    assert reload() is None  # unchanged
    ca = devtls.Issued(Path(pki.ca).read_bytes(), (Path(pki.ca).parent / "ca-key.pem").read_bytes())
    fresh = devtls.issue(ca, "n1")
    Path(files.cert).write_bytes(fresh.cert)  # the new certificate, the old key: not yet
    assert reload() is None and reload.reloads == 0
    Path(files.key).write_bytes(fresh.key)
    assert reload() is not None and reload.reloads == 1
    assert reload() is None


def test_channel_credentials_follow_the_files_and_keep_the_last_good_pair(pki: tls.TlsFiles, tmp_path: Path) -> None:
    files = tls.TlsFiles(str(tmp_path / "ca.pem"), str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    for src, dst in zip(pki.paths, files.paths, strict=True):
        Path(dst).write_bytes(Path(src).read_bytes())
    first = files.channel_credentials()
    assert files.channel_credentials() is first  # unchanged files: the same credentials
    ca = devtls.Issued(Path(pki.ca).read_bytes(), (Path(pki.ca).parent / "ca-key.pem").read_bytes())
    fresh = devtls.issue(ca, "n1")
    Path(files.cert).write_bytes(fresh.cert)
    assert files.channel_credentials() is first  # a certificate beside the old key: not yet
    Path(files.key).write_bytes(fresh.key)
    second = files.channel_credentials()
    assert second is not first
    Path(files.key).unlink()
    assert files.channel_credentials() is second  # a file gone mid-replace: the last good pair
