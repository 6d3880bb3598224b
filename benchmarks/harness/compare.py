"""`benchmarks/compare`: the same workload, same harness, against Redis, etcd and shardstate in
one invocation, one store after another; a table with ratios to shardstate and a report folder.
With `--rounds N` the stores run N times, interleaved, and the report gives every round and
each store's median run: one run's figures on a shared machine vary by 5-10%.

Each store is started here on free ports in a temp dir, loaded by a `shardstate bench` child
process (so every store gets a fresh load generator), measured, and stopped before the next.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from shardstate.bench import procstat, report, servers
from shardstate.bench.backends import BACKENDS
from shardstate.bench.workloads import WORKLOADS
from shardstate.common.tls import TlsFiles
from shardstate.server import launch

REPO = Path(__file__).resolve().parent.parent.parent  # only meaningful in a source checkout
INSTALL_PEERS = REPO / "benchmarks" / "install-peers.sh"
BASELINE = "shardstate"
DIRECT = "shardstate-direct"  # the same dev cluster, the client in direct mode
BINARIES = {"redis": "redis-server", "etcd": "etcd"}
# The step's call patterns; every store runs each one, and a ratio is only drawn between runs of
# the same pattern (backends.STEP_IMPLS says what each is).
PATTERNS = ("read-cas", "cached")
# The figures shardstate is held to against the peers, per pattern (issue 17; step workload):
# (which shardstate run, peer, what, factor, label). The cached goals are for direct mode; they
# fall back to the router's run when no direct run is in the comparison.
TARGETS: dict[str, tuple[tuple[str, str, str, float, str], ...]] = {
    "read-cas": (
        (BASELINE, "redis", "throughput", 1.2, "read-cas steps/s >= 1.2 x Redis"),
        (BASELINE, "etcd", "throughput", 3.0, "read-cas steps/s >= 3 x etcd"),
    ),
    "cached": (
        (DIRECT, "redis", "throughput", 1.2, "cached steps/s >= 1.2 x Redis"),
        (DIRECT, "redis", "p99", 1.0, "cached p99 <= Redis"),
    ),
}


def subject(wanted: str, present: Sequence[str]) -> str | None:
    """The shardstate run a target is about: the one it names, else the router's."""
    if wanted in present:
        return wanted
    return BASELINE if BASELINE in present else None
