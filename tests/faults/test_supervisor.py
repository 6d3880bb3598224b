"""The supervisor and its children are one unit: kill -9 of `shardstate dev` takes every child
with it and the next dev on the directory serves the old data; a directory in use is refused
with one line naming the holder, touching nothing of the running cluster."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc

from shardstate.v1 import state_pb2, state_pb2_grpc
from tests.devcluster import Dev, cli, gone
from tests.faults.report import Tally, fault_line
from tests.procs import Procs
from tests.stubs import CALL_TIMEOUT_S, wait_until

WRITES = 60


def put_all(router: str, prefix: str, n: int) -> tuple[dict[str, bytes], int]:
    """n puts through the router; (acknowledged session -> value, errors)."""
    acked: dict[str, bytes] = {}
    failed = 0
    with grpc.insecure_channel(router) as ch:
        st = state_pb2_grpc.StateStub(ch)
        for i in range(n):
            sid, value = f"{prefix}-{i}", b"v%d" % i
            try:
                st.Put(state_pb2.PutRequest(session_id=sid, key="k", value=value), timeout=CALL_TIMEOUT_S)
            except grpc.RpcError:
                failed += 1
                continue
            acked[sid] = value
    return acked, failed


def lost(router: str, acked: dict[str, bytes]) -> int:
    with grpc.insecure_channel(router) as ch:
        st = state_pb2_grpc.StateStub(ch)
        return sum(1 for sid, value in acked.items()
                   if st.Get(state_pb2.GetRequest(session_id=sid, key="k"), timeout=CALL_TIMEOUT_S).record.value != value)


def test_kill_9_of_the_supervisor_takes_every_child_and_a_new_dev_serves_the_data(tmp_path: Path, devs: list[Dev]) -> None:
    data = tmp_path / "data"
    dev = Dev(data, "--shards", "2", "--replicas", "1")
    devs.append(dev)
    acked, failed = put_all(dev.router, "sup", WRITES)
    pids = dev.child_pids()
    assert len(pids) == 5
    dev.popen.send_signal(signal.SIGKILL)
    dev.popen.wait(30)
    wait_until(lambda: all(gone(p) for p in pids), timeout=90)

    dev2 = Dev(data)
    devs.append(dev2)
    t = Tally("kill -9 supervisor, then dev again", acked=len(acked), lost=lost(dev2.router, acked),
              caller_errors=failed, note=f"children_left={sum(not gone(p) for p in pids)}")
    assert fault_line(t) == t.line()
    assert (t.acked, t.lost, t.caller_errors, t.note) == (WRITES, 0, 0, "children_left=0")


def test_a_second_dev_on_a_directory_in_use_is_refused_and_touches_nothing(tmp_path: Path, devs: list[Dev]) -> None:
    data = tmp_path / "data"
    dev = Dev(data, "--shards", "1", "--replicas", "0")
    devs.append(dev)
    state = (data / "dev.json").read_text()
    ports = {p.name: p.read_text() for p in (data / "run").iterdir()}
    r = cli("dev", "--port", "0", "--data-dir", str(data))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert f"{data} is in use by process {dev.popen.pid}" in lines[0], lines[0]
    assert (data / "dev.json").read_text() == state
    assert {p.name: p.read_text() for p in (data / "run").iterdir()} == ports
    acked, failed = put_all(dev.router, "still", 5)
    assert (len(acked), failed) == (5, 0)
    assert not any(gone(n["pid"]) for n in json.loads(state)["nodes"].values())


def test_dev_refuses_a_node_directory_another_process_holds(tmp_path: Path, procs: Procs) -> None:
    """E.g. a node restarted by hand, or the orphan of a dev from before this fix."""
    data = tmp_path / "data"
    data.mkdir()
    holder = procs.shard("s1", data_dir=data / "s1")
    assert holder.popen is not None
    r = cli("dev", "--port", "0", "--data-dir", str(data), "--replicas", "0")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert f"{data / 's1'} is in use by process {holder.popen.pid}" in lines[0], lines[0]
    assert holder.healthy()


def test_a_shard_on_a_locked_directory_says_so_in_one_line(tmp_path: Path, procs: Procs) -> None:
    first = procs.shard("s1")
    assert first.popen is not None
    data = first.data_dir  # type: ignore[attr-defined]
    r = cli("shard", "--listen", "127.0.0.1:0", "--id", "s1", "--data-dir", str(data))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"shardstate shard: the data directory {data} is in use: process {first.popen.pid} ")
    assert "holds its lock" in lines[0] and "Traceback" not in r.stderr
    assert first.healthy()
