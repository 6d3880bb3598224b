"""The secure overlay's processes form a working cluster with TLS and tokens: every pod of
deploy/k8s/secure (two shard groups of a primary and a replica, two routers) runs as a real
process with its container's arguments (tests/deploy_pods.py), its two Secrets directories of
what an operator would put in them, made by the code `shardstate dev --tls --auth` uses:

- shardstate-tls: a throwaway CA (ca.crt) and one node certificate (tls.crt, tls.key; CN
  shardstate-node) naming every pod's address, as the README's certificate names every pod's
  DNS name (the wildcards per group, localhost) which each address stands for here;
- shardstate-auth: tokens.toml and cluster-token as `dev --auth` writes them.

A client with the CA and a token writes through one router and reads back through the other;
without a token it gets UNAUTHENTICATED; plaintext does not connect; the routers' map (made
from the pod-name seeds) holds each group's primary and replica, which follows it over mTLS;
every pod's exec probes pass, and a shard's fails without the pod's certificate.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shardstate import Client, UnauthenticatedError
from shardstate.common import tls
from shardstate.common.authwire import with_token
from shardstate.server import launch
from shardstate.server.cli import devauth, devtls
from shardstate.v1 import admin_pb2, admin_pb2_grpc
from tests.deploy_pods import Kubelet, Pod, pods_of, running
from tests.deploy_support import build, render_module
from tests.replicas import wait_for

render = render_module()
T = 30.0
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


@dataclass
class Secure:
    pods: list[Pod]
    kubelet: Kubelet
    ca: str
    node: tls.TlsFiles  # the pods' certificate, for calls a node would make
    tokens: dict[str, str]
    cluster_token: str

    def address(self, name: str) -> str:
        (p,) = [p for p in self.pods if p.name == name]
        return f"{p.host}:{7401 if p.kind == 'shard' else 7400}"

    def status(self, name: str) -> admin_pb2.NodeStatus:
        """A node's own Status line, asked as a node asks (cluster certificate and token)."""
        with tls.channel(self.address(name), tls=self.node) as ch:
            stub = admin_pb2_grpc.AdminStub(with_token(ch, self.cluster_token))
            return stub.Status(admin_pb2.StatusRequest(), timeout=T).nodes[0]


def make_secrets(root: Path, pods: list[Pod]) -> tuple[dict[str, Path], devauth.DevAuth]:
    """The two Secrets' directories, one file per key."""
    tls_dir, auth_dir = root / render.TLS_SECRET, root / render.AUTH_SECRET
    for d in (tls_dir, auth_dir, root / "dev"):
        d.mkdir(parents=True)
    ca = devtls.make_ca()
    devtls.write_public(tls_dir / render.CA, ca.cert)
    devtls.save(devtls.issue(ca, tls.DEFAULT_NODE_NAME, [p.host for p in pods]),
                tls_dir / render.CERT, tls_dir / render.KEY)
    dev = devauth.prepare(root / "dev")  # tokens.toml, cluster-token (and the tokens, for clients)
    for key in (render.TOKENS, render.CLUSTER_TOKEN):  # kubectl create secret generic --from-file=KEY
        shutil.copy(root / "dev" / key, auth_dir / key)
    return {render.TLS_SECRET: tls_dir, render.AUTH_SECRET: auth_dir}, dev


@pytest.fixture
def secure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Secure]:
    monkeypatch.delenv("SHARDSTATE_TOKEN", raising=False)  # a client without token= sends none
    assert render.main(["--out", str(tmp_path / "k8s"), "--shards", "2", "--replicas", "1", "--routers", "2"]) == 0
    pods = pods_of(build(tmp_path / "k8s" / "secure"))
    secrets, dev = make_secrets(tmp_path / "secrets", pods)
    tls_dir = secrets[render.TLS_SECRET]
    node = tls.TlsFiles(ca=str(tls_dir / render.CA), cert=str(tls_dir / render.CERT), key=str(tls_dir / render.KEY))
    with running(pods, tmp_path, secrets) as kubelet:
        yield Secure(pods, kubelet, node.ca, node, dev.tokens, dev.cluster_token)


def test_the_secure_manifests_processes_serve_tls_and_tokens(secure: Secure) -> None:
    routers = [secure.address(p.name) for p in secure.pods if p.kind == "router"]
    assert len(routers) == 2

    # put through one router, read back through the other: the CA and a token
    sessions = [f"agent-{i}" for i in range(20)]
    token = secure.tokens["readwrite"]
    with (Client(routers[0], ca_file=secure.ca, token=token, timeout=T) as a,
          Client(routers[1], ca_file=secure.ca, token=token, timeout=T) as b):
        versions = {sid: a.session(sid).put("state", sid.encode()) for sid in sessions}
        for sid in sessions:
            rec = b.session(sid).get("state")
            assert rec is not None and (rec.value, rec.version) == (sid.encode(), versions[sid])
    # the CA without a token: refused; no TLS: no connection
    with Client(routers[0], ca_file=secure.ca, timeout=T) as anonymous, pytest.raises(UnauthenticatedError):
        anonymous.session(sessions[0]).get("state")
    for r in routers:
        assert launch.health(r, files=None).startswith("UNAVAILABLE")

    # the map the routers made from the pods' names: each group's pod 0 primary, pod 1 its replica
    with tls.channel(routers[1], tls=tls.TlsFiles(ca=secure.ca)) as ch:
        stub = admin_pb2_grpc.AdminStub(with_token(ch, secure.tokens["read"]))
        pb = stub.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T)
    addr = secure.address
    assert {(s.id, s.primary, tuple(s.replicas)) for s in pb.shards} == {
        (sid, addr(f"shardstate-{sid}-0"), (addr(f"shardstate-{sid}-1"),)) for sid in ("s1", "s2")}
    # and each replica follows its primary (mTLS, cluster certificate and token)
    keys = 0
    for sid in ("s1", "s2"):
        primary, replica = f"shardstate-{sid}-0", f"shardstate-{sid}-1"
        st = secure.status(replica)
        assert (st.role, st.primary) == (admin_pb2.REPLICA, addr(primary))
        held = secure.status(primary).keys
        wait_for(lambda p=primary, r=replica: secure.status(r).keys == secure.status(p).keys, f"{replica} to catch up")
        keys += held
    assert keys == len(sessions)


def test_every_pods_probes_pass_over_tls_and_a_shards_needs_its_certificate(secure: Secure) -> None:
    for p in secure.pods:
        commands = {tuple(secure.kubelet.probe(p, probe)) for probe in PROBES}
        assert len(commands) == 1  # the same check, at different rates
        (command,) = commands
        r = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (p.name, command, r.stderr)
    shard = next(p for p in secure.pods if p.kind == "shard")
    command = list(secure.kubelet.probe(shard, "readinessProbe"))
    for flag in ("--tls-cert", "--tls-key"):
        i = command.index(flag)
        del command[i : i + 2]
    r = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and ": UNAVAILABLE" in r.stderr, r.stderr  # the handshake wants a certificate