CLIENT_BOUND = 0.9  # a load generator above this share of a core limits the figure itself
IDLE_PCT = 10.0  # --wait-idle: "quiet" = under this share of all cores busy
BENCH_EXTRA_S = 300.0  # loading + drain allowance on top of warm-up + duration per store


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/compare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run one workload with the same harness (shardstate bench) against Redis, etcd and "
            "shardstate, one after another, with the same value size, sessions, concurrency and "
            "duration; print a table with ratios to shardstate and write a report folder "
            "(report.md, compare.png, results.json, one JSON per store).\n\n"
            "Servers (each on free 127.0.0.1 ports with a temp data dir, stopped afterwards, also on "
            "Ctrl-C or error):\n"
            "  redis       Debian's redis-server, appendonly yes + appendfsync everysec; driven by\n"
            "              redis-py asyncio; step = HMGET {value, version}, then EVALSHA of a Lua CAS\n"
            "              on the version field\n"
            "  etcd        Debian's etcd-server (single member); driven over grpc.aio stubs; step =\n"
            "              Range, then Txn(mod_revision == seen -> Put)\n"
            "  shardstate  `shardstate dev --port 0` with its defaults (one shard per CPU core, at most 3,\n"
            "              1 replica each, 1 router; the replicas catch up in the background, on\n"
            "              CPU the rest leaves idle), the client through the router\n"
            "  shardstate-direct  the same cluster, the client in direct mode (AsyncClient(direct=True):\n"
            "              the cluster map from the router, each call straight to the owning primary)\n"
            "\n"
            "Step patterns (--patterns; each store runs each, ratios only within a pattern):\n"
            "  read-cas    every store reads the session's state, then compare-and-swaps it\n"
            "  cached      every store's client remembers each session's version and sends one CAS;\n"
            "              a lost CAS answers with the current version and the step retries once\n"
            "              from it (Redis: a Lua script; etcd: a Txn whose failure branch ranges the\n"
            "              key; shardstate: a session handle's update())\n\n"
            "What it installs: when redis-server or etcd is missing it runs\n"
            "benchmarks/install-peers.sh (apt-get install redis-server etcd-server; needs root or\n"
            "passwordless sudo; --no-install turns that off). The launcher script installs the\n"
            "Python side (this project with its [bench] extra: redis-py, matplotlib) into .venv\n"
            "when it is missing. Without matplotlib there is no PNG and the report says so."
        ),
    )
    p.add_argument("--workload", choices=WORKLOADS, default="step", help="workload (default step)")
    p.add_argument("--value-size", type=int, default=1024, help="bytes of session state (default 1024)")
    p.add_argument("--sessions", type=int, default=10_000, help="distinct sessions (default 10000)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent callers (default 32)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per store (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per store (default 3)")
    p.add_argument("--zipf", type=float, default=0.0, help="Zipf exponent of session popularity (default 0)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--patterns", default=",".join(PATTERNS),
                   help=f"comma-separated step patterns, each run by every store (default {','.join(PATTERNS)}; "
                        "other workloads run once)")
    p.add_argument("--stores", default=",".join(("redis", "etcd", BASELINE, DIRECT)),
                   help="comma-separated stores in run order (default redis,etcd,shardstate,shardstate-direct: "
                        "shardstate through its router, and with the client in direct mode)")
    p.add_argument("--out", metavar="DIR",
                   help="report folder (default bench-reports/<UTC timestamp>/)")
    p.add_argument("--dev-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `shardstate dev` (repeatable, e.g. --dev-arg=--replicas=0)")
    p.add_argument("--no-install", action="store_true",
                   help="do not run benchmarks/install-peers.sh when redis-server or etcd is missing")
    p.add_argument("--keep-data", action="store_true", help="keep the servers' temp dirs")
    p.add_argument("--quiet", action="store_true", help="no live progress from the load generator")
    p.add_argument("--rerun-if-busy", type=int, default=0, metavar="N",
                   help=f"run a store again (up to N times) when other processes used more than "
                        f"{IDLE_PCT:g}%% of the machine during its window; the least disturbed run is kept")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="on a shared machine: before each store, wait up to S seconds for the machine "
                        f"to be under {IDLE_PCT:g}%% busy (default 0: start at once; the report records "
                        "the load either way)")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="run the stores N times, interleaved (each store once per round, in order), and "
                        "report every round and each store's median run (the main table, the targets and "
                        "the plot): one run's figures on a shared machine vary by 5-10%% (default 1)")
    return p


def ensure_peers(stores: Sequence[str], allow_install: bool, console: Console) -> None:
    missing = [BINARIES[s] for s in stores if s in BINARIES and not servers.have(BINARIES[s])]
    if not missing:
        return
    if not allow_install:
        raise SystemExit(f"compare: {', '.join(missing)} not installed; run benchmarks/install-peers.sh")
    if not INSTALL_PEERS.exists():
        raise SystemExit(f"compare: {', '.join(missing)} not installed and {INSTALL_PEERS} not found; "
                         "install Debian's redis-server and etcd-server")
    console.print(f"compare: {', '.join(missing)} missing; running {INSTALL_PEERS}")
    subprocess.run(["bash", str(INSTALL_PEERS)], check=True)
    still = [b for b in missing if not servers.have(b)]
    if still:
        raise SystemExit(f"compare: {', '.join(still)} still missing after install-peers.sh")


def start_store(store: str, workdir: Path, dev_args: Sequence[str]) -> tuple[servers.Started, dict[str, int], str]:
    """Start one store; returns its server, the pids whose CPU to record, and its version."""
    if store == "redis":
        srv = servers.start_redis(workdir)
        return srv, {"redis-server": srv.pid}, f"Redis {servers.redis_version()}"
    if store == "etcd":
        srv = servers.start_etcd(workdir)
        return srv, {"etcd": srv.pid}, f"etcd {servers.etcd_version()}"
    # shardstate and shardstate-direct: the same dev cluster, a fresh one for each run
    dev = servers.start_dev(workdir, dev_args)
    return dev, {"dev-supervisor": dev.pid, **dev.node_pids()}, "shardstate (this checkout)"


