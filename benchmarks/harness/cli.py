"""`shardstate bench`: load one store with a workload and print throughput and latency.

Targets: --router (shardstate, the default), or --redis / --etcd to run the same harness
against those stores (benchmarks/compare uses that).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from shardstate.bench import report
from shardstate.bench.backends import STEP_IMPLS
from shardstate.bench.runner import RunConfig, result_ok, run
from shardstate.bench.workloads import MIXED, WORKLOADS
from shardstate.common import config, eventloop
from shardstate.common.authconfig import add_token_arguments, token_of
from shardstate.common.tlsconfig import TlsFlags


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardstate bench",
        description="Closed-loop load generator: CONCURRENCY callers each run one op after another "
                    "for DURATION seconds after a warm-up; prints throughput, p50/p95/p99/max "
                    "latency, conflicts and errors.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--router", metavar="ADDR", help="a shardstate router (or shard) host:port")
    target.add_argument("--redis", metavar="ADDR", help="run the same workload against Redis host:port")
    target.add_argument("--etcd", metavar="ADDR", help="run the same workload against etcd's gRPC host:port")
    mixed = ", ".join(f"{int(w * 100)}%% {n}" for n, w in MIXED)
    p.add_argument("--workload", choices=WORKLOADS, default="step",
                   help="step: read a session's state then compare-and-swap it (a lost CAS is a "
                        "conflict); read: read the state; append: append a log entry then read the "
                        f"last 10; mixed: {mixed} (default step)")
    p.add_argument("--sessions", type=int, default=10_000, help="distinct sessions (default 10000)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent callers (default 32)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring (default 3)")
    p.add_argument("--value-size", type=int, default=1024, help="bytes of session state (default 1024)")
    p.add_argument("--zipf", type=float, default=0.0,
                   help="Zipf exponent of session popularity; 0 = uniform (default 0)")
    p.add_argument("--step-impl", choices=STEP_IMPLS, default="auto",
                   help="how a step reads before its CAS: read-cas = read from the store, then CAS "
                        "on the version read; cached = CAS on the version this client last saw "
                        "(shardstate: session handle update(); a CAS still fails if anyone else "
                        "wrote in between); auto = cached for shardstate, read-cas for Redis and "
                        "etcd (default auto; the JSON says which ran)")
    p.add_argument("--direct", action="store_true",
                   help="with --router: the client fetches the cluster map from the router and talks "
                        "to each shard's primary straight (AsyncClient(direct=True))")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--no-load", action="store_true",
                   help="do not write the sessions' initial state first (they exist already)")
    p.add_argument("--json", metavar="FILE", help="write the full result (incl. timeline) as JSON")
    p.add_argument("--plot", metavar="FILE",
                   help="write a PNG of latency percentiles, throughput and p99 over time (needs "
                        "matplotlib, the [plot] extra; without it the run completes and says so)")
    p.add_argument("--quiet", action="store_true", help="no live progress display")
    p.add_argument("--cpu-pid", action="append", default=[], metavar="NAME=PID",
                   help="also report this process's CPU seconds over the window (repeatable)")
    config.add_arguments(p, TlsFlags)  # --tls-ca (and --tls-cert/--tls-key for --direct) for a TLS cluster
    add_token_arguments(p)  # --token / --token-file for a cluster with --auth-file
    return p


def config_from(ns: argparse.Namespace) -> RunConfig:
    kind, addr = next((k, getattr(ns, k)) for k in ("router", "redis", "etcd") if getattr(ns, k))
    pids = {}
    for spec in ns.cpu_pid:
        name, _, pid = spec.partition("=")
        if not name or not pid.isdigit():
            raise SystemExit(f"--cpu-pid wants NAME=PID, got {spec!r}")
        pids[name] = int(pid)
    for flag, value, low in (("--sessions", ns.sessions, 1), ("--concurrency", ns.concurrency, 1),
                             ("--value-size", ns.value_size, 1)):
        if value < low:
            raise SystemExit(f"{flag} must be at least {low}, got {value}")
    if (ns.token or ns.token_file) and kind != "router":
        raise SystemExit("--token / --token-file go with --router (Redis and etcd are run without auth)")
    if ns.direct and kind != "router":
        raise SystemExit("--direct goes with --router (the router the client learns the cluster map from)")
    if ns.duration <= 0 or ns.warmup < 0 or ns.zipf < 0:
        raise SystemExit("--duration must be > 0, --warmup and --zipf >= 0")
    return RunConfig(
        backend=("shardstate-direct" if ns.direct else "shardstate") if kind == "router" else kind, address=addr, workload=ns.workload,
        sessions=ns.sessions, concurrency=ns.concurrency, duration=ns.duration, warmup=ns.warmup,
        value_size=ns.value_size, zipf=ns.zipf, seed=ns.seed, step_impl=ns.step_impl,
        load=not ns.no_load, cpu_pids=pids, tls=config.from_args(TlsFlags, ns).tls_files(),
        token=token_of(ns),
    )


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    cfg = config_from(ns)
    err = Console(stderr=True)
    try:
        # The same loop for every store's client: uvloop when installed (SHARDSTATE_UVLOOP=0: asyncio's).
        result = eventloop.run(run(cfg, console=err, live=not ns.quiet))
    except KeyboardInterrupt:
        err.print("bench: interrupted")
        return 130
    except Exception as e:  # cannot connect / load: say what, not a traceback
        err.print(f"bench: {cfg.backend} at {cfg.address}: {type(e).__name__}: {e}")
        return 2
    report.print_table([result], console=report.wide_console())
    if result["errors"]:
        err.print(f"errors by kind: {result['error_kinds']}; first: {result['error_samples'][:1]}")
    if ns.json:
        report.write_json(result, ns.json)
        err.print(f"bench: wrote {ns.json}")
    if ns.plot:
        try:
            report.plot([result], ns.plot, title=f"{cfg.backend} {cfg.workload} ({result['step_impl']} step)"
                        if cfg.workload in ("step", "mixed") else f"{cfg.backend} {cfg.workload}")
            err.print(f"bench: wrote {ns.plot}")
        except report.NoPlot as e:
            # matplotlib is optional: the run still counts, only the picture is missing.
            err.print(f"bench: no plot written: {e}")
    return 0 if result_ok(result) else 1


if __name__ == "__main__":
    sys.exit(main())
