"""The asyncio load generator: load sessions, warm up, measure for a fixed window, drain.

Closed loop: `concurrency` workers each run one op after another. An op counts in the phase in
which it ends; workers stop starting ops when the window closes and the stragglers are drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from shardstate.bench import procstat
from shardstate.bench.backends import make_backend, resolve_step_impl
from shardstate.bench.stats import CONFLICT, ERROR, Recorder
from shardstate.bench.workloads import SessionPicker, Values, make_op, session_ids
from shardstate.common.tls import TlsFiles

DRAIN_TIMEOUT_S = 30.0
ERROR_BACKOFF_S = 0.01  # after an error, so a dead server does not turn into a hot loop


@dataclass
class RunConfig:
    backend: str  # shardstate | redis | etcd
    address: str
    workload: str = "step"
    sessions: int = 10_000
    concurrency: int = 32
    duration: float = 20.0
    warmup: float = 3.0
    value_size: int = 1024
    zipf: float = 0.0
    seed: int = 1
    step_impl: str = "auto"  # see backends.STEP_IMPLS
    load: bool = True
    cpu_pids: dict[str, int] = field(default_factory=dict)  # name -> pid, CPU sampled over the window
    tls: TlsFiles | None = None  # shardstate with TLS: the client's CA (and certificate, for direct mode)
    token: str | None = None  # shardstate with auth: the bearer token (None: SHARDSTATE_TOKEN, if set)


@dataclass
class Phase:
    name: str = "connecting"
    loaded: int = 0


async def run(cfg: RunConfig, console: Console | None = None, live: bool = True) -> dict[str, Any]:
    """Run one benchmark; returns the JSON-able result (config, summary, CPU, environment)."""
    console = console or Console(stderr=True)
    rng = random.Random(cfg.seed)
    ids = session_ids(cfg.sessions)
    picker = SessionPicker(ids, cfg.zipf, rng)
    values = Values(cfg.value_size, rng)
    backend = make_backend(cfg.backend, cfg.address, cfg.concurrency, cfg.step_impl, cfg.tls, cfg.token)
    op = make_op(cfg.workload, backend, values, rng)
    rec = Recorder()
    phase = Phase()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    env = procstat.machine()
    pids = dict(cfg.cpu_pids)
    pids["client"] = os.getpid()
    cpu: dict[str, float] = {}
    machine_busy: list[float] = []  # all cores' non-idle CPU seconds over the measured window

    display = _Display(console, cfg, rec, phase) if live and console.is_terminal else None
    try:
        with display.live() if display else contextlib.nullcontext():
            if not display:
                console.print(f"bench: {cfg.backend} at {cfg.address}: loading {cfg.sessions} sessions")
            phase.name = "loading"
            load_t0 = time.perf_counter()
            if cfg.load:
                await backend.setup(ids, values.pool[0], lambda n: setattr(phase, "loaded", phase.loaded + n))
            else:
                await backend.setup([], values.pool[0], lambda n: None)
            load_s = time.perf_counter() - load_t0

            phase.name = "warm-up"
            if not display:
                console.print(f"bench: warm-up {cfg.warmup:g} s, then measuring {cfg.duration:g} s")
            now = time.perf_counter()
            rec.measure_start = now + cfg.warmup
            rec.measure_end = rec.measure_start + cfg.duration

            async def worker() -> None:
                perf = time.perf_counter
                end = rec.measure_end
                while True:
                    t0 = perf()
                    if t0 >= end:
                        return
                    sid = picker.pick()
                    try:
                        outcome = await op(sid)
                        err: BaseException | None = None
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:
                        outcome, err = ERROR, e
                    rec.record(t0, perf(), outcome, err)
                    if err is not None:
                        await asyncio.sleep(ERROR_BACKOFF_S)

            async def sampler() -> None:
                await asyncio.sleep(max(0.0, rec.measure_start - time.perf_counter()))
                phase.name = "measuring"
                before, busy0 = _sample(pids), procstat.machine_busy_seconds()
                await asyncio.sleep(max(0.0, rec.measure_end - time.perf_counter()))
                phase.name = "draining"
                after, busy1 = _sample(pids), procstat.machine_busy_seconds()
                cpu.update({k: round(after[k] - before[k], 3) for k in before if k in after})
                machine_busy.append(round(busy1 - busy0, 3))

            tasks = [asyncio.create_task(worker()) for _ in range(cfg.concurrency)]
            await sampler()
            _, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            phase.name = "done"
    finally:
        await backend.close()

    summary = rec.summary(cfg.duration)
    summary["late_ops"] += len(pending)  # ops cut off by the drain timeout never finished at all
    per_1000 = {k: round(v / summary["completed"] * 1000.0, 4) if summary["completed"] else None
                for k, v in cpu.items()}
    config = asdict(cfg)
    return {
        "store": cfg.backend,
        "target": cfg.address,
        "workload": cfg.workload,
        "step_impl": resolve_step_impl(cfg.backend, cfg.step_impl),
        "started_at": started_at,
        "config": config,
        "load_s": round(load_s, 3),
        **summary,
        "cpu_s": cpu,
        "cpu_s_per_1000_ops": per_1000,
        # Everything the machine ran in the window (compare subtracts the processes it knows).
        "machine_busy_cpu_s": machine_busy[0] if machine_busy else None,
        "backend": backend.describe(),
        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],  # uvloop | asyncio
        "machine": env,
    }


def _sample(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = procstat.cpu_seconds(pid)
        except (OSError, ValueError):
            continue  # the process went away: no figure rather than a wrong one
    return out


class _Display:
    """The live view: loading progress, then phase, ops, ops/s, p99, conflicts, errors."""

    def __init__(self, console: Console, cfg: RunConfig, rec: Recorder, phase: Phase) -> None:
        self.console, self.cfg, self.rec, self.phase = console, cfg, rec, phase
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)
        self.load_task = self.progress.add_task("loading sessions", total=cfg.sessions)

    def live(self) -> Live:
        return Live(self, console=self.console, refresh_per_second=4, transient=True)

    def __rich__(self) -> Group:
        cfg, rec, phase = self.cfg, self.rec, self.phase
        self.progress.update(self.load_task, completed=phase.loaded)
        head = Text(f"{cfg.backend} @ {cfg.address}  workload={cfg.workload} sessions={cfg.sessions} "
                    f"concurrency={cfg.concurrency} value={cfg.value_size}B", style="bold")
        if phase.name in ("connecting", "loading"):
            return Group(head, self.progress)
        now = time.perf_counter()
        if phase.name == "warm-up":
            left = max(0.0, rec.measure_start - now)
            return Group(head, Text(f"warm-up: {rec.warmup_ops} ops, measuring in {left:.1f} s"))
        done, conflicts, errors, rate, p99 = rec.live(now)
        elapsed = min(cfg.duration, max(0.0, now - rec.measure_start))
        bar = int(30 * elapsed / cfg.duration) if cfg.duration else 30
        line = (f"{phase.name}: [{'#' * bar}{'.' * (30 - bar)}] {elapsed:5.1f}/{cfg.duration:g} s  "
                f"ops={done}  {rate:,.0f} ops/s  p99={p99:.1f} ms  conflicts={conflicts}  errors={errors}")
        return Group(head, Text(line, style="red" if errors else ""))


def result_ok(result: dict[str, Any]) -> bool:
    """A run is usable when something completed and not everything failed."""
    return result["completed"] > 0 and result["errors"] < result["completed"]


__all__ = ["CONFLICT", "RunConfig", "result_ok", "run"]
