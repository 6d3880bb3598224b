"""Cost model: CPU seconds per 1,000 ops of each shardstate process under the step workload, and
from them a projection of throughput against the number of shards and routers on bigger machines.

    .venv/bin/python benchmarks/cost_model.py                       # starts `shardstate dev`, 20 s
    .venv/bin/python benchmarks/cost_model.py --from bench-reports/<ts>/shardstate.json

It runs the same thing as benchmarks/compare's shardstate leg (same code: a `shardstate dev`
cluster, a `shardstate bench` child with every server pid's CPU sampled over the measured window),
or reads such a result (--from). Our machines have 2 cores, so scale-out is shown by this model,
not claimed; the assumptions are printed with the figures.
"""

from __future__ import annotations

import shardstate.bench  # noqa: F401  (first: chooses grpc's transport before grpc loads)

# isort: split

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from shardstate.bench import compare, procstat, report, servers

CORES = (2, 4, 8, 16, 32, 64, 128)
SHARDS = (1, 3, 6, 12, 24, 48, 96)
REPLICA = re.compile(r"^s\d+-r\d+$")
PRIMARY = re.compile(r"^s\d+$")

ASSUMPTIONS = """\
Assumptions of the model:
- Every server process is single-threaded Python (one core at most: the GIL), and each process
  gets a core of its own while cores last; with fewer cores than processes they share the cores.
- CPU per op stays what this run measured: same workload, value size, batching level. At higher
  load the client and router coalesce more ops per batch, so CPU per op tends to fall (the model is
  conservative there); latency is not modelled (queueing at a busy process raises p99).
- Sessions are spread evenly over shards (consistent hashing, many sessions), so each primary
  takes 1/S of the ops and each replica applies its primary's writes; reads go to primaries.
- Routers are stateless and share the load evenly (clients spread over them).
- The load generators (the agents) run on other machines: their CPU is listed, not charged
  to the cluster. Network and disk are not bottlenecks (shards run without --fsync, as
  `shardstate dev` starts them: LevelDB writes reach the OS, not the platter, per write).
- Throughput = min(R / router cost, S / primary cost, S / per-replica cost,
  cores / total server cost per op)."""


def costs(result: dict[str, Any]) -> dict[str, Any]:
    """CPU seconds per op by role from one bench result with per-process CPU."""
    ops = result["completed"]
    if not ops:
        raise SystemExit("cost_model: the run completed no ops")
    cpu: dict[str, float] = result["cpu_s"]
    routers = {k: v for k, v in cpu.items() if k.startswith("router")}
    primaries = {k: v for k, v in cpu.items() if PRIMARY.match(k)}
    replicas = {k: v for k, v in cpu.items() if REPLICA.match(k)}
    if not routers or not primaries:
        raise SystemExit(f"cost_model: the result has no router/shard CPU figures (processes: {sorted(cpu)})")
    per_shard = len(replicas) / len(primaries)
    return {
        "ops": ops,
        "window_s": result["window_s"],
        "routers": len(routers),
        "shards": len(primaries),
        "replicas_per_shard": per_shard,
        "router": sum(routers.values()) / ops,
        "primary": sum(primaries.values()) / ops,
        "replica_all": sum(replicas.values()) / ops,
        "replica_one": (sum(replicas.values()) / ops / per_shard) if per_shard else 0.0,
        "client": cpu.get("client", 0.0) / ops,
    }


def throughput(c: dict[str, Any], shards: int, routers: int, cores: float | None) -> tuple[float, str]:
    """Projected ops/s of a cluster and what limits it."""
    limits = {"routers": routers / c["router"], "shard primaries": shards / c["primary"]}
    if c["replica_one"]:
        limits["replicas"] = shards / c["replica_one"]
    if cores is not None:
        limits["cores"] = cores / (c["router"] + c["primary"] + c["replica_all"])
    name = min(limits, key=lambda k: limits[k])
    return limits[name], name


def processes(c: dict[str, Any], shards: int, routers: int) -> int:
    return routers + shards * (1 + math.ceil(c["replicas_per_shard"]))


def routers_needed(c: dict[str, Any], shards: int) -> int:
    """Routers so that routers are not the bottleneck before the shards are."""
    return max(1, math.ceil(shards * c["router"] / c["primary"]))


def best_layout(c: dict[str, Any], cores: int) -> tuple[int, int, float, str]:
    """The (shards, routers) that projects the most ops/s on `cores` cores (fewest processes on a
    tie). More processes than cores is allowed: they then share the cores (the cores limit)."""
    best = (1, 1, 0.0, "")
    most = max(2 * cores, 8)
    for s in range(1, most + 1):
        for r in range(1, most + 1):
            if processes(c, s, r) > most:
                break
            tp, lim = throughput(c, s, r, cores)
            if tp > best[2] * 1.0001:
                best = (s, r, tp, lim)
    return best


