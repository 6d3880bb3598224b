"""OpenTelemetry across real processes: the test's own span (in-memory exporter) around one
`put` of the sync client (also with other calls under way, which a batching client sends
through its loop: a call inside a span goes alone, as a unary call); the router and the shard (SHARDSTATE_OTEL=1, spans as JSON lines to
one file) continue its trace: client → router → forward → shard → storage write, semi-sync
wait, and the replica's apply and ack. And tracing off: no span, no opentelemetry import in the client library."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shardstate import Client
from shardstate.syncbatch import SHARE_AT
from tests.procs import Procs
from tests.replicas import wait_for
from tests.stubs import wait_until


def spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_busy(c: Client, stop: threading.Event) -> None:
    """Untraced reads from another thread, until `stop`: calls under way beside the test's."""
    s = c.session("busy")
    while not stop.is_set():
        s.get("k")


@pytest.mark.parametrize("batching", [False, True], ids=["unary", "batching"])
def test_one_put_is_one_trace_from_the_client_through_router_and_shard(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batching: bool) -> None:
    out = tmp_path / "spans.jsonl"
    monkeypatch.setenv("SHARDSTATE_OTEL", "1")  # the processes inherit it, and so does the client
    monkeypatch.setenv("SHARDSTATE_OTEL_FILE", str(out))
    procs = Procs(tmp_path)
    try:
        primary = procs.shard("s1", "--min-replica-acks", "1")
        replica = procs.shard("s1", "--replica-of", primary.address)
        router = procs.router([primary.address])
        mem = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(mem))
        with Client(router.address, timeout=30, batching=batching) as c:
            stop = threading.Event()
            # enough threads that some of their calls are made while SHARE_AT others are
            # under way: those ride the loop, and so would the traced put
            busy = [threading.Thread(target=keep_busy, args=(c, stop)) for _ in range(SHARE_AT + 1)]
            if batching:  # untraced calls under way: the traced put must still go alone
                for t in busy:
                    t.start()
                wait_until(lambda: c.batching_stats())
            else:
                c.session("warm").put("k", b"v")  # untraced: a call without a span sends none
            with provider.get_tracer("test").start_as_current_span("agent step"):
                c.session("traced").put("k", b"v")
            stop.set()
            if batching:
                for t in busy:
                    t.join(60)
        (root,) = mem.get_finished_spans()
        trace_id = f"{root.context.trace_id:032x}"

        def chain() -> dict[str, dict[str, Any]] | None:
            mine = {s["name"]: s for s in spans(out) if s["trace_id"] == trace_id}
            want = ("router Put", "router forward Put", "shard put", "shard storage write", "shard semi-sync wait",
                    "replica apply")
            return mine if all(n in mine for n in want) else None

        got = wait_for(chain, "the router's and the shard's spans of the traced put")
        assert got["router Put"]["parent_span_id"] == f"{root.context.span_id:016x}"
        assert got["router Put"]["service"] == "shardstate-router"
        assert got["router forward Put"]["parent_span_id"] == got["router Put"]["span_id"]
        assert got["shard put"]["parent_span_id"] == got["router forward Put"]["span_id"]
        assert got["shard put"]["service"] == "shardstate-shard-s1"
        assert got["shard storage write"]["parent_span_id"] == got["shard put"]["span_id"]
        assert got["shard semi-sync wait"]["parent_span_id"] == got["shard put"]["span_id"]
        # the replica's apply and ack, from the change batch that carried the put
        assert got["replica apply"]["parent_span_id"] == got["shard put"]["span_id"]
        assert got["replica apply"]["attributes"]["replica"] == replica.address
        if batching:
            return
        # the warm-up put had no caller span: its trace is the router's own, never the test's
        roots = [s for s in spans(out) if s["name"] == "router Put" and not s["parent_span_id"]]
        assert len(roots) == 1 and roots[0]["trace_id"] != trace_id
        # one replica span per write, each in its write's trace
        applies = sorted(s["trace_id"] for s in spans(out) if s["name"] == "replica apply")
        assert applies == sorted([trace_id, roots[0]["trace_id"]])
    finally:
        procs.close()


def test_tracing_off_imports_no_opentelemetry_in_the_client() -> None:
    code = ("import sys; from shardstate import Client, Retry\n"
            "with Client('127.0.0.1:1', retry=Retry(attempts=1), timeout=2) as c:\n"
            "    try: c.session('s').get('k')\n"
            "    except Exception: pass\n"
            "print(any(m.startswith('opentelemetry') for m in sys.modules))")
    env = {"PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
