"""The fair table: every system at its defaults and at its best swept settings, interleaved.

    python bench/fair.py --dsn postgresql://localhost/postgres            # sweep, then the table
    python bench/fair.py --dsn postgresql://localhost/postgres --quick    # the table, < 5 minutes
    python bench/fair.py --dsn postgresql://localhost/postgres --no-sweep # the full table alone

Full form: first a **sweep** of every system's documented knobs (``GRID``, two interleaved
rounds per setting, on the workload named in ``SWEPT_ON``); the best median of each system
is written to ``--best`` (default ``bench/results/fair-best.json``). Then the **table**:
each workload measures every system at its defaults (``DEFAULTS``: the library's own, or,
where it has none, its documentation's example) and at its best settings, the systems
interleaved round by round (A B C … then B C … A, so that none always goes first) for
``--rounds`` rounds; each cell is the median and the spread (min–max). The quick form
skips the sweep and reads the best settings recorded by the last full run, with smaller
counts and three rounds; ``--no-sweep`` reads them too and runs the table at full counts.

Every measurement is one subprocess of the system's script (``bench/workloads_pgdurable.py``,
``bench/peers/<peer>_bench.py``, ``bench/floor.py``) in ``measure`` mode: it starts a fleet of
two worker processes with the settings, lets it go idle for a second, runs one round and
stops the fleet; so no idle fleet of one system runs while another is measured. Each
(system, settings) has a scratch database of its own for the whole run (``bench_fair_…``,
dropped at the end), which only its own rounds fill.

The **floor** (``bench/floor.py``) is bare SQL: claim and complete in batches on plain
psycopg connections, its batch size and connection count swept like a system's knobs.
Every pgdurable throughput figure is also given as a percentage of it. The last table
checks the targets of ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (
    BENCH,
    BEST,
    PEERS,
    VENV,
    create_db,
    drop_db,
    ensure_peers,
    recorded_best,
    revision,
    server_facts,
)

#: Each system's defaults. pgdurable: every queue key at its default but ``processes``.
DEFAULTS: dict[str, dict[str, Any]] = {
    "pgdurable": {"processes": 2},
    "pgqueuer": {"batch_size": 10, "max_concurrent_tasks": None},
    "procrastinate": {"concurrency": 1},
    "oban": {"limit": 10},  # a queue's limit has no default; its README's example
    "chancy": {"concurrency": None, "eager_polling": False},  # AsyncExecutor: the jobs are async
    "dbos": {"worker_concurrency": None, "polling_interval_sec": 1.0},
}

#: The knobs each system's sweep tries (besides its defaults).
GRID: dict[str, list[dict[str, Any]]] = {
    "pgdurable": [
        {"processes": 2, "concurrency": c, "batch": b, "prefetch": p}
        for c, b, p in [
            (10, 100, 10),
            (10, 200, 10),
            (10, 800, 10),
            (25, 400, 25),
            (50, 400, 50),
            (50, 800, 50),
            (10, 1600, 10),
        ]
    ],
    "pgqueuer": [
        *({"batch_size": b, "max_concurrent_tasks": t} for b in (10, 50, 100, 200) for t in (20, 100, 1000)),
        # past the grid's edge, where its best was found: bigger batches, more tasks
        {"batch_size": 400, "max_concurrent_tasks": 1000},
        {"batch_size": 400, "max_concurrent_tasks": 2000},
        {"batch_size": 200, "max_concurrent_tasks": 2000},
        {"batch_size": 800, "max_concurrent_tasks": 1000},
        {"batch_size": 800, "max_concurrent_tasks": 2000},
    ],
    "procrastinate": [{"concurrency": c} for c in (10, 50, 100)],
    "oban": [{"limit": c} for c in (20, 50, 100, 200)],
    "chancy": [{"concurrency": c, "eager_polling": True} for c in (10, 50, 100, 200)],
    "dbos": [{"worker_concurrency": c, "polling_interval_sec": p} for c in (20, 100) for p in (0.1, 0.01)],
    "floor": [
        *({"batch": b, "connections": k} for b in (50, 100, 200, 400) for k in (2, 4, 8)),
        {"batch": 800, "connections": 2},
    ],
}

#: The workload a system's sweep picks its best settings on (used for every workload).
SWEPT_ON = {"dbos": "fsm"}

#: (workload, unit, higher is better)
WORKLOADS = [
    ("noop", "jobs/s", True),
    ("fsm", "steps/s", True),
    ("fsm_inline", "steps/s", True),
    ("latency", "ms", False),
    ("insert_many", "rows/s", True),
]
#: Which systems each workload measures: the floor only drains; only pgdurable runs ahead.
MEASURES = {
    "noop": ["pgdurable", "pgqueuer", "procrastinate", "oban", "chancy", "dbos", "floor"],
    "fsm": ["pgdurable", "pgqueuer", "procrastinate", "oban", "chancy", "dbos"],
    "fsm_inline": ["pgdurable"],
    "latency": ["pgdurable", "pgqueuer", "procrastinate", "oban", "chancy", "dbos"],
    "insert_many": ["pgdurable", "pgqueuer", "procrastinate", "oban", "chancy"],
}
#: The quick form: the systems the targets name, fewer rows.
QUICK = {
    "noop": ["pgdurable", "pgqueuer", "floor"],
    "fsm": ["pgdurable", "pgqueuer", "dbos"],
    "fsm_inline": ["pgdurable"],
    "latency": ["pgdurable", "pgqueuer", "procrastinate", "oban", "chancy", "dbos"],
    "insert_many": ["pgdurable", "pgqueuer"],
}


@dataclass
class Counts:
    jobs: int  # no-op jobs per burst
    floor_jobs: int  # the floor drains this many (it is 3-5x as fast: a burst long enough to time)
    fsm: int  # 5-step instances per burst
    latency: int  # samples
    inserts: int  # rows per insert_many round
    deadline: float  # a burst is given up after this many seconds; its rate is what finished
    rounds: int
    latency_rounds: int
    sweep_rounds: int


FULL = Counts(20_000, 60_000, 3_000, 150, 20_000, 12.0, 5, 2, 2)
QUICK_COUNTS = Counts(8_000, 30_000, 1_000, 30, 10_000, 6.0, 3, 1, 1)


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


@dataclass
class Config:
    system: str
    knobs: dict[str, Any]
    db: str = ""
    dsn: str = ""
    version: str = ""
    rounds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: The sweep's rounds: kept apart, the table's cells are made of the table's rounds only.
    swept: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.system} {json.dumps(self.knobs, sort_keys=True)}"


class Runner:
    def __init__(self, args: argparse.Namespace, counts: Counts):
        self.args, self.counts = args, counts
        self.configs: dict[str, Config] = {}
        self.tag = f"bench_fair_{secrets.token_hex(3)}"

    def script(self, system: str) -> tuple[str, Path]:
        if system == "pgdurable":
            return sys.executable, BENCH / "workloads_pgdurable.py"
        if system == "floor":
            return sys.executable, BENCH / "floor.py"
        return str(VENV / "bin" / "python"), BENCH / "peers" / f"{system}_bench.py"

    def config(self, system: str, knobs: dict[str, Any]) -> Config:
        """The config of these settings, its database created and set up on first use."""
        cfg = Config(system, knobs)
        if cfg.key in self.configs:
            return self.configs[cfg.key]
        self.configs[cfg.key] = cfg
        cfg.db = f"{self.tag}_{len(self.configs)}"
        cfg.dsn = create_db(self.args.dsn, cfg.db)
        out = self.call(cfg, "setup", None)
        cfg.version = str(out.get("version", "?"))
        return cfg

    def call(self, cfg: Config, role: str, workload: str | None) -> dict[str, Any]:
        c = self.counts
        settings: dict[str, Any] = {
            "jobs": c.floor_jobs if cfg.system == "floor" else c.jobs,
            "fsm": self.fsm_count(cfg),
            "inserts": c.inserts,
            "latency": c.latency,
            "deadline": c.deadline,
            "processes": 2,
            "knobs": cfg.knobs,
        }
        python, script = self.script(cfg.system)
        cmd = [python, str(script), role, "--dsn", cfg.dsn, "--settings", json.dumps(settings)]
        cmd += ["--workload", workload] if workload else []
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")])),
        }
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=c.deadline * 3 + 120, cwd=BENCH
            )
        except subprocess.TimeoutExpired:
            return {"note": "timed out"}
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            return {"note": f"failed: {tail[0][:200]}"}
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def fsm_count(self, cfg: Config) -> int:
        """5-step instances per burst: fewer for a system whose no-op rate cannot run five
        steps of them all within half the deadline (the first steps of every instance are
        queued before any second step, so none would finish)."""
        rates = [r for c in self.configs.values() if c.system == cfg.system for r in values(c, "noop")]
        if not rates:
            return self.counts.fsm
        return max(50, min(self.counts.fsm, int(statistics.median(rates) * self.counts.deadline / 10)))

    def measure(self, cfg: Config, workload: str) -> dict[str, Any]:
        out = self.call(cfg, "measure", workload)
        cfg.rounds.setdefault(workload, []).append(out)
        if str(out.get("note", "")).startswith(("gave up", "failed", "timed out")):
            # Its unfinished jobs would be ahead of the next round's: a fresh database.
            drop_db(self.args.dsn, cfg.db)
            create_db(self.args.dsn, cfg.db)
            self.call(cfg, "setup", None)
        value = out.get("value")
        shown = f"{value:,.1f}" if isinstance(value, float) else out.get("note", "?")
        log(f"  {workload:<11} {cfg.key}: {shown}")
        return out

    def interleave(self, configs: list[Config], workload: str, rounds: int) -> None:
        for r in range(rounds):
            k = r % len(configs)
            for cfg in configs[k:] + configs[:k]:
                self.measure(cfg, workload)

    def drop(self) -> None:
        for cfg in self.configs.values():
            try:
                drop_db(self.args.dsn, cfg.db)
            except Exception as exc:  # noqa: BLE001 - report and go on
                log(f"could not drop {cfg.db}: {exc}")


# -- figures ------------------------------------------------------------------------------
def values(cfg: Config, workload: str, key: str = "value", source: str = "rounds") -> list[float]:
    """Every round's figure (the table's, or the sweep's): steps/s for the 5-step machines
    (instances/s x 5)."""
    out = []
    for r in getattr(cfg, source).get(workload, []):
        v = r.get("detail", {}).get(key) if key != "value" else r.get("value")
        if isinstance(v, int | float):
            out.append(float(v) * (5 if workload.startswith("fsm") else 1))
    return out


def median(cfg: Config | None, workload: str, key: str = "value", source: str = "rounds") -> float | None:
    vs = values(cfg, workload, key, source) if cfg else []
    return statistics.median(vs) if vs else None


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def cell(cfg: Config | None, workload: str, key: str = "value") -> str:
    vs = values(cfg, workload, key) if cfg else []
    if not vs:
        notes = {r.get("note") for r in (cfg.rounds.get(workload, []) if cfg else []) if r.get("note")}
        return "; ".join(sorted(n for n in notes if n))[:80] or "—"
    text = fmt(statistics.median(vs))
    if len(vs) > 1:
        text += f" ({fmt(min(vs))}–{fmt(max(vs))})"
    if any(r.get("note", "").startswith("gave up") for r in cfg.rounds.get(workload, [])):  # type: ignore[union-attr]
        text += " [d]"
    return text


def knobs_text(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items() if k != "processes") or "defaults"


# -- the sweep ------------------------------------------------------------------------------
def sweep(runner: Runner, systems: list[str]) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    rows: list[str] = ["| system | settings | swept on | median | rounds |", "|---|---|---|---:|---|"]
    for system in systems:
        workload = SWEPT_ON.get(system, "noop")
        grid = ([DEFAULTS[system]] if system in DEFAULTS else []) + GRID[system]
        log(f"sweep {system} on {workload}: {len(grid)} settings")
        configs = [runner.config(system, knobs) for knobs in grid]
        runner.interleave(configs, workload, runner.counts.sweep_rounds)
        ranked = sorted(configs, key=lambda c: median(c, workload) or 0.0, reverse=True)
        for cfg in configs:
            cfg.swept, cfg.rounds = cfg.rounds, {}
        best[system] = ranked[0].knobs
        for cfg in configs:
            mark = " **best**" if cfg is ranked[0] else ""
            rounds = ", ".join(fmt(v) for v in values(cfg, workload, source="swept"))
            rows.append(
                f"| {system} | {knobs_text(cfg.knobs)}{mark} | {workload} "
                f"| {fmt(median(cfg, workload, source='swept'))} | {rounds} |"
            )
    print("## Sweep\n")
    print("\n".join(rows))
    print()
    return best


# -- the table ------------------------------------------------------------------------------
def table(
    runner: Runner, plan: dict[str, list[str]], best: dict[str, dict[str, Any]], quick: bool
) -> dict[str, Config]:
    """Measure each workload, systems interleaved; returns the configs by "system/label"."""
    chosen: dict[str, Config] = {}
    for workload, _, _ in WORKLOADS:
        if workload not in runner.args.only:
            continue
        configs: list[Config] = []
        for system in plan[workload]:
            labels = [("best", best.get(system))]
            # Latency rounds are long (a sample every 0.25 s): the peers' at their best only.
            slow = quick or workload == "latency"
            if system in DEFAULTS and (not slow or system == "pgdurable" or workload == "noop"):
                labels.insert(0, ("defaults", DEFAULTS[system]))
            for label, knobs in labels:
                if knobs is None:
                    continue
                cfg = runner.config(system, knobs)
                chosen[f"{system}/{label}"] = cfg
                if cfg not in configs:
                    configs.append(cfg)
        log(f"{workload}: {len(configs)} settings, interleaved")
        rounds = runner.counts.latency_rounds if workload == "latency" else runner.counts.rounds
        runner.interleave(configs, workload, rounds)
    return chosen


def report(chosen: dict[str, Config], floor: Config | None) -> str:
    head = (
        "| system | settings | no-op burst (jobs/s) | % of floor | 5-step (steps/s) "
        "| 5-step inline (steps/s) | wake p50 (ms) | wake p99 (ms) | insert_many (rows/s) |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    floor_rate = median(floor, "noop")
    for name, cfg in chosen.items():
        system, label = name.split("/")
        if system == "floor":
            continue
        pct = ""
        rate = median(cfg, "noop")
        if system == "pgdurable" and rate and floor_rate:
            pct = f"{100 * rate / floor_rate:.0f} %"
        settings = label if label == "defaults" else f"best: {knobs_text(cfg.knobs)}"
        lines.append(
            f"| {system} | {settings} | {cell(cfg, 'noop')} | {pct} | {cell(cfg, 'fsm')} | "
            f"{cell(cfg, 'fsm_inline')} | {cell(cfg, 'latency', 'p50')} | {cell(cfg, 'latency', 'p99')} | "
            f"{cell(cfg, 'insert_many')} |"
        )
    if floor is not None:
        lines.append(
            f"| floor (bare SQL) | best: {knobs_text(floor.knobs)} | {cell(floor, 'noop')} "
            "| 100 % | | | | | |"
        )
    return "\n".join(lines)


def targets(chosen: dict[str, Config], floor: Config | None) -> str:
    def m(name: str, workload: str, key: str = "value") -> float | None:
        return median(chosen.get(name), workload, key)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    peers = [n.split("/")[0] for n in chosen if n.split("/")[0] not in ("pgdurable", "floor")]
    rows = ["| target | pgdurable defaults | pgdurable best | holds (defaults) |", "|---|---:|---:|---|"]

    def add(label: str, want: float, d: float | None, b: float | None, below: bool = False) -> None:
        def show(v: float | None) -> str:
            return "—" if v is None else f"{v:.2f}"

        held = "—" if d is None else ("yes" if (d <= want if below else d >= want) else "**no**")
        rows.append(f"| {label} | {show(d)} | {show(b)} | {held} |")

    def against(workload: str, ref: float | None, key: str = "value") -> tuple[float | None, float | None]:
        """pgdurable's defaults and best, each divided by ``ref``."""
        return ratio(m("pgdurable/defaults", workload, key), ref), ratio(
            m("pgdurable/best", workload, key), ref
        )

    def within(workload: str, base: str) -> tuple[float | None, float | None]:
        """pgdurable's ``workload`` over its own ``base``, at its defaults and at its best."""
        d, b = (
            ratio(m(f"pgdurable/{lbl}", workload), m(f"pgdurable/{lbl}", base))
            for lbl in ("defaults", "best")
        )
        return d, b

    add("no-op burst ÷ pgqueuer best ≥ 2", 2.0, *against("noop", m("pgqueuer/best", "noop")))
    add("no-op burst ÷ floor ≥ 0.5", 0.5, *against("noop", median(floor, "noop")))
    add("5-step steps/s ÷ no-op jobs/s ≥ 0.6", 0.6, *within("fsm", "noop"))
    add("5-step inline steps/s ÷ no-op jobs/s ≥ 0.9", 0.9, *within("fsm_inline", "noop"))
    add("5-step steps/s ÷ DBOS best ≥ 30", 30.0, *against("fsm", m("dbos/best", "fsm")))
    for key in ("p50", "p99"):
        figures = [v for p in peers for lbl in ("defaults", "best") if (v := m(f"{p}/{lbl}", "latency", key))]
        fastest = min(figures) if figures else None
        add(f"wake {key} ÷ fastest peer's < 1", 1.0, *against("latency", fastest, key), below=True)
    ins = max(
        filter(None, [m("pgqueuer/defaults", "insert_many"), m("pgqueuer/best", "insert_many")]), default=None
    )
    add("insert_many ÷ pgqueuer ≥ 2", 2.0, *against("insert_many", ins))
    for workload, label in (("noop", "no-op burst"), ("fsm", "5-step")):
        add(
            f"defaults ÷ best, {label} ≥ 0.9",
            0.9,
            ratio(m("pgdurable/defaults", workload), m("pgdurable/best", workload)),
            1.0 if m("pgdurable/best", workload) else None,
        )
    return "\n".join(rows)


