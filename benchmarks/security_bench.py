"""What TLS and tokens cost: the step workload against two `shardstate dev` clusters on this
machine, one plain and one with `--tls --auth` (every hop TLS, shards mTLS, every call
carrying a bearer token checked at the router and the shard), in interleaved rounds
(plain, secure, plain, secure, ...), the same call pattern on both.

    .venv/bin/python benchmarks/security_bench.py                   # 3 rounds x 15 s
    .venv/bin/python benchmarks/security_bench.py --rounds 5 --duration 20 --json sec.json

Prints each round and the medians: steps/s, p50/p99 and their ratio secure / plain.
"""

from __future__ import annotations

import shardstate.bench  # noqa: F401  (first: chooses grpc's transport before grpc loads)

# isort: split

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from shardstate.bench import procstat
from shardstate.server import launch


def run_bench(router: str, ns: argparse.Namespace, out: Path, env: dict[str, str], tls_ca: str) -> dict[str, Any]:
    cmd = launch.shardstate_cmd(
        "bench", "--router", router, "--workload", "step", "--step-impl", ns.step_impl,
        "--sessions", str(ns.sessions), "--concurrency", str(ns.concurrency), "--duration", str(ns.duration),
        "--warmup", "2", "--quiet", "--json", str(out), *(["--tls-ca", tls_ca] if tls_ca else []),
        *(["--direct"] if ns.direct else []))
    if ns.direct and tls_ca:
        cmd += ["--tls-cert", env["_CERT"], "--tls-key", env["_KEY"]]
    subprocess.run(cmd, check=True, env={k: v for k, v in env.items() if not k.startswith("_")},
                   stdout=subprocess.DEVNULL, timeout=ns.duration * 4 + 300)
    r = json.loads(out.read_text())
    return {"ops_s": r["throughput_ops_s"], "p50": r["latency_ms"]["p50"], "p99": r["latency_ms"]["p99"],
            "errors": r.get("errors", 0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/security_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--step-impl", default="read-cas", choices=("read-cas", "cached"))
    p.add_argument("--direct", action="store_true", help="clients in direct mode (a client certificate for the secure one)")
    p.add_argument("--json", metavar="FILE")
    ns = p.parse_args(argv)
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="ss-security-"))
    plain = launch.Dev(work / "plain", "--shards", "2", "--replicas", "1", log_path=work / "plain.log")
    secure = launch.Dev(work / "secure", "--shards", "2", "--replicas", "1", "--tls", "--auth",
                        log_path=work / "secure.log")
    rows: list[dict[str, Any]] = []
    try:
        pr, sr = plain.wait_router(120), secure.wait_router(120)
        tokens = json.loads((work / "secure" / "dev-tokens.json").read_text())
        files = secure.state()["tls"]
        base_env = {k: v for k, v in os.environ.items() if k != "SHARDSTATE_TOKEN"}
        senv = {**base_env, "SHARDSTATE_TOKEN": tokens["readwrite"], "_CERT": files["client_cert"],
                "_KEY": files["client_key"]}
        for rnd in range(1, ns.rounds + 1):
            for name, router, env, ca in (("plain", pr, base_env, ""), ("tls+tokens", sr, senv, files["ca"])):
                r = run_bench(router, ns, work / f"{name}-{rnd}.json", env, ca)
                r.update(round=rnd, cluster=name)
                rows.append(r)
                console.print(f"round {rnd} {name:>10}: {r['ops_s']:>7,.0f} steps/s  p50 {r['p50']:.2f} ms  "
                              f"p99 {r['p99']:.2f} ms  errors {r['errors']}")
    finally:
        plain.terminate()
        secure.terminate()
    med = {c: {k: statistics.median(r[k] for r in rows if r["cluster"] == c) for k in ("ops_s", "p50", "p99")}
           for c in ("plain", "tls+tokens")}
    t = Table(title=f"step ({ns.step_impl}{', direct' if ns.direct else ''}), {ns.concurrency} callers, "
                    f"{ns.sessions:,} sessions, medians of {ns.rounds} rounds")
    for col in ("cluster", "steps/s", "p50 ms", "p99 ms"):
        t.add_column(col, justify="left" if col == "cluster" else "right")
    for c, m in med.items():
        t.add_row(c, f"{m['ops_s']:,.0f}", f"{m['p50']:.2f}", f"{m['p99']:.2f}")
    s, b = med["tls+tokens"], med["plain"]
    t.add_row("secure / plain", f"{s['ops_s'] / b['ops_s']:.2f}x", f"{s['p50'] / b['p50']:.2f}x",
              f"{s['p99'] / b['p99']:.2f}x")
    console.print(t)
    m = procstat.machine()
    console.print(f"machine: {m.get('cores')} cores ({m.get('cpu_model')}), "
                  f"{m.get('memory_bytes', 0) / 2**30:.1f} GiB; dev defaults, 2 shards x 1 replica each")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"machine": m, "rounds": rows, "medians": med, "args": vars(ns)},
                                            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
