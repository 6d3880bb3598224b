"""A node killed with -9 and started again, in place or on a new address (port 0): every
acknowledged write is there, routers and replicas find it again, and a node that is gone for
good can be removed from the cluster map."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from shardstate.common import errors, portfile
from shardstate.router.admin import drop_node
from shardstate.server.replication.mapsync import replace_address
from shardstate.v1 import admin_pb2, admin_pb2_grpc, state_pb2, state_pb2_grpc
from tests.devcluster import Dev, cli, gone
from tests.faults.report import Tally, fault_line
from tests.procs import Procs
from tests.stubs import CALL_TIMEOUT_S, uid, wait_until

LOAD_THREADS = 4
LOAD_MAX_OPS = 3000  # per thread: the load stops by itself even if a test forgets to stop it
LOAD_MAX_S = 60.0


class PutLoad:
    """Threads putting fresh keys through one address, carrying on after errors (counted),
    recording every acknowledged put."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[tuple[str, str], tuple[bytes, int]] = {}
        self.errors: list[grpc.StatusCode] = []
        self.sessions = [uid("load") for _ in range(16)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(LOAD_THREADS)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        deadline = time.monotonic() + LOAD_MAX_S
        with grpc.insecure_channel(self.address) as ch:
            st = state_pb2_grpc.StateStub(ch)
            for j in range(LOAD_MAX_OPS):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                sid, key, value = self.sessions[j % len(self.sessions)], f"t{i}/k{j}", b"v%d-%d" % (i, j)
                try:
                    r = st.Put(state_pb2.PutRequest(session_id=sid, key=key, value=value), timeout=5)
                except grpc.RpcError as e:
                    with self.lock:
                        self.errors.append(e.code())  # type: ignore[attr-defined]
                    time.sleep(0.05)
                    continue
                with self.lock:
                    self.acked[(sid, key)] = (value, r.version)

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def lost(self, address: str) -> int:
        """Acknowledged puts that do not read back with their value and version."""
        missing = 0
        items = sorted(self.acked.items())
        with grpc.insecure_channel(address) as ch:
            st = state_pb2_grpc.StateStub(ch)
            for start in range(0, len(items), 500):
                chunk = items[start:start + 500]
                ops = [state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=s, key=k)) for (s, k), _ in chunk]
                resp = st.Batch(state_pb2.BatchRequest(ops=ops), timeout=CALL_TIMEOUT_S)
                for (_, want), r in zip(chunk, resp.results, strict=True):
                    if not (r.code == 0 and r.get.found and (r.get.record.value, r.get.record.version) == want):
                        missing += 1
        return missing


class Restarted:
    """Nodes a test started again by hand (not children of dev): killed at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.popens: list[subprocess.Popen[bytes]] = []

    def again(self, cmdline: list[str], name: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "SHARDSTATE_SUPERVISOR_PID"}
        with open(self.tmp / f"{name}-again.log", "ab") as log:
            p = subprocess.Popen([sys.executable, *cmdline[1:]], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.popens.append(p)
        return p

    def close(self) -> None:
        for p in self.popens:
            if p.poll() is None:
                p.kill()
                p.wait(30)


@pytest.fixture
def restarted(tmp_path: Path) -> Iterator[Restarted]:
    r = Restarted(tmp_path)
    try:
        yield r
    finally:
        r.close()


def dev_node(data: Path, name: str) -> tuple[int, str, list[str]]:
    """(pid, address, command line) of one of dev's nodes."""
    n = json.loads((data / "dev.json").read_text())["nodes"][name]
    argv = Path(f"/proc/{n['pid']}/cmdline").read_bytes().split(b"\0")
    return n["pid"], n["address"], [a.decode() for a in argv if a]


def kill9(pid: int) -> None:
    os.kill(pid, 9)
    wait_until(lambda: gone(pid), timeout=30)


def new_address(data: Path, name: str, old: str) -> str:
    """The address the restarted node wrote to its port file (dev's --port-file)."""
    def read() -> str:
        port = portfile.read(data / "run" / f"{name}.port")
        addr = f"127.0.0.1:{port}" if port else ""
        return addr if addr and addr != old else ""
    return str(wait_until(read, timeout=90))