def render(chosen: dict[str, Config]) -> None:
    """Print the table and the targets of the configs by "system/label"."""
    floor = chosen.pop("floor/best", None)
    versions = sorted({f"{c.system} {c.version}" for c in chosen.values()})
    print("## Table\n")
    print("Versions: " + ", ".join(versions) + ".\n")
    print(report(chosen, floor))
    print(
        "\nMedian of the rounds, (min–max) of them; steps/s of a 5-step machine are its instances/s × 5; "
        "[d]: a round reached the deadline, its figure is what finished by then.\n"
    )
    print("## Targets\n")
    print(targets(chosen, floor))


def rerender(path: str) -> None:
    """The table and the targets again, from the JSON of an earlier run (``--json``)."""
    data = json.loads(Path(path).read_text())
    configs = [Config(**c) for c in data["configs"]]
    chosen: dict[str, Config] = {}
    for system in [*DEFAULTS, "floor"]:  # the table's order
        for label, settings in (("defaults", DEFAULTS), ("best", data["best"])):
            for cfg in configs:
                if cfg.system == system and settings.get(system) == cfg.knobs and cfg.rounds:
                    chosen[f"{system}/{label}"] = cfg
    render(chosen)


def record_best(path: Path, best: dict[str, Any], rev: str) -> None:
    """Write the swept best settings. A sweep of some systems only (``--systems``) keeps the
    others' recorded best, and the file's ``note`` says which were swept when."""
    now = dt.datetime.now().astimezone().isoformat(timespec="minutes")
    merged, note = dict(best), None
    if path.exists() and set(best) != set(GRID):
        before = json.loads(path.read_text())
        kept = {k: v for k, v in before.get("best", {}).items() if k not in best}
        if kept:
            merged = {**kept, **best}
            note = (
                f"swept at {rev} ({now}): {', '.join(sorted(best))}; the others as recorded at "
                f"{before.get('revision', '?')} ({before.get('recorded', '?')})"
                + (f" [{before['note']}]" if before.get("note") else "")
            )
    doc: dict[str, Any] = {"recorded": now, "revision": rev}
    if note:
        doc["note"] = note
    path.write_text(json.dumps({**doc, "best": merged}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", help="the maintenance database of the server (not with --report)")
    parser.add_argument("--quick", action="store_true", help="no sweep (the recorded best), small counts")
    parser.add_argument("--sweep-only", action="store_true", help="the sweep, no table")
    parser.add_argument(
        "--no-sweep", action="store_true", help="the full table at the recorded best settings, no sweep"
    )
    parser.add_argument("--best", default=str(BEST), help="best settings file")
    parser.add_argument("--systems", default=",".join(["pgdurable", *PEERS, "floor"]))
    parser.add_argument("--only", default=",".join(w for w, _, _ in WORKLOADS), help="workloads")
    parser.add_argument("--rounds", type=int, help="rounds per workload (default 5; quick 3)")
    parser.add_argument("--json", help="write every round here")
    parser.add_argument("--report", metavar="JSON", help="print the table of an earlier run's --json again")
    args = parser.parse_args()
    if args.report:
        rerender(args.report)
        return
    if not args.dsn:
        parser.error("--dsn is required")
    args.only = args.only.split(",")
    counts = QUICK_COUNTS if args.quick else FULL
    if args.rounds:
        counts.rounds = args.rounds
    systems = [s for s in args.systems.split(",") if s]
    t0 = time.monotonic()
    rev = revision()
    facts = server_facts(args.dsn)
    broken = ensure_peers([s for s in systems if s in PEERS], reinstall=False)
    for name, why in broken.items():
        log(f"{name}: {why}")
    systems = [s for s in systems if s not in broken]
    runner = Runner(args, counts)
    print(
        f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}: {os.cpu_count()} cores, "
        f"PostgreSQL {facts['server_version']} on the same host (synchronous_commit="
        f"{facts['synchronous_commit']}, fsync={facts['fsync']}, shared_buffers={facts['shared_buffers']}); "
        f"Python {platform.python_version()}; pgdurable at {rev}; every fleet 2 worker processes; "
        f"{'quick' if args.quick else 'full'} form{', no sweep' if args.no_sweep else ''}: {counts}\n"
    )
    try:
        if args.quick or args.no_sweep:
            path = Path(args.best)
            if not path.exists():
                sys.exit(f"{path}: no recorded best settings; run the full form once (it sweeps)")
            best = recorded_best(path)
        else:
            best = sweep(runner, systems)
            record_best(Path(args.best), best, rev)
            if args.sweep_only:
                return
        plan = {
            w: [s for s in (QUICK if args.quick else MEASURES)[w] if s in systems] for w, _, _ in WORKLOADS
        }
        render(table(runner, plan, best, args.quick))
        log(f"all done in {time.monotonic() - t0:.0f} s")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "facts": facts,
                        "revision": rev,
                        "best": best,
                        "configs": [c.__dict__ for c in runner.configs.values()],
                    },
                    indent=2,
                    default=str,
                )
            )
    finally:
        with contextlib.suppress(Exception):
            runner.drop()


if __name__ == "__main__":
    main()