def calibration(c: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The model applied to the measured run itself (its layout, its cores, the load generator on
    the same machine): how far the model is from what was measured."""
    cores = result["machine"]["cores"] or 1
    per_op = c["router"] + c["primary"] + c["replica_all"] + c["client"]
    limits = [c["routers"] / c["router"], c["shards"] / c["primary"], cores / per_op]
    if c["replica_one"]:
        limits.append(c["shards"] / c["replica_one"])
    projected = min(limits)
    busy = result.get("machine_busy_cpu_s")
    idle = 1 - busy / (result["window_s"] * cores) if busy is not None else None
    return {"cores": cores, "projected_ops_s": round(projected), "measured_ops_s": round(result["throughput_ops_s"]),
            "measured_over_projected": round(result["throughput_ops_s"] / projected, 2),
            "machine_idle_share": round(idle, 2) if idle is not None else None}


def model(c: dict[str, Any]) -> dict[str, Any]:
    by_cores = []
    for k in CORES:
        s, r, tp, lim = best_layout(c, k)
        by_cores.append({"cores": k, "shards": s, "routers": r, "processes": processes(c, s, r),
                         "ops_s": round(tp), "bound_by": lim, "client_cores": round(tp * c["client"], 1)})
    by_shards = []
    for s in SHARDS:
        r = routers_needed(c, s)
        tp, lim = throughput(c, s, r, None)
        by_shards.append({"shards": s, "routers": r, "processes": processes(c, s, r), "ops_s": round(tp),
                          "bound_by": lim, "client_cores": round(tp * c["client"], 1)})
    return {"by_cores": by_cores, "by_shards": by_shards}


def measured_table(result: dict[str, Any]) -> Table:
    t = Table(title=f"measured: {result['workload']} ({result.get('step_impl')}), "
                    f"{result['throughput_ops_s']:,.0f} ops/s over {result['window_s']:g} s")
    for col in ("process", "CPU s", "CPU s / 1000 ops", "µs / op", "cores used"):
        t.add_column(col, justify="left" if col == "process" else "right")
    ops, window = result["completed"], result["window_s"]
    for name, sec in result["cpu_s"].items():
        t.add_row(name, f"{sec:.2f}", f"{sec / ops * 1000:.4f}", f"{sec / ops * 1e6:,.0f}", f"{sec / window:.2f}")
    return t


def cost_table(c: dict[str, Any]) -> Table:
    t = Table(title="CPU per op by role")
    t.add_column("role")
    t.add_column("µs / op", justify="right")
    t.add_column("max ops/s of one process", justify="right")
    rows = [("router (each op passes one)", c["router"]), ("shard primary (each op hits one)", c["primary"]),
            ("replica (per replica process)", c["replica_one"]), ("client / load generator", c["client"])]
    for name, v in rows:
        t.add_row(name, f"{v * 1e6:,.0f}", f"{1 / v:,.0f}" if v else "-")
    server = c["router"] + c["primary"] + c["replica_all"]
    t.add_row("[b]servers, all roles[/]", f"{server * 1e6:,.0f}", f"{1 / server:,.0f} per core")
    return t


def projection_tables(m: dict[str, Any]) -> tuple[Table, Table]:
    a = Table(title="projection: one machine with N cores, best layout")
    for col in ("cores", "shards", "routers", "processes", "ops/s", "bound by", "client cores needed"):
        a.add_column(col, justify="right")
    for row in m["by_cores"]:
        a.add_row(str(row["cores"]), str(row["shards"]), str(row["routers"]), str(row["processes"]),
                  f"{row['ops_s']:,}", row["bound_by"], f"{row['client_cores']:g}")
    b = Table(title="projection: scale-out, each process on its own core, routers added as needed")
    for col in ("shards", "routers", "server processes (= cores)", "ops/s", "bound by", "client cores needed"):
        b.add_column(col, justify="right")
    for row in m["by_shards"]:
        b.add_row(str(row["shards"]), str(row["routers"]), str(row["processes"]), f"{row['ops_s']:,}",
                  row["bound_by"], f"{row['client_cores']:g}")
    return a, b


def markdown(result: dict[str, Any], c: dict[str, Any], m: dict[str, Any], source: str) -> str:
    mach = result["machine"]
    lines = [
        "# shardstate cost model", "",
        f"- source: {source}",
        f"- run: {result['workload']} ({result.get('step_impl')}), {result['config']['sessions']:,} sessions, "
        f"{result['config']['concurrency']} concurrent, {result['config']['value_size']} B, "
        f"{result['window_s']:g} s measured, {result['throughput_ops_s']:,.0f} ops/s, started {result['started_at']}",
        f"- machine: {mach['cores']} cores ({mach['cpu_model']}); cluster: {c['shards']} shards x "
        f"{c['replicas_per_shard']:g} replica(s), {c['routers']} router(s)", "",
        "| process | CPU s | CPU s / 1000 ops | cores used |", "|---|--:|--:|--:|",
    ]
    for name, sec in result["cpu_s"].items():
        lines.append(f"| {name} | {sec:.2f} | {sec / c['ops'] * 1000:.4f} | {sec / c['window_s']:.2f} |")
    lines += ["", "| role | µs CPU / op |", "|---|--:|"]
    for name, key in (("router", "router"), ("shard primary", "primary"), ("one replica", "replica_one"),
                      ("client", "client")):
        lines.append(f"| {name} | {c[key] * 1e6:,.0f} |")
    cal = m.get("calibration")
    if cal:
        lines += ["", f"Model check on the measured run ({cal['cores']} cores, load generator included): projected "
                      f"{cal['projected_ops_s']:,} ops/s, measured {cal['measured_ops_s']:,} "
                      f"({cal['measured_over_projected']:.2f}x)."]
    lines += ["", "Projection, one machine with N cores (best layout):", "",
              "| cores | shards | routers | ops/s | bound by | client cores needed |", "|--:|--:|--:|--:|---|--:|"]
    for r in m["by_cores"]:
        lines.append(f"| {r['cores']} | {r['shards']} | {r['routers']} | {r['ops_s']:,} | {r['bound_by']} | {r['client_cores']:g} |")
    lines += ["", "Projection, scale-out (each process on its own core):", "",
              "| shards | routers | processes | ops/s | bound by |", "|--:|--:|--:|--:|---|"]
    for r in m["by_shards"]:
        lines.append(f"| {r['shards']} | {r['routers']} | {r['processes']} | {r['ops_s']:,} | {r['bound_by']} |")
    lines += ["", ASSUMPTIONS, ""]
    return "\n".join(lines)


def run_cluster(ns: argparse.Namespace, out: Path, console: Console) -> dict[str, Any]:
    cns = compare.parser().parse_args([
        "--workload", "step", "--sessions", str(ns.sessions), "--concurrency", str(ns.concurrency),
        "--duration", str(ns.duration), "--warmup", str(ns.warmup), "--value-size", str(ns.value_size),
        *(f"--dev-arg={a}" for a in ns.dev_arg)])
    workdir = Path(tempfile.mkdtemp(prefix="shardstate-cost-"))
    servers.term_as_exit()
    try:
        result = compare.run_store("shardstate", ns.step_impl, cns, workdir, out, console)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if "error" in result:
        raise SystemExit(f"cost_model: the run failed: {result['error']}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/cost_model.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", metavar="FILE",
                   help="a shardstate result JSON with per-process CPU (compare's shardstate.json) "
                        "instead of running the cluster")
    p.add_argument("--sessions", type=int, default=10_000, help="(default 10000)")
    p.add_argument("--concurrency", type=int, default=32, help="(default 32)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="(default 3)")
    p.add_argument("--value-size", type=int, default=1024, help="(default 1024)")
    p.add_argument("--step-impl", default="cached", choices=compare.PATTERNS,
                   help="the step pattern, as benchmarks/compare --patterns (default cached)")
    p.add_argument("--dev-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `shardstate dev` (repeatable)")
    p.add_argument("--out", metavar="DIR", help="write cost-model.md and cost-model.json here "
                                                "(default bench-reports/cost-<UTC timestamp>/)")
    ns = p.parse_args(argv)
    console = report.wide_console()
    out = Path(ns.out) if ns.out else compare.default_out().with_name("cost-" + compare.default_out().name)
    out.mkdir(parents=True, exist_ok=True)
    if ns.source:
        doc = json.loads(Path(ns.source).read_text())
        # A compare results.json holds several stores and patterns; take shardstate's first.
        result = next(r for r in doc["results"] if r["store"] == "shardstate") if "results" in doc else doc
        source = ns.source
    else:
        result = run_cluster(ns, out, console)
        source = "a fresh `shardstate dev` run by benchmarks/cost_model.py"
    c = costs(result)
    m = model(c)
    console.print(measured_table(result))
    console.print(cost_table(c))
    cal = calibration(c, result)
    m["calibration"] = cal
    console.print(f"model check on the measured run ({cal['cores']} cores, load generator included): projected "
                  f"{cal['projected_ops_s']:,} ops/s, measured {cal['measured_ops_s']:,} "
                  f"({cal['measured_over_projected']:.2f}x)" + (
                      f"; the cores were idle {cal['machine_idle_share']:.0%} of the window (a closed loop "
                      "of callers leaves gaps)" if cal["machine_idle_share"] is not None else ""))
    for t in projection_tables(m):
        console.print(t)
    console.print(ASSUMPTIONS)
    (out / "cost-model.md").write_text(markdown(result, c, m, source))
    report.write_json({"source": source, "machine": procstat.machine(), "result": result, "costs": c, "model": m},
                      out / "cost-model.json")
    console.print(f"written: {out / 'cost-model.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
