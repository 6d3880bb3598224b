"""The earlier issues' cluster behaviour with TLS and tokens both on: one `shardstate dev --tls
--auth` cluster (2 shards x 1 replica, a router); every client has the CA and a token. CAS from
8 threads ends at exactly 400 through the router and in direct mode; keys, logs, counters,
Txn, Batch, ListSessions and Watch behave as without security; a backup under TLS and tokens
restores into a new secure cluster with every value; a promotion keeps every write."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardstate import Client
from tests.devcluster import Dev, cli

T = 30.0


class Secure:
    def __init__(self, dev: Dev, data: Path) -> None:
        self.dev = dev
        self.router = dev.router
        self.tokens = json.loads((data / "dev-tokens.json").read_text())
        self.files = dev.state()["tls"]

    def client(self, role: str = "readwrite", **kw: Any) -> Client:
        if kw.get("direct"):
            kw.update(cert_file=self.files["client_cert"], key_file=self.files["client_key"])
        return Client(self.router, ca_file=self.files["ca"], token=self.tokens[role], timeout=T, **kw)

    def admin(self, *args: str) -> Any:
        return cli("admin", "--router", self.router, "--tls-ca", self.files["ca"],
                   "--token", self.tokens["admin"], *args, timeout=180)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    data = tmp_path_factory.mktemp("secure") / "data"
    dev = Dev(data, "--tls", "--auth", "--shards", "2", "--replicas", "1")
    try:
        yield Secure(dev, data)
    finally:
        dev.terminate()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("direct", [False, True])
def test_cas_from_8_threads_ends_at_400(secure: Secure, direct: bool) -> None:
    sid = uid("cas")
    with secure.client(direct=direct) as c:
        def work() -> None:
            s = c.session(sid)
            for _ in range(50):
                s.update("n", lambda old: b"%d" % (int(old.value) + 1 if old else 1), attempts=1000)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = c.session(sid).get("n")
        assert got is not None and got.value == b"400"


def test_keys_logs_counters_txn_batch_listing_and_watch(secure: Secure) -> None:
    ns_prefix = uid("api")
    with secure.client() as c, secure.client("read") as rd:
        s = c.session(f"{ns_prefix}-a")
        v = s.put("plan", b"draft")
        s.put("plan", b"final", expect=v)
        assert s.append("messages", [b"hi", b"hello"]) == [1, 2]
        assert [e.data for e in rd.session(f"{ns_prefix}-a").read("messages", last=10)] == [b"hi", b"hello"]
        assert s.incr("steps") == 1 and s.incr("steps", 4) == 5
        r = s.txn().if_log_length("messages", 2).put("done", b"yes").commit()
        assert r.succeeded
        got, n = c.batch().get(f"{ns_prefix}-a", "plan").incr(f"{ns_prefix}-b", "steps").execute()
        assert got is not None and got.value == b"final" and n == 1
        assert sorted(x.session_id for x in rd.list_sessions(prefix=ns_prefix)) == [f"{ns_prefix}-a", f"{ns_prefix}-b"]
        changes: list[Any] = []
        watcher = rd.session(f"{ns_prefix}-a").watch(from_revision=0)

        def follow() -> None:
            for ch in watcher:
                changes.append(ch)
                return

        t = threading.Thread(target=follow)
        t.start()
        deadline_writes = 0
        while t.is_alive() and deadline_writes < 50:
            s.put("seen", b"%d" % deadline_writes)
            deadline_writes += 1
            t.join(0.2)
        assert changes and changes[0].key == "seen"


def test_backup_restores_into_a_new_secure_cluster(secure: Secure, tmp_path: Path) -> None:
    sids = [uid("bk") for _ in range(20)]
    with secure.client() as c:
        versions = {s: c.session(s).put("k", s.encode()) for s in sids}
    out = secure.admin("backup", str(tmp_path / "bk"))
    assert out.returncode == 0, out.stdout + out.stderr
    data = tmp_path / "restored"
    dev = Dev(data, "--tls", "--auth", "--restore", str(tmp_path / "bk"))
    try:
        again = Secure(dev, data)
        with again.client("read") as rd:
            for s in sids:
                rec = rd.session(s).get("k")
                assert rec is not None and rec.value == s.encode() and rec.version == versions[s]
    finally:
        dev.terminate()


def test_promotion_keeps_every_write(secure: Secure) -> None:
    sids = [uid("pr") for _ in range(40)]
    with secure.client() as c:
        for s in sids:
            c.session(s).put("k", s.encode())
    out = secure.admin("promote", "s1")
    assert out.returncode == 0, out.stdout + out.stderr
    out = secure.admin("promote", "s2")
    assert out.returncode == 0, out.stdout + out.stderr
    with secure.client("read") as rd:
        for s in sids:
            rec = rd.session(s).get("k")
            assert rec is not None and rec.value == s.encode()
    with secure.client(direct=True) as d:
        d.session(sids[0]).put("after", b"promote")
        assert d.session(sids[0]).get("after").value == b"promote"  # type: ignore[union-attr]