def bench_cmd(store: str, pattern: str, address: str, ns: argparse.Namespace, pids: dict[str, int],
              json_path: Path, tls_files: TlsFiles | None = None) -> list[str]:
    flag = "--router" if store.startswith(BASELINE) else f"--{store}"
    cmd = [*launch.shardstate_cmd(), "bench", flag, address,
           "--workload", ns.workload, "--sessions", str(ns.sessions), "--concurrency", str(ns.concurrency),
           "--duration", str(ns.duration), "--warmup", str(ns.warmup), "--value-size", str(ns.value_size),
           "--zipf", str(ns.zipf), "--seed", str(ns.seed), "--step-impl", pattern,
           "--json", str(json_path)]
    if store == DIRECT:
        cmd.append("--direct")
    if tls_files is not None:  # a dev cluster started with --dev-arg=--tls
        cmd += launch.tls_args(tls_files)
    for name, pid in pids.items():
        cmd += ["--cpu-pid", f"{name}={pid}"]
    if ns.quiet:
        cmd.append("--quiet")
    return cmd


def run_name(store: str, pattern: str) -> str:
    return f"{store}-{pattern}"


def run_store(store: str, pattern: str, ns: argparse.Namespace, workdir: Path, out: Path,
              console: Console) -> dict[str, Any]:
    """Start the store, run the bench child against it with the step pattern, stop the store;
    the child's JSON result (plus server facts), or {"store", "pattern", "error"} when something
    failed."""
    name = run_name(store, pattern)
    console.rule(f"[bold]{store}[/] ({pattern})")
    busy_before = idle_check()
    waited = 0.0
    while busy_before > IDLE_PCT and waited < ns.wait_idle:
        if waited == 0:
            console.print(f"compare: the machine is {busy_before}% busy; waiting up to {ns.wait_idle:g} s "
                          f"for it to drop under {IDLE_PCT}%")
        busy_before = idle_check(2.0)
        waited += 2.0
    srv: servers.Started | None = None
    child: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        (workdir / name).mkdir(parents=True, exist_ok=True)
        srv, pids, version = start_store(store, workdir / name, ns.dev_arg)
        console.print(f"compare: {version} at {srv.address} ({len(pids)} process(es), "
                      f"started in {time.monotonic() - t0:.1f} s)")
        json_path = out / f"{name}.json"
        cmd = bench_cmd(store, pattern, srv.address, ns, pids, json_path, getattr(srv, "tls", None))
        with open(out / f"{name}.txt", "wb") as table_out:
            child = subprocess.Popen(cmd, stdout=table_out, stdin=subprocess.DEVNULL)
            rc = child.wait(timeout=ns.warmup + ns.duration + BENCH_EXTRA_S)
        if not json_path.exists():
            raise RuntimeError(f"the load generator exited with {rc} and wrote no result "
                               f"(its output: {out / f'{name}.txt'})")
        result: dict[str, Any] = json.loads(json_path.read_text())
        result["pattern"] = pattern
        result["server"] = {"version": version, "address": srv.address,
                            "pids": pids, "cmdlines": {k: procstat.cmdline(v) for k, v in pids.items()},
                            "data_bytes": procstat.dir_bytes(srv.data_dir) if srv.data_dir else None}
        result["machine_busy_before_pct"] = busy_before
        result["waited_for_idle_s"] = waited
        if rc != 0:
            result["bench_exit_code"] = rc
        return result
    except (Exception, subprocess.TimeoutExpired) as e:
        console.print(f"[red]compare: {store} ({pattern}) failed: {e}[/]")
        if srv is not None:
            console.print(srv.log_tail(20))
        return {"store": store, "pattern": pattern, "error": f"{type(e).__name__}: {e}"}
    finally:
        if child is not None and child.poll() is None:
            child.terminate()  # a client only: nothing to flush
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if srv is not None:
            srv.stop()


def busy_share(r: dict[str, Any]) -> float:
    """Share of all cores other processes used during a result's window (0 when unknown)."""
    other = other_load(r)
    cores = r.get("machine", {}).get("cores") or os.cpu_count() or 1
    return max(0.0, other / (r["window_s"] * cores)) if other is not None and r.get("window_s") else 0.0


