"""The model-based state machine of tests/engine_model.py against a real shard process over
gRPC: the same rules and model as tests/test_engine_model.py, a smaller run. Restart here is
kill -9 of the shard and a start on the same data directory (and port). No TTL is drawn:
the shard's clock is the wall clock and its own sweeper runs, so expiry is left to the
engine run, which controls time."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import grpc
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from shardstate.common import errors
from tests.engine_model import Driver, machine
from tests.procs import Proc, Procs
from tests.stubs import CALL_TIMEOUT_S, Conn, state_pb2

RPC = {
    "get": "Get", "put": "Put", "delete": "Delete", "increment": "Increment", "txn": "Txn",
    "append": "Append", "read_log": "ReadLog", "trim_log": "TrimLog", "pop_last": "PopLast",
    "touch": "Touch", "delete_session": "DeleteSession", "get_session": "GetSession",
    "list_sessions": "ListSessions", "scan": "Scan",
}


class ShardDriver(Driver):
    """One shard process shared by every example; each example gets namespaces of its own."""

    plain_tokens = False  # a shard's page tokens are opaque (the format routers share)
    max_restarts = 1  # a kill -9 and restart costs a process start: at most one per example
    _ids = itertools.count()
    calls = restarts = 0  # over the whole run: the test checks the run did something

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.conn = Conn(proc)
        n = next(self._ids)
        self.namespaces = (f"m{n}", f"m{n}\x00")

    def call(self, method: str, req: Any) -> Any:
        ShardDriver.calls += 1
        try:
            return getattr(self.conn.state, RPC[method])(req, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            return errors.from_rpc_error(e)  # type: ignore[arg-type]

    def restart(self) -> None:
        ShardDriver.restarts += 1
        self.proc.kill()
        self.proc.start()
        self.conn.reopen()

    def close(self) -> None:
        self.conn.close()


def test_shard_matches_the_model_over_grpc_with_kill9_restarts(procs: Procs, tmp_path: Path) -> None:
    shard = procs.shard("s1")
    ShardModel = machine(lambda: ShardDriver(shard), "ShardModel")
    run_state_machine_as_test(ShardModel, settings=settings(
        max_examples=50, stateful_step_count=40, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck)))
    print(f"shard model: {ShardDriver.calls} calls, {ShardDriver.restarts} kill -9 restarts")
    assert ShardDriver.calls >= 100 and ShardDriver.restarts >= 1


def test_read_log_last_returns_a_lone_entry_through_a_shard(procs: Procs) -> None:
    """Issue 13 defect 1 over gRPC: ReadLog(last=5) of a one-entry stream read as empty."""
    conn = Conn(procs.shard("s1"))
    try:
        conn.append("agent", "m", b"first message")
        got = conn.read_log("agent", "m", last=5)
        assert [(e.seq, e.data) for e in got.entries] == [(1, b"first message")]
        assert isinstance(got, state_pb2.ReadLogResponse) and not got.more
    finally:
        conn.close()