def router_map(router: str) -> admin_pb2.ClusterMap:
    with grpc.insecure_channel(router) as ch:
        return admin_pb2_grpc.AdminStub(ch).GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=CALL_TIMEOUT_S)


def writes_reach(router: str, shard: str) -> bool:
    """A put through the router to a session `shard` owns succeeds."""
    with grpc.insecure_channel(router) as ch:
        st = state_pb2_grpc.StateStub(ch)
        for i in range(64):
            try:
                r = st.Put(state_pb2.PutRequest(session_id=f"probe-{i}", key="k", value=b"v"), timeout=5)
            except grpc.RpcError:
                return False
            if r.header.shard_id == shard:
                return True
    return False


def own_status(address: str) -> admin_pb2.NodeStatus:
    with grpc.insecure_channel(address) as ch:
        return admin_pb2_grpc.AdminStub(ch).Status(admin_pb2.StatusRequest(), timeout=CALL_TIMEOUT_S).nodes[0]


def test_kill_9_of_a_primary_restarted_in_place_keeps_every_acknowledged_write(procs: Procs) -> None:
    primary = procs.shard("s1")
    replica = procs.shard("s1", "--replica-of", primary.address)
    router = procs.router([primary.address, replica.address])
    load = PutLoad(router.address)
    try:
        wait_until(lambda: load.count() >= 200, timeout=60)
        primary.kill()
        primary.start()  # same port: the map stays valid
        before = load.count()
        wait_until(lambda: load.count() >= before + 200, timeout=60)
    finally:
        load.finish()
    t = Tally("kill -9 primary, restart in place", acked=len(load.acked), lost=load.lost(router.address),
              caller_errors=len(load.errors))
    assert fault_line(t) == t.line()
    assert t.acked >= 400 and t.lost == 0
    assert set(load.errors) <= {grpc.StatusCode.UNAVAILABLE}, load.errors


def test_kill_9_of_a_primary_restarted_on_a_new_port_is_found_again(
        tmp_path: Path, devs: list[Dev], restarted: Restarted) -> None:
    data = tmp_path / "data"
    dev = Dev(data, "--shards", "2", "--replicas", "1")
    devs.append(dev)
    pid, old, cmdline = dev_node(data, "s1")
    _, replica, _ = dev_node(data, "s1-r1")
    load = PutLoad(dev.router)
    try:
        wait_until(lambda: load.count() >= 200, timeout=60)
        kill9(pid)
        restarted.again(cmdline, "s1")  # the same command line: --listen 127.0.0.1:0
        new = new_address(data, "s1", old)
        wait_until(lambda: writes_reach(dev.router, "s1"), timeout=90)
        before = load.count()
        wait_until(lambda: load.count() >= before + 300, timeout=90)
    finally:
        load.finish()
    pb = router_map(dev.router)
    s1 = next(s for s in pb.shards if s.id == "s1")
    assert (s1.primary, list(s1.replicas)) == (new, [replica])
    assert old not in {a for s in pb.shards for a in (s.primary, *s.replicas)}
    wait_until(lambda: own_status(replica).primary == new, timeout=60)
    t = Tally("kill -9 primary, restart on a new port", acked=len(load.acked), lost=load.lost(dev.router),
              caller_errors=len(load.errors), note=f"map_epoch={pb.epoch}")
    assert fault_line(t) == t.line()
    assert t.acked >= 500 and t.lost == 0
    assert set(load.errors) <= {grpc.StatusCode.UNAVAILABLE}, load.errors
    r = cli("admin", "--router", dev.router, "status")
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_replica_restarted_on_a_new_port_replaces_its_old_entry(
        tmp_path: Path, devs: list[Dev], restarted: Restarted) -> None:
    data = tmp_path / "data"
    dev = Dev(data, "--shards", "1", "--replicas", "1")
    devs.append(dev)
    primary = dev_node(data, "s1")[1]
    pid, old, cmdline = dev_node(data, "s1-r1")
    kill9(pid)
    restarted.again(cmdline, "s1-r1")
    new = new_address(data, "s1-r1", old)

    def listed() -> bool:
        s1 = router_map(dev.router).shards[0]
        return (s1.primary, list(s1.replicas)) == (primary, [new])

    wait_until(listed, timeout=60)  # the router re-reads the map every 5 s
    assert own_status(new).primary == primary
    r = cli("admin", "--router", dev.router, "status")
    assert r.returncode == 0, r.stdout + r.stderr
    assert old not in r.stdout and new in r.stdout