def run_with_reruns(store: str, pattern: str, ns: argparse.Namespace, workdir: Path, out: Path,
                    console: Console) -> dict[str, Any]:
    """run_store, again (up to --rerun-if-busy times) when other processes took more than
    IDLE_PCT of the machine during the window; keeps the least disturbed run."""
    runs: list[dict[str, Any]] = []
    for attempt in range(1 + max(0, ns.rerun_if_busy)):
        r = run_store(store, pattern, ns, workdir / f"run{attempt}", out, console)
        if "error" in r:
            return r
        runs.append(r)
        share = busy_share(r)
        if share * 100 <= IDLE_PCT:
            break
        if attempt < ns.rerun_if_busy:
            console.print(f"[yellow]compare: other processes used {share:.0%} of the machine during the "
                          f"{store} ({pattern}) window; running it again[/]")
    best = min(runs, key=busy_share)
    best["attempts"] = len(runs)
    report.write_json(best, out / f"{run_name(store, pattern)}.json")
    return best


def median_results(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per store (the position in each round), the run with the median throughput among those
    that succeeded (the lower middle one for an even count), marked with its round (1-based) and
    how many rounds it had; the first round's error when every round failed."""
    out = []
    for i in range(len(rounds[0])):
        runs = [(k, rnd[i]) for k, rnd in enumerate(rounds, 1)]
        ok = sorted(((k, r) for k, r in runs if "error" not in r), key=lambda kr: kr[1]["throughput_ops_s"])
        if not ok:
            out.append(runs[0][1])
            continue
        k, r = ok[(len(ok) - 1) // 2]
        out.append({**r, "round": k, "rounds_ok": len(ok)})
    return out


def round_rows(rounds: list[list[dict[str, Any]]], pattern: str = "read-cas") -> list[dict[str, Any]]:
    """One line per round of one pattern: each store's ops/s and p99 (None when it failed), and
    the pattern's targets."""
    rows = []
    for k, rnd in enumerate(rounds, 1):
        ok = [r for r in rnd if "error" not in r]
        rows.append({
            "round": k,
            "ops_s": {r["store"]: (None if "error" in r else r["throughput_ops_s"]) for r in rnd},
            "p99_ms": {r["store"]: r["latency_ms"]["p99"] for r in ok},
            "targets": summarize(rnd, pattern)["targets"],
        })
    return rows


def target_labels(stores: Sequence[str], pattern: str = "read-cas") -> list[str]:
    """The targets a run of these stores with this pattern can be held to (shardstate and the
    peer both in it)."""
    return [f"{label} ({who})" for wanted, peer, _, _, label in TARGETS.get(pattern, ())
            if peer in stores and (who := subject(wanted, stores)) is not None]


def round_header(stores: Sequence[str], pattern: str = "read-cas") -> list[str]:
    """The columns of the rounds table: round, each store's ops/s, each target that applies
    (shardstate's figure / the figure needed), targets met."""
    return ["round", *[f"{s} ops/s" for s in stores],
            *[f"{t} (has / needs)" for t in target_labels(stores, pattern)], "targets met"]


def round_cells(row: dict[str, Any], stores: Sequence[str], pattern: str = "read-cas") -> list[str]:
    """A round's line as text (console and report alike), in round_header's columns."""
    by_label = {t["target"]: t for t in row["targets"]}
    cells = [str(row["round"]), *[f"{v:,.0f}" if (v := row["ops_s"].get(s)) is not None else "failed" for s in stores]]
    for label in target_labels(stores, pattern):
        t = by_label.get(label)
        cells.append("-" if t is None else f"{t['shardstate']:,.2f} / {t['needed']:,.2f} {'met' if t['met'] else 'NOT met'}")
    met = [t["met"] for t in row["targets"]]
    return [*cells, f"{sum(met)} of {len(met)}" if met else "-"]


def rounds_table(rows: list[dict[str, Any]], stores: Sequence[str], pattern: str = "read-cas") -> Table:
    t = Table(title=f"{pattern}: every round ({len(rows)}); the tables below show each store's median run")
    for name in round_header(stores, pattern):
        t.add_column(name, justify="right")
    for row in rows:
        t.add_row(*round_cells(row, stores, pattern))
    return t


def idle_check(seconds: float = 1.0) -> float:
    """% of all cores busy over `seconds` before a store starts: something else running on the
    machine makes that store's figures worse, so the report records it."""
    b0, t0 = procstat.machine_busy_seconds(), time.monotonic()
    time.sleep(seconds)
    b1, t1 = procstat.machine_busy_seconds(), time.monotonic()
    cores = os.cpu_count() or 1
    return round(100.0 * (b1 - b0) / ((t1 - t0) * cores), 1)


# ---- the report ----

def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(results: list[dict[str, Any]], pattern: str = "read-cas") -> dict[str, Any]:
    """Ratios to shardstate and the pattern's targets, among runs of one pattern."""
    ok = {r["store"]: r for r in results if "error" not in r}
    base = ok.get(BASELINE)
    ratios: dict[str, Any] = {}
    for store, r in ok.items():
        if base:
            ratios[store] = {
                "throughput_vs_shardstate": ratio(r["throughput_ops_s"], base["throughput_ops_s"]),
                "p99_vs_shardstate": ratio(r["latency_ms"]["p99"], base["latency_ms"]["p99"]),
            }
    targets = []
    for wanted, peer, what, factor, label in TARGETS.get(pattern, ()):
        who = subject(wanted, list(ok))
        if peer not in ok or who is None:
            continue
        mine = ok[who]
        if what == "throughput":
            need = factor * ok[peer]["throughput_ops_s"]
            have, met = mine["throughput_ops_s"], mine["throughput_ops_s"] >= need
        else:
            need = factor * ok[peer]["latency_ms"]["p99"]
            have, met = mine["latency_ms"]["p99"], mine["latency_ms"]["p99"] <= need
        targets.append({"target": f"{label} ({who})", "shardstate": round(have, 3), "needed": round(need, 3),
                        "met": met})
    return {"ratios": ratios, "targets": targets}


def run_notes(r: dict[str, Any], cores: int | None) -> list[str]:
    """What limits one store's figures besides the store: a saturated load generator, or
    other processes busy on the machine during its window (report and console alike)."""
    notes = []
    window = r["window_s"]
    client = r.get("cpu_s", {}).get("client")
    if client is not None and client > CLIENT_BOUND * window:
        notes.append(f"the load generator (one Python process) used {client / window:.0%} of a core: "
                     "this store's throughput is bounded by the client side, not the server")
    other = other_load(r)
    if other is not None and other > 0.05 * window * (cores or 1):
        notes.append(f"other processes on the machine used {other:.1f} CPU-s during its {window:g} s window "
                     f"({100 * other / (window * (cores or 1)):.0f}% of all cores): its figures are pessimistic")
    return notes


def other_load(r: dict[str, Any]) -> float | None:
    """CPU seconds the machine spent in the window on processes the run did not account for."""
    busy = r.get("machine_busy_cpu_s")
    if busy is None:
        return None
    return round(busy - sum(v for v in r.get("cpu_s", {}).values()), 2)


def ratio_table(results: list[dict[str, Any]], title: str) -> Table:
    ok = [r for r in results if "error" not in r]
    base = next((r for r in ok if r["store"] == BASELINE), None)
    t = Table(title=title)
    for col, just in (("store", "left"), ("workload", "left"), ("ops/s", "right"), ("success/s", "right"),
                      ("p50 ms", "right"), ("p95 ms", "right"), ("p99 ms", "right"), ("max ms", "right"),
                      ("completed", "right"), ("conflicts", "right"), ("errors", "right"),
                      ("ops/s ÷ shardstate", "right"), ("p99 ÷ shardstate", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in results:
        if "error" in r:
            t.add_row(r["store"], "-", *["-"] * 11, style="red")
            continue
        lat = r["latency_ms"]
        tp, p99 = report.ratios(r, base)
        t.add_row(r["store"], report.workload_label(r), f"{r['throughput_ops_s']:,.0f}",
                  f"{r['success_ops_s']:,.0f}", f"{lat['p50']:.2f}", f"{lat['p95']:.2f}",
                  f"{lat['p99']:.2f}", f"{lat['max']:.2f}", f"{r['completed']:,}", f"{r['conflicts']:,}",
                  f"{r['errors']:,}", tp, p99, style="red" if r["errors"] else None)
    return t


def cpu_table(results: list[dict[str, Any]]) -> Table:
    t = Table(title="CPU seconds per 1,000 ops (measured window)")
    t.add_column("store")
    t.add_column("process")
    t.add_column("CPU s", justify="right")
    t.add_column("CPU s / 1000 ops", justify="right")
    for r in results:
        if "error" in r:
            continue
        store = f"{r['store']} ({r['pattern']})" if r.get("pattern") else r["store"]
        per = r.get("cpu_s_per_1000_ops", {})
        for name, sec in r.get("cpu_s", {}).items():
            t.add_row(store, name, f"{sec:.2f}", f"{per.get(name) or 0:.4f}")
        total = sum(r.get("cpu_s", {}).values())
        t.add_row(store, "[b]all of the above[/]", f"{total:.2f}",
                  f"{total / r['completed'] * 1000:.4f}" if r["completed"] else "-")
        other = other_load(r)
        if other is not None:
            t.add_row(store, "[dim]anything else on the machine[/]", f"{other:.2f}", "")
    return t


PATTERN_TEXT = {
    "read-cas": "every store reads the session's state, then compare-and-swaps it (two round trips)",
    "cached": "every store's client remembers each session's version and sends one CAS; a lost CAS "
              "answers with the current version and the step retries once from it",
}


def markdown(doc: dict[str, Any], png: str | None) -> str:
    cfg, everything = doc["config"], doc["results"]
    ok_all = [r for r in everything if "error" not in r]
    m = doc["machine"]
    lines = [
        f"# benchmarks/compare: {cfg['workload']} workload",
        "",
        f"- date: {doc['date']}",
        f"- command: `{doc['command']}`",
        f"- machine: {m['cores']} cores ({m['cpu_model'] or 'unknown CPU'}), "
        f"{m['memory_bytes'] / 2**30:.1f} GiB RAM, {m['os']}, Python {m['python']}; "
        f"load average at start {m['loadavg_at_start']}",
        f"- same for every store: value {cfg['value_size']} B, {cfg['sessions']:,} sessions, "
        f"{cfg['concurrency']} concurrent callers, {cfg['warmup']:g} s warm-up, "
        f"{cfg['duration']:g} s measured, zipf {cfg['zipf']:g}; load generator: a fresh `shardstate bench` "
        f"process per store, on the {ok_all[0].get('event_loop', 'asyncio') if ok_all else 'asyncio'} event loop",
        "- ratios are drawn only between runs of the same step pattern",
    ]
    for pattern, sec in doc["patterns"].items():
        results, rows = sec["results"], sec.get("rounds")
        ok = [r for r in results if "error" not in r]
        base = next((r for r in ok if r["store"] == BASELINE), None)
        lines += ["", f"## Pattern {pattern}" if cfg["workload"] == "step" else "## Results", ""]
        if cfg["workload"] == "step":
            lines += [f"{PATTERN_TEXT.get(pattern, pattern)}.", ""]
        lines += [
            "| store | workload | ops/s | success/s | p50 ms | p95 ms | p99 ms | max ms | completed | "
            "conflicts | errors | ops/s ÷ shardstate | p99 ÷ shardstate |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in results:
            if "error" in r:
                lines.append(f"| {r['store']} | failed: {r['error']} |" + " |" * 11)
                continue
            lat = r["latency_ms"]
            tp, p99 = report.ratios(r, base)
            lines.append(
                f"| {r['store']} | {report.workload_label(r)} | {r['throughput_ops_s']:,.0f} | "
                f"{r['success_ops_s']:,.0f} | {lat['p50']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f} | "
                f"{lat['max']:.2f} | {r['completed']:,} | {r['conflicts']:,} | {r['errors']:,} | {tp} | {p99} |")
        if rows:
            picked = ", ".join(f"{r['store']} round {r['round']}" for r in ok if "round" in r)
            header = round_header(doc["stores"], pattern)
            lines += ["", f"Each store's median run of {len(rows)} rounds, run interleaved ({picked}).", "",
                      "| " + " | ".join(header) + " |", "|" + "--:|" * len(header)]
            lines += ["| " + " | ".join(round_cells(row, doc["stores"], pattern)) + " |" for row in rows]
        if sec["summary"]["targets"]:
            which = "the median runs" if rows else "this run"
            lines += ["", f"Targets ({pattern}, {which}):", ""]
            for t in sec["summary"]["targets"]:
                lines.append(f"- {t['target']}: shardstate {t['shardstate']:,.2f}, needed {t['needed']:,.2f} "
                             f"-> **{'met' if t['met'] else 'NOT met'}**")
    lines += ["", "## CPU seconds per 1,000 ops", "",
              "| store | pattern | process | CPU s | CPU s / 1000 ops |", "|---|---|---|--:|--:|"]
    for r in ok_all:
        for name, sec_ in r.get("cpu_s", {}).items():
            lines.append(f"| {r['store']} | {r.get('pattern', '')} | {name} | {sec_:.2f} | "
                         f"{(r['cpu_s_per_1000_ops'].get(name) or 0):.4f} |")
        total = sum(r.get("cpu_s", {}).values())
        per = f"{total / r['completed'] * 1000:.4f}" if r["completed"] else "-"
        lines.append(f"| {r['store']} | {r.get('pattern', '')} | **all** | {total:.2f} | {per} |")
        other = other_load(r)
        if other is not None:
            lines.append(f"| {r['store']} | {r.get('pattern', '')} | anything else on the machine | {other:.2f} | |")
    lines += ["", "`client` is the load generator (one Python process, asyncio). CPU includes user + "
              "system time, and reaped children (Redis's AOF rewrites).", "", "## How each store was driven", ""]
    for r in ok_all:
        d = r.get("backend", {})
        lines.append(f"- **{r['store']}** ({r['server']['version']}, {r.get('pattern', '')}): {d.get('client', '')}; "
                     f"step: {d.get('step', '')}")
        lines += [f"  - note: {n}" for n in run_notes(r, m["cores"])]
        if r.get("machine_busy_before_pct", 0) > IDLE_PCT:
            lines.append(f"  - note: the machine was {r['machine_busy_before_pct']}% busy just before "
                         "this store started")
    lines.append("")
    if png:
        lines += [f"![latency percentiles and throughput over time]({png})", ""]
    else:
        lines += [f"No plot: {doc.get('plot_note', 'matplotlib is not installed')}.", ""]
    return "\n".join(lines)


def default_out() -> Path:
    return Path("bench-reports") / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser().parse_args(argv)
    console = report.wide_console()
    stores = [s.strip() for s in ns.stores.split(",") if s.strip()]
    bad = [s for s in stores if s not in BACKENDS]
    if bad or not stores:
        raise SystemExit(f"compare: unknown store(s) {bad}; choose from {', '.join(BACKENDS)}")
    if ns.sessions < 1 or ns.concurrency < 1 or ns.value_size < 1 or ns.duration <= 0 or ns.warmup < 0:
        raise SystemExit("compare: --sessions, --concurrency, --value-size must be >= 1, --duration > 0")
    if ns.rounds < 1:
        raise SystemExit(f"compare: --rounds must be >= 1, got {ns.rounds}")
    patterns = [p.strip() for p in ns.patterns.split(",") if p.strip()]
    if not patterns or any(p not in PATTERNS for p in patterns):
        raise SystemExit(f"compare: --patterns takes {', '.join(PATTERNS)}, got {ns.patterns!r}")
    if ns.workload != "step":
        patterns = patterns[:1]  # the pattern is the step's: other workloads run once
    ensure_peers(stores, not ns.no_install, console)
    out = Path(ns.out) if ns.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    servers.term_as_exit()  # SIGTERM/SIGHUP -> SystemExit, so the finally below stops everything
    workdir = Path(tempfile.mkdtemp(prefix="shardstate-compare-"))
    command = " ".join(shlex.quote(a) for a in [os.environ.get("SHARDSTATE_COMPARE_ARGV0", "benchmarks/compare"), *argv])
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    machine = procstat.machine()
    console.print(f"compare: {', '.join(stores)}; {ns.workload}, {ns.value_size} B, {ns.sessions:,} sessions, "
                  f"{ns.concurrency} concurrent, {ns.warmup:g} s warm-up + {ns.duration:g} s each; "
                  f"patterns {', '.join(patterns)}"
                  f"{f', {ns.rounds} rounds' if ns.rounds > 1 else ''}; "
                  f"{machine['cores']} cores ({machine['cpu_model']}); report in {out}")
    # Per round, per pattern: each store's result, in store order (a round runs every pattern's
    # stores before the next round, so the patterns interleave as the stores do).
    rounds: list[dict[str, list[dict[str, Any]]]] = []
    try:
        for k in range(1, ns.rounds + 1):
            rdir = out if ns.rounds == 1 else out / f"round{k}"
            rdir.mkdir(parents=True, exist_ok=True)
            if ns.rounds > 1:
                console.rule(f"[bold]round {k} of {ns.rounds}")
            rounds.append({pattern: [run_with_reruns(store, pattern, ns, workdir / f"round{k}", rdir, console)
                                     for store in stores] for pattern in patterns})
    except KeyboardInterrupt:
        console.print("[yellow]compare: interrupted; servers stopped[/]")
        return 130
    finally:
        if ns.keep_data:
            console.print(f"compare: data and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    sections: dict[str, dict[str, Any]] = {}
    for pattern in patterns:
        of_pattern = [rnd[pattern] for rnd in rounds]
        res = median_results(of_pattern)
        sections[pattern] = {"results": res, "summary": summarize(res, pattern)}
        if ns.rounds > 1:
            sections[pattern]["rounds"] = round_rows(of_pattern, pattern)
    results = [r for sec in sections.values() for r in sec["results"]]
    doc: dict[str, Any] = {
        "date": date, "command": command, "machine": machine,
        "config": {**{k: getattr(ns, k) for k in ("workload", "value_size", "sessions", "concurrency",
                                                   "duration", "warmup", "zipf", "seed", "rounds")},
                   "patterns": patterns},
        "stores": stores, "patterns": sections, "results": results,
    }
    png: str | None = "compare.png"
    ok = [r for r in results if "error" not in r]
    try:
        if ok:
            labelled = [{**r, "store": f"{r['store']} ({r['pattern']})"} if len(patterns) > 1 else r for r in ok]
            report.plot(labelled, out / "compare.png",
                        title=f"{ns.workload}: {', '.join(stores)}" + (f"; patterns {', '.join(patterns)}"
                                                                       if len(patterns) > 1 else ""))
        else:
            png = None
            doc["plot_note"] = "no store produced a result"
    except report.NoPlot as e:
        png, doc["plot_note"] = None, str(e)
    report.write_json(doc, out / "results.json")
    (out / "report.md").write_text(markdown(doc, png))

    for pattern, sec in sections.items():
        if ns.rounds > 1:
            console.print(rounds_table(sec["rounds"], stores, pattern))
        console.print(ratio_table(sec["results"], f"{ns.workload} ({pattern}): {ns.value_size} B, {ns.sessions:,} "
                                                   f"sessions, {ns.concurrency} concurrent, {ns.duration:g} s"
                                  + (f"; each store's median of {ns.rounds} rounds" if ns.rounds > 1 else "")))
        for t in sec["summary"]["targets"]:
            mark = "[green]met[/]" if t["met"] else "[red]NOT met[/]"
            console.print(f"  target {t['target']}: shardstate {t['shardstate']:,.2f}, needed {t['needed']:,.2f} -> {mark}")
    console.print(cpu_table(results))
    for r in ok:
        for n in run_notes(r, machine["cores"]):
            console.print(f"[yellow]note ({r['store']}, {r['pattern']}): {n}[/]", markup=True, highlight=False)
    console.print(f"machine: {machine['cores']} cores, {machine['cpu_model']}; date {date}")
    console.print(f"command: {command}")
    console.print(f"report: {out / 'report.md'}" + ("" if png else f" (no PNG: {doc.get('plot_note')})"))
    failed = sorted({f"{r['store']} ({r['pattern']})" for rnd in rounds for runs in rnd.values() for r in runs
                     if "error" in r or r.get("bench_exit_code")})
    if failed:
        console.print(f"[red]compare: failed: {', '.join(failed)}[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
