"""Turning results into what people read: a rich table, a JSON file, a PNG (matplotlib, optional).

The same functions serve one `shardstate bench` run and a `benchmarks/compare` run of several stores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

LAT_KEYS = ("p50", "p95", "p99", "max")
WIDE = 200  # columns when the output is not a terminal (files, CI logs): never truncate figures


class NoPlot(RuntimeError):
    """matplotlib is not installed (it is an optional extra)."""


def wide_console(stderr: bool = False) -> Console:
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=WIDE)


def table(results: Sequence[dict[str, Any]], title: str = "", ratio_to: str | None = None) -> Table:
    """One row per result; with `ratio_to`, columns comparing throughput and p99 to that store."""
    t = Table(title=title or None)
    t.add_column("store")
    t.add_column("workload")
    t.add_column("ops/s", justify="right")
    for k in LAT_KEYS:
        t.add_column(f"{k} ms", justify="right")
    for k in ("completed", "successes", "conflicts", "errors"):
        t.add_column(k, justify="right")
    base = next((r for r in results if r["store"] == ratio_to), None) if ratio_to else None
    if ratio_to:
        t.add_column(f"ops/s vs {ratio_to}", justify="right")
        t.add_column(f"p99 vs {ratio_to}", justify="right")
    for r in results:
        lat = r["latency_ms"]
        row = [r["store"], workload_label(r), f"{r['throughput_ops_s']:,.0f}",
               *(f"{lat[k]:.2f}" for k in LAT_KEYS),
               *(f"{r[k]:,}" for k in ("completed", "successes", "conflicts", "errors"))]
        if ratio_to:
            row += list(ratios(r, base))
        t.add_row(*row, style="red" if r["errors"] else None)
    return t


def workload_label(r: dict[str, Any]) -> str:
    """"step (cached)": the workload, and for steps which implementation ran."""
    impl = r.get("step_impl")
    return f"{r['workload']} ({impl})" if impl and r["workload"] in ("step", "mixed") else r["workload"]


def ratios(r: dict[str, Any], base: dict[str, Any] | None) -> tuple[str, str]:
    """(throughput ratio, p99 ratio) of r to base as text, "-" when there is nothing to divide by."""
    if not base:
        return "-", "-"
    tp = base["throughput_ops_s"]
    p99 = base["latency_ms"]["p99"]
    return (f"{r['throughput_ops_s'] / tp:.2f}x" if tp else "-",
            f"{r['latency_ms']['p99'] / p99:.2f}x" if p99 else "-")


def stdout_console() -> Console:
    """A console for the final table; wide when not a terminal so logs keep whole columns."""
    c = Console()
    return c if c.is_terminal else Console(width=200)


def print_table(results: Sequence[dict[str, Any]], console: Console | None = None, **kw: Any) -> None:
    (console or stdout_console()).print(table(results, **kw))


def write_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def plot(results: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """A PNG: latency percentiles per store (bars, log scale) and throughput over time (lines)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        raise NoPlot("plots need matplotlib: pip install 'shardstate[plot]'") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_lat, ax_tp, ax_p99) = plt.subplots(1, 3, figsize=(16, 4.5))
    n = max(len(results), 1)
    width = 0.8 / n
    for i, r in enumerate(results):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(LAT_KEYS))]
        heights = [max(r["latency_ms"][k], 1e-3) for k in LAT_KEYS]
        bars = ax_lat.bar(xs, heights, width, label=r["store"])
        ax_lat.bar_label(bars, [f"{h:.1f}" for h in heights], fontsize=7)
        seconds = [p["second"] + 1 for p in r["timeline"]]
        ax_tp.plot(seconds, [p["ops"] for p in r["timeline"]], marker=".", label=r["store"])
        ax_p99.plot(seconds, [p["p99_ms"] for p in r["timeline"]], marker=".", label=r["store"])
    ax_lat.set_xticks(range(len(LAT_KEYS)), list(LAT_KEYS))
    ax_lat.set_yscale("log")
    ax_lat.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_lat.set_ylabel("latency (ms, log scale)")
    ax_lat.set_title("latency percentiles (measured window)")
    ax_lat.legend()
    ax_tp.set_xlabel("second of the measured window")
    ax_tp.set_ylabel("ops completed per second")
    ax_tp.set_title("throughput over time")
    ax_tp.set_ylim(bottom=0)
    ax_tp.legend()
    ax_p99.set_xlabel("second of the measured window")
    ax_p99.set_ylabel("p99 latency of the ops ending in that second (ms)")
    ax_p99.set_title("p99 over time")
    ax_p99.set_ylim(bottom=0)
    ax_p99.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