def test_a_dead_node_can_be_removed_from_the_map(tmp_path: Path, devs: list[Dev]) -> None:
    data = tmp_path / "data"
    dev = Dev(data, "--shards", "1", "--replicas", "2")
    devs.append(dev)
    primary = dev_node(data, "s1")[1]
    live = dev_node(data, "s1-r1")[1]
    pid, dead, _ = dev_node(data, "s1-r2")
    wait_until(lambda: sorted(router_map(dev.router).shards[0].replicas) == sorted([live, dead]), timeout=60)
    epoch = router_map(dev.router).epoch
    kill9(pid)
    assert cli("admin", "--router", dev.router, "status").returncode == 1

    r = cli("admin", "--router", dev.router, "remove-node", primary)
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "primary of shard s1" in r.stderr, r.stderr
    r = cli("admin", "--router", dev.router, "remove-node", live)
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "is up" in r.stderr, r.stderr
    r = cli("admin", "--router", dev.router, "remove-node", "127.0.0.1:1")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "127.0.0.1:1" in r.stderr, r.stderr
    assert router_map(dev.router).epoch == epoch  # a refused removal changes nothing

    r = cli("admin", "--router", dev.router, "remove-node", dead)
    assert r.returncode == 0, r.stderr
    assert dead in r.stdout and f"epoch {epoch + 1}" in r.stdout
    pb = router_map(dev.router)
    assert (pb.epoch, pb.shards[0].primary, list(pb.shards[0].replicas)) == (epoch + 1, primary, [live])
    assert own_status(primary).epoch == epoch + 1 and own_status(live).epoch == epoch + 1
    assert cli("admin", "--router", dev.router, "status").returncode == 0


# ---- the pure map edits behind the scenarios ----


def shard_map(primary: str, *replicas: str) -> admin_pb2.ClusterMap:
    pb = admin_pb2.ClusterMap(epoch=4)
    pb.shards.add(id="s1", primary=primary, replicas=list(replicas), state=admin_pb2.ACTIVE)
    pb.shards.add(id="s2", primary="b:1", replicas=["b:2"], state=admin_pb2.ACTIVE)
    return pb


def test_replace_address_puts_the_new_address_in_the_old_ones_place() -> None:
    pb = shard_map("a:1", "a:2", "a:3")
    assert replace_address(pb, "s1", "a:1", "a:9")
    assert (pb.shards[0].primary, list(pb.shards[0].replicas)) == ("a:9", ["a:2", "a:3"])
    pb = shard_map("a:1", "a:2", "a:3")
    assert replace_address(pb, "s1", "a:2", "a:9")
    assert list(pb.shards[0].replicas) == ["a:9", "a:3"]
    pb = shard_map("a:1", "a:2", "a:9")  # the primary registered the new address first
    assert replace_address(pb, "s1", "a:2", "a:9")
    assert list(pb.shards[0].replicas) == ["a:9"]
    pb = shard_map("a:1", "a:2")
    assert not replace_address(pb, "s1", "b:2", "a:9")  # another shard's node: untouched
    assert not replace_address(pb, "s3", "a:1", "a:9")
    assert pb == shard_map("a:1", "a:2") and pb.epoch == 4  # the caller sets the epoch


def test_drop_node_removes_a_replica_and_refuses_anything_else() -> None:
    pb = shard_map("a:1", "a:2", "a:3")
    drop_node(pb, "a:2")
    assert list(pb.shards[0].replicas) == ["a:3"]
    with pytest.raises(errors.FailedPreconditionError, match="a:1 is the primary of shard s1"):
        drop_node(pb, "a:1")
    with pytest.raises(errors.NotFoundError, match="a:7 is not in the cluster map"):
        drop_node(pb, "a:7")
    assert list(pb.shards[0].replicas) == ["a:3"] and pb.shards[0].primary == "a:1"
