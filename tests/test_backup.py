"""Online backup and restore (`shardstate admin backup/restore`, docs/design.md §13) with real
processes: a backup taken while clients write holds exactly the writes at or below each
shard's snapshot revision (every write acknowledged before it began among them), with their
versions; a restore into a fresh cluster gives them back; bad input and full shards are refused.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from shardstate.common.clustermap import ClusterView
from shardstate.server import launch
from shardstate.v1 import admin_pb2, admin_pb2_grpc, state_pb2, state_pb2_grpc
from tests.devcluster import cli
from tests.procs import Procs
from tests.routercluster import RouterCluster, T

WRITERS = 4
SESSIONS_PER_WRITER = 6


@dataclass
class Acked:
    """Every acknowledged write, with the version (revision) the shard gave it."""

    puts: list[tuple[str, int, bytes, state_pb2.PutRequest]] = field(default_factory=list)  # sid, version, value, request
    appends: list[tuple[str, int, int, bytes]] = field(default_factory=list)  # sid, seq, revision, data
    failed: list[str] = field(default_factory=list)

    def count(self) -> int:
        return len(self.puts) + len(self.appends)


async def writer(router: str, sids: list[str], acked: Acked, stop: asyncio.Event) -> None:
    """CAS increments of key `n` and appends to stream `log`, round robin over its sessions."""
    async with aio.insecure_channel(router) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        version = dict.fromkeys(sids, 0)
        count = dict.fromkeys(sids, 0)
        i = 0
        while not stop.is_set():
            sid = sids[i % len(sids)]
            i += 1
            try:
                value = str(count[sid] + 1).encode()
                req = state_pb2.PutRequest(session_id=sid, key="n", value=value, expected_version=version[sid],
                                           request_id=uuid.uuid4().hex)
                r = await stub.Put(req, timeout=T)
                assert r.applied, (sid, r)  # one writer per session: the CAS always matches
                version[sid], count[sid] = r.version, count[sid] + 1
                acked.puts.append((sid, r.version, value, req))
                data = f"{sid}-{i}".encode()
                a = await stub.Append(state_pb2.AppendRequest(session_id=sid, stream="log", entries=[data],
                                                              request_id=uuid.uuid4().hex), timeout=T)
                acked.appends.append((sid, a.seqs[0], a.revision, data))
            except grpc.RpcError as e:
                acked.failed.append(f"{sid}: {e.code()} {e.details()}")  # type: ignore[attr-defined]


async def cli_async(*args: str) -> subprocess.CompletedProcess[str]:
    p = await asyncio.create_subprocess_exec(*launch.shardstate_cmd(*args), stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 120)
    assert p.returncode is not None
    return subprocess.CompletedProcess(args, p.returncode, out.decode(), err.decode())


async def backup_under_load(router: str, dest: Path) -> tuple[Acked, Acked, dict[str, Any]]:
    """Writers run; once some writes are in, the backup runs while they go on, and they keep
    going after it. Returns (writes acknowledged before the backup began, all writes, manifest)."""
    acked, stop = Acked(), asyncio.Event()
    tasks = [asyncio.create_task(writer(router, [f"w{w}-s{j}" for j in range(SESSIONS_PER_WRITER)], acked, stop))
             for w in range(WRITERS)]
    try:
        while acked.count() < 200:
            await asyncio.sleep(0.01)
        before = Acked(list(acked.puts), list(acked.appends))
        res = await cli_async("admin", "--router", router, "backup", str(dest), "--json")
        assert res.returncode == 0, res.stderr
        after_backup = acked.count()
        while acked.count() < after_backup + 100:
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return before, acked, json.loads(res.stdout)


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RouterCluster, RouterCluster, Procs]]:
    procs = Procs(tmp_path_factory.mktemp("backup"))
    a = RouterCluster(procs, shards=3, routers=1)
    b = RouterCluster(procs, shards=3, routers=1)
    try:
        yield a, b, procs
    finally:
        a.close()
        b.close()
        procs.close()


@pytest.fixture(scope="module")
def taken(clusters: tuple[RouterCluster, RouterCluster, Procs], tmp_path_factory: pytest.TempPathFactory) -> Any:
    a, b, _ = clusters
    dest = tmp_path_factory.mktemp("dest") / "bk"
    before, acked, manifest = asyncio.run(backup_under_load(a.routers[0].address, dest))
    res = cli("admin", "--router", b.routers[0].address, "restore", str(dest), "--json")
    assert res.returncode == 0, res.stderr
    return dest, before, acked, manifest, json.loads(res.stdout)


def test_restore_holds_exactly_the_writes_up_to_each_shards_snapshot_revision(
        clusters: tuple[RouterCluster, RouterCluster, Procs], taken: Any) -> None:
    a, b, _ = clusters
    _dest, before, acked, manifest, restored = taken
    assert acked.failed == []
    point = {s["id"]: s["revision"] for s in manifest["shards"]}
    assert sorted(point) == ["s1", "s2", "s3"] and all(s["epoch"] == manifest["epoch"] for s in manifest["shards"])
    assert {r["shard_id"]: int(r["revision"]) >= point[r["shard_id"]] for r in restored} == dict.fromkeys(point, True)
    view = ClusterView.of(a.stub(a.routers[0]).admin.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=T))
    owner = {sid: view.owner("", sid).id for sid, *_ in acked.puts}
    assert set(owner.values()) == set(point), "the sessions span every shard"

    # Every write acknowledged before the backup began is at or below the snapshot point.
    assert all(v <= point[owner[sid]] for sid, v, _, _ in before.puts)
    assert all(rev <= point[owner[sid]] for sid, _, rev, _ in before.appends)
    later = [w for w in acked.puts if w[1] > point[owner[w[0]]]]
    assert later, "writes went on after the snapshot point (else nothing below could be missing)"

    rb = b.stub(b.routers[0])
    for sid in sorted(owner):
        mine = [w for w in acked.puts if w[0] == sid]
        kept = [w for w in mine if w[1] <= point[owner[sid]]]
        g = rb.get(sid, "n")
        assert g.found == bool(kept), sid
        if kept:  # the last write at or below the point, with its version; the first created it
            assert (g.record.version, g.record.value, g.record.create_version) == (kept[-1][1], kept[-1][2], kept[0][1])
        log = rb.state.ReadLog(state_pb2.ReadLogRequest(session_id=sid, stream="log"), timeout=T)
        want = [(seq, rev, data) for s, seq, rev, data in acked.appends if s == sid and rev <= point[owner[sid]]]
        assert [(e.seq, e.revision, e.data) for e in log.entries] == want, sid
        info = rb.state.GetSession(state_pb2.GetSessionRequest(session_id=sid), timeout=T).session
        top = max([v for _, v, _, _ in kept] + [rev for _, rev, _ in want], default=0)
        assert info.max_version == top, sid

    # Idempotency records came along: a pre-backup Put sent again is a replay of the same write.
    sid, version, _, req = before.puts[-1]
    again = rb.state.Put(req, timeout=T)
    assert (again.header.replayed, again.version) == (True, version)
    # The revision clock continues above every restored revision.
    fresh = rb.put(sid, "after-restore", b"x")
    assert fresh.version > point[owner[sid]]
    st = rb.admin.Status(admin_pb2.StatusRequest(), timeout=T)
    for n in st.nodes:
        if n.role == admin_pb2.PRIMARY:
            assert n.revision >= point[n.shard_id]


def test_manifest_counts_match_what_the_shards_held(taken: Any) -> None:
    dest, before, _acked, manifest, restored = taken
    files = sorted(p.name for p in (dest / "shards").iterdir())
    assert files == ["s1.chunks", "s2.chunks", "s3.chunks"]
    c = {k: sum(s["counts"][k] for s in manifest["shards"]) for k in ("sessions", "records", "log_entries")}
    sids = {sid for sid, *_ in before.puts}
    assert c["sessions"] >= len(sids) and c["records"] == c["sessions"]  # one key `n` per session
    assert c["log_entries"] >= len(before.appends)
    assert sum(int(r["entries"]) for r in restored) == sum(s["counts"]["entries"] for s in manifest["shards"])


def test_restore_into_a_cluster_that_holds_data_is_refused_naming_the_shard(
        clusters: tuple[RouterCluster, RouterCluster, Procs], taken: Any) -> None:
    _a, b, _ = clusters
    dest = taken[0]
    res = cli("admin", "--router", b.routers[0].address, "restore", str(dest))
    assert res.returncode == 1 and "is not empty" in res.stderr and "shard s" in res.stderr, res.stderr
    # The shard's own check (the CLI's Status check aside): FAILED_PRECONDITION naming it.
    with open(dest / "shards" / "s2.chunks", "rb") as f:
        from shardstate.server.cli.backup import frames

        msgs = [m for _, m in frames(f, "s2")]
    with pytest.raises(grpc.RpcError) as e:
        b.stub(b.routers[0]).admin.Restore(iter(msgs), timeout=T)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "shard s2" in e.value.details() and "not empty" in e.value.details()  # type: ignore[attr-defined]


def test_bad_backups_are_refused_with_clear_errors(clusters: tuple[RouterCluster, RouterCluster, Procs],
                                                   taken: Any, tmp_path: Path) -> None:
    a, b, _ = clusters
    dest = taken[0]
    router = b.routers[0].address

    def restore(path: Path) -> str:
        res = cli("admin", "--router", router, "restore", str(path))
        assert res.returncode == 1, res.stdout
        return res.stderr

    assert "no backup at" in restore(tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(dest, corrupt)
    (corrupt / "manifest.json").write_text("{not json")
    assert "manifest.json is corrupt" in restore(corrupt)
    nomanifest = tmp_path / "nomanifest"
    shutil.copytree(dest, nomanifest)
    (nomanifest / "manifest.json").unlink()
    assert "holds no manifest.json" in restore(nomanifest)
    flipped = tmp_path / "flipped"
    shutil.copytree(dest, flipped)
    data = bytearray((flipped / "shards" / "s1.chunks").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "shards" / "s1.chunks").write_bytes(bytes(data))
    assert "checksum mismatch for shard s1" in restore(flipped)
    # A backup never lands on a path that holds files.
    res = cli("admin", "--router", a.routers[0].address, "backup", str(dest))
    assert res.returncode == 1 and "exists and holds files" in res.stderr, res.stderr
    # A backup whose shard ids the cluster lacks.
    m = json.loads((dest / "manifest.json").read_text())
    m["cluster_map"]["shards"][0]["id"] = "zz"
    other = tmp_path / "other"
    shutil.copytree(dest, other)
    (other / "manifest.json").write_text(json.dumps(m))
    assert "same shard ids" in restore(other)


def test_tar_backup_restores_into_dev(clusters: tuple[RouterCluster, RouterCluster, Procs], taken: Any,
                                      tmp_path: Path) -> None:
    """`--tar` writes one file; `shardstate dev --restore` starts a cluster holding it."""
    a, _, _ = clusters
    tar = tmp_path / "bk.tar"
    res = cli("admin", "--router", a.routers[0].address, "backup", str(tar), "--tar", "--json")
    assert res.returncode == 0, res.stderr
    manifest = json.loads(res.stdout)
    assert tar.is_file() and not list(tmp_path.glob(".*partial*"))
    from tests.devcluster import Dev

    dev = Dev(tmp_path / "dev", "--port", "0", "--replicas", "0", "--restore", str(tar))
    try:
        with grpc.insecure_channel(dev.router) as ch:
            st = admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=T)
            stub = state_pb2_grpc.StateStub(ch)
            g = a.stub(a.routers[0]).get("w0-s0", "n")
            # cluster A kept no writes after the tar backup, so the record is as A holds it.
            got = stub.Get(state_pb2.GetRequest(session_id="w0-s0", key="n"), timeout=T)
        assert (got.record.version, got.record.value) == (g.record.version, g.record.value)
        keys = sum(n.keys for n in st.nodes if n.role == admin_pb2.PRIMARY)
        assert keys == sum(s["counts"]["records"] for s in manifest["shards"])
    finally:
        dev.stop()
    # dev refuses to restore into a data dir that holds a cluster.
    res = cli("dev", "--port", "0", "--data-dir", str(tmp_path / "dev"), "--restore", str(tar), timeout=60)
    assert res.returncode == 1 and "holds a cluster already" in res.stderr, res.stderr


def test_a_backup_cut_by_kill_9_of_a_shard_leaves_nothing_restore_takes(tmp_path: Path) -> None:
    procs = Procs(tmp_path / "procs")
    (tmp_path / "procs").mkdir()
    try:
        c = RouterCluster(procs, shards=2, routers=1)
        router = c.stub(c.routers[0])
        big = b"x" * (1 << 20)
        for i in range(48):  # ~24 MiB a shard: far more than gRPC buffers between shard and CLI
            router.put(f"big{i}", "v", big)
        dest = tmp_path / "bk"
        p = subprocess.Popen(launch.shardstate_cmd("admin", "--router", c.routers[0].address, "backup", str(dest)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            chunks = None
            deadline = time.monotonic() + 60
            while chunks is None and time.monotonic() < deadline:
                chunks = next((f for f in tmp_path.glob(".bk.partial-*/shards/s1.chunks") if f.stat().st_size), None)
                time.sleep(0.005)
            assert chunks is not None, "the backup started streaming s1"
            partial = chunks.parent.parent
            p.send_signal(signal.SIGSTOP)  # it stops reading: s1 cannot finish its stream meanwhile
            c.shards[0].kill()
            p.send_signal(signal.SIGCONT)
            _out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 1 and "UNAVAILABLE" in err and "shard s1" in err, err
        assert not dest.exists() and not partial.exists()
        for path in (dest, partial):
            res = cli("admin", "--router", c.routers[0].address, "restore", str(path))
            assert res.returncode == 1 and "no backup at" in res.stderr, res.stderr
        c.close()
    finally:
        procs.close()


def test_a_restore_cut_short_is_run_again_and_completes(tmp_path: Path) -> None:
    (tmp_path / "procs").mkdir()
    procs = Procs(tmp_path / "procs")
    try:
        src = RouterCluster(procs, shards=1, routers=1)
        for i in range(3000):  # more than one chunk
            src.stub(src.routers[0]).put(f"s{i % 50}", f"k{i}", b"v" * 100)
        res = cli("admin", "--router", src.routers[0].address, "backup", str(tmp_path / "bk"))
        assert res.returncode == 0, res.stderr
        dst = RouterCluster(procs, shards=1, routers=1)
        router = dst.stub(dst.routers[0])
        from shardstate.server.cli.backup import frames

        with open(tmp_path / "bk" / "shards" / "s1.chunks", "rb") as f:
            msgs = [m for _, m in frames(f, "s1")]
        assert len(msgs) > 2 and not msgs[1].snapshot.last
        with pytest.raises(grpc.RpcError) as e:  # the header and the first chunk, then the stream ends
            router.admin.Restore(iter(msgs[:2]), timeout=T)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "run the restore again" in e.value.details()  # type: ignore[attr-defined]
        res = cli("admin", "--router", dst.routers[0].address, "restore", str(tmp_path / "bk"))
        assert res.returncode == 0, res.stderr
        want = src.stub(src.routers[0]).get("s7", "k2957").record
        got = router.get("s7", "k2957").record
        assert (got.version, got.create_version, got.value) == (want.version, want.create_version, want.value)
        keys = sum(n.keys for n in router.admin.Status(admin_pb2.StatusRequest(), timeout=T).nodes)
        assert keys == 3000
        src.close()
        dst.close()
    finally:
        procs.close()


def test_a_shard_backs_up_only_the_sessions_it_owns_and_none_during_a_rebalance(tmp_path: Path) -> None:
    """Sessions that moved away stay on a shard for a grace period: they are not its backup."""
    procs = Procs(tmp_path)
    try:
        shard = procs.shard("s1")
        from tests.routercluster import Stubs

        st = Stubs(shard.address)
        sids = [f"u{i}" for i in range(40)]
        for sid in sids:  # no map yet: s1 owns every session
            st.put(sid, "k", b"v")
        pb = admin_pb2.ClusterMap(epoch=1, shards=[admin_pb2.ShardInfo(id="s1", primary=shard.address),
                                                   admin_pb2.ShardInfo(id="s2", primary="127.0.0.1:1")])
        assert st.admin.PublishClusterMap(pb, timeout=T).adopted
        mine = {s for s in sids if ClusterView.of(pb).owner("", s).id == "s1"}
        assert 0 < len(mine) < len(sids)
        msgs = list(st.admin.Backup(admin_pb2.BackupRequest(shard_id="s1", epoch=1), timeout=T))
        assert msgs[0].header.counts.sessions == len(mine) and msgs[0].header.counts.records == len(mine)
        from shardstate.server.migration.keys import session_of

        got = {session_of(op.key) for m in msgs[1:] for op in m.snapshot.ops} - {None}
        assert got == {(b"default", s.encode()) for s in mine}
        with pytest.raises(grpc.RpcError) as e:  # a map at another epoch than the backup's
            list(st.admin.Backup(admin_pb2.BackupRequest(shard_id="s1", epoch=7), timeout=T))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        moving = admin_pb2.ClusterMap()
        moving.CopyFrom(pb)
        moving.epoch = 2
        moving.migrations.add(source="s1", target="s2", started_epoch=2, phase="copy")
        assert st.admin.PublishClusterMap(moving, timeout=T).adopted
        with pytest.raises(grpc.RpcError) as e:
            list(st.admin.Backup(admin_pb2.BackupRequest(shard_id="s1"), timeout=T))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        assert "rebalance is under way" in e.value.details()  # type: ignore[attr-defined]
        st.close()
    finally:
        procs.close()
