"""What pgdurable costs as the work grows: table size, history, processes, supervisors, and
a snapshot held open under sustained load (against pgqueuer).

    python bench/scale.py --dsn postgresql://localhost/postgres [--quick] [--json FILE]
        [--only rows,history,processes,supervisors,held]

Run it with pgdurable's interpreter; ``--dsn`` names only the maintenance database. Every
part creates its own scratch databases (``bench_scale_<random>_<part>…``) and drops them
afterwards. pgdurable runs as in bench/run.py — ``pgdurable supervise`` with a generated
config (bench/fleet.py), queue ``bench`` at the defaults but for ``processes = 2``
(``concurrency = 10``, ``prefetch = 10``, ``batch = 200``) unless the part is about that
knob — and every burst is the no-op burst of bench/harness.py: a fleet started, left idle
for a second, N no-op jobs inserted with ``insert_many`` in batches of 1,000, timed until
the database counts all N as done (10,000 jobs; 2,000 with ``--quick``). A variant's
fleet is started for each burst and stopped after it; the variants of a part alternate
within each round (A B C, A B C, …) so that the machine's drift falls on all of them, and
a part reports the median of ``--rounds`` (3) rounds with their minimum and maximum.

The parts, each printing a markdown table:

- ``rows``: the burst on a job table that already holds 0, 1M and 10M finished rows
  (``--quick``: 0, 100k, 1M; ``--rows`` to choose), one database per size, seeded with
  plain SQL into ``pgdurable.instances`` (``Pgdurable.seed``: ``INSERT … SELECT`` over
  ``generate_series``, ``VACUUM ANALYZE``, ``CHECKPOINT``). Jobs/s and % of the first size.
  The bursts add their own finished rows (rounds × N) to every size alike.
- ``history``: the burst and the 5-step machine (2,000 instances; 300 with ``--quick``;
  steps/s = instances/s × 5) with step history on (the default) and off
  (``[queues.bench] history = false``), on one database.
- ``processes``: the burst with 1, 2 and 4 worker processes under one supervisor.
- ``supervisors``: the burst with 1, 2 and 3 supervisors of one worker process each on
  the same database and queue (as on separate hosts), and, as the reference for the same
  number of processes, one supervisor of two processes.
- ``queues``: fairness between queues, with claims of up to 400 rows (the default) against
  200 and 50 (the defaults before): queues ``bench`` and ``other``, one worker process each. Both
  get a burst of the same size at once (each queue's jobs/s); then ``other`` gets one job
  every 50 ms, with ``bench`` idle and during a burst on ``bench`` (its wake latency).
- ``held``: the classic queue-bloat failure, pgdurable and pgqueuer side by side, at the
  same time, each on a database of its own. Each gets a producer inserting no-op jobs at
  ``--rate`` (300) a second (one bulk insert every 0.1 s; open loop: a late insert does not
  lower the rate) and a fleet of two worker processes draining it (pgqueuer as in
  bench/peers/pgqueuer_bench.py, run with the peers' interpreter). After ``--warmup`` (120
  s; 30 with ``--quick``) a transaction ``BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1
  FROM <job table> LIMIT 1`` is opened in each database (vacuum's horizon is per database
  for ordinary tables, so one is needed in each) and held for ``--hold`` seconds (600; 60
  with ``--quick``), then rolled back; then ``--cooldown`` (180; 60). Every ``--sample``
  seconds (10), for each system: the jobs finished in the interval (counted by their
  finish time, read 2 s late so that no commit is missed) and their mean insert → done
  time; the jobs pending (pgdurable ``runnable``, pgqueuer ``queued``); ``n_live_tup``,
  ``n_dead_tup`` (``pg_stat_user_tables``) and ``pg_total_relation_size`` of the job
  table and of the table each finished job also writes (pgdurable ``history``, pgqueuer
  ``pgqueuer_log``). A table per system over time, then a summary: throughput and insert
  → done time in the last minute of warm-up, of the hold and of the cool-down, dead tuples
  at peak, size growth, what the producers achieved, and whether pgdurable's maintenance
  process logged its ``vacuum_held`` warning (``maintenance.snapshot_warning`` set to
  ``--snapshot-warning``, 30 s, for this part only; read from the supervisor's log).

Other options: ``--rounds N``, ``--jobs N`` and ``--fsm N`` (burst sizes), ``--rows
a,b,…``, ``--rate``, ``--warmup``, ``--hold``, ``--cooldown``, ``--sample``,
``--snapshot-warning``, ``--peers-python`` (default ``bench/.peers-venv/bin/python``, made
by bench/run.py). Full mode takes about 25–40 minutes on a 2-core VM (15 of them the held
part, 3–5 seeding 10M rows; about 4 GB of disk while the ``rows`` databases exist);
``--quick`` about 6–10.

Reading ``held``: at a rate both fleets keep up with, the jobs finished per second stay at
the rate while the snapshot is held; what the dead rows cost shows as the insert → done
time, the jobs pending, the tables' growth and the CPU spent. Raise ``--rate`` towards a
fleet's capacity to see the throughput fall. pgqueuer runs at the settings of
``bench/results/fair-best.json`` (its script's own when that file is missing), with the
autovacuum settings of its ``pgq autovac`` (as in bench/run.py); pgdurable at its defaults. CPU is read
from ``/proc`` (PostgreSQL must run on this host): the fleet's processes (supervisor,
workers, maintenance; not the producers) and the database's backends, in % of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from fleet import SupervisorFleet
from harness import BENCH_DIR, STAMP_ENV, ProcessFleet, Settings, StampReceiver, burst, percentile
from pgdurable_machines import noop, stamped
from psycopg import sql
from run import VENV, create_db, drop_db, fmt, recorded_best, revision, server_facts
from workloads_pgdurable import SCHEMA, Pgdurable

from pgdurable import Insert

PARTS = ("rows", "history", "processes", "supervisors", "queues", "held")


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# -- scratch databases --------------------------------------------------------------------
class Scratch:
    """The run's databases, ``bench_scale_<random>_<suffix>``; all dropped by ``drop()``."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.tag = f"bench_scale_{secrets.token_hex(3)}"
        self.names: list[str] = []

    def create(self, suffix: str) -> str:
        name = f"{self.tag}_{suffix}"
        url = create_db(self.dsn, name)
        self.names.append(name)
        return url

    def drop(self) -> None:
        for name in self.names:
            # A busy server may refuse a connection for a while (max_connections): retry.
            for attempt in range(12):
                try:
                    drop_db(self.dsn, name)
                    break
                except psycopg.Error as exc:
                    if attempt == 11:
                        log(f"could not drop {name}: {exc}")
                    time.sleep(5)
        self.names.clear()


async def pgdurable_db(scratch: Scratch, suffix: str) -> Pgdurable:
    system = Pgdurable(scratch.create(suffix))
    await system.setup()
    return system


# -- fleets and bursts --------------------------------------------------------------------
@dataclass
class Variant:
    label: str
    system: Pgdurable
    supervisors: int = 1
    processes: int = 2
    queue: dict[str, Any] | None = None


@contextlib.asynccontextmanager
async def fleets(
    dsn: str,
    s: Settings,
    *,
    supervisors: int = 1,
    processes: int = 2,
    queue: dict[str, Any] | None = None,
    maintenance: dict[str, Any] | None = None,
    logs: list[str] | None = None,
) -> AsyncIterator[list[SupervisorFleet]]:
    """``supervisors`` supervisors on one database and queue, ready and idle for a second;
    stopped on exit (their logs appended to ``logs``)."""
    started: list[SupervisorFleet] = []
    try:
        for _ in range(supervisors):
            started.append(
                SupervisorFleet(dsn, SCHEMA, {"processes": processes, **(queue or {})}, maintenance)
            )
        await asyncio.gather(*(f.ready() for f in started))
        await asyncio.sleep(1.0)  # idle: as the harness's bursts start
        yield started
    finally:
        for f in started:
            await f.stop()
            if logs is not None:
                logs.append(f.log.read_text())
            shutil.rmtree(f.dir, ignore_errors=True)


async def measure(system: Pgdurable, kind: str, s: Settings) -> float:
    """One burst: no-op jobs/s (``noop``) or 5-step instances/s (``fsm``)."""
    if kind == "noop":
        out = await burst(system, "noop", s.jobs, lambda: system.insert_noop_many(s.jobs, 1000), s)
    else:
        out = await burst(system, "fsm", s.fsm, lambda: system.insert_fsm(s.fsm, False), s)
    if out.note:
        log(f"  {out.note}")
    return float(out.value or 0.0)


async def interleave(
    variants: list[Variant], kinds: list[str], s: Settings, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Every variant once per round, in order, each on a fleet of its own."""
    figures: dict[str, dict[str, list[float]]] = {v.label: {k: [] for k in kinds} for v in variants}
    for r in range(rounds):
        for v in variants:
            async with fleets(
                v.system.dsn, s, supervisors=v.supervisors, processes=v.processes, queue=v.queue
            ):
                for kind in kinds:
                    figures[v.label][kind].append(await measure(v.system, kind, s))
            got = ", ".join(f"{k} {figures[v.label][k][-1]:,.0f}/s" for k in kinds)
            log(f"  round {r + 1}/{rounds}, {v.label}: {got}")
    return figures


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "median": round(statistics.median(values), 1) if values else None,
        "min": round(min(values), 1) if values else None,
        "max": round(max(values), 1) if values else None,
        "rounds": [round(v, 1) for v in values],
    }


def pct(value: float | None, ref: float | None) -> str:
    return f"{100 * value / ref:.0f} %" if value is not None and ref else "—"


def span(d: dict[str, Any], times: float = 1.0) -> str:
    if d["min"] is None:
        return "—"
    return f"{fmt(d['min'] * times)}–{fmt(d['max'] * times)}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


# -- parts 1-4: bursts --------------------------------------------------------------------
async def part_rows(scratch: Scratch, s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    variants, seeded = [], {}
    for n in args.rows:
        system = await pgdurable_db(scratch, f"rows{n}")
        log(f"rows: seeding {n:,} finished rows")
        t0 = time.perf_counter()
        await system.seed(n, 0)
        seeded[n] = round(time.perf_counter() - t0, 1)
        variants.append(Variant(f"{n:,}", system))
    try:
        figures = await interleave(variants, ["noop"], s, args.rounds)
    finally:
        for v in variants:
            await v.system.close()
    result = {
        v.label: {**spread(figures[v.label]["noop"]), "finished_rows": n, "seed_seconds": seeded[n]}
        for n, v in zip(args.rows, variants, strict=True)
    }
    ref = result[variants[0].label]["median"]
    print(f"### rows: no-op burst of {s.jobs:,} jobs on a table of finished rows\n")
    print_table(
        ["finished rows", "jobs/s (median)", "min–max", "rounds", f"% of {variants[0].label} rows"],
        [
            [label, fmt(d["median"]), span(d), ", ".join(fmt(x) for x in d["rounds"]), pct(d["median"], ref)]
            for label, d in result.items()
        ],
    )
    return result


async def part_history(scratch: Scratch, s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    system = await pgdurable_db(scratch, "history")
    variants = [Variant("on", system), Variant("off", system, queue={"history": False})]
    try:
        figures = await interleave(variants, ["noop", "fsm"], s, args.rounds)
    finally:
        await system.close()
    result = {label: {k: spread(v) for k, v in kinds.items()} for label, kinds in figures.items()}
    on = result["on"]
    print(
        f"### history: no-op burst of {s.jobs:,} jobs and {s.fsm:,} 5-step instances, "
        "step history on (the default) and off\n"
    )
    print_table(
        [
            "history",
            "no-op jobs/s",
            "min–max",
            "% of on",
            "5-step steps/s",
            "min–max",
            "instances/s",
            "% of on",
        ],
        [
            [
                label,
                fmt(d["noop"]["median"]),
                span(d["noop"]),
                pct(d["noop"]["median"], on["noop"]["median"]),
                fmt(d["fsm"]["median"] * 5 if d["fsm"]["median"] is not None else None),
                span(d["fsm"], 5),
                fmt(d["fsm"]["median"]),
                pct(d["fsm"]["median"], on["fsm"]["median"]),
            ]
            for label, d in result.items()
        ],
    )
    return result


async def part_processes(scratch: Scratch, s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    system = await pgdurable_db(scratch, "processes")
    variants = [Variant(str(n), system, processes=n) for n in (1, 2, 4)]
    try:
        figures = await interleave(variants, ["noop"], s, args.rounds)
    finally:
        await system.close()
    result = {label: spread(kinds["noop"]) for label, kinds in figures.items()}
    print(f"### processes: no-op burst of {s.jobs:,} jobs, worker processes of one supervisor\n")
    print_table(
        ["processes", "jobs/s (median)", "min–max", "per process", "% of 1"],
        [
            [
                label,
                fmt(d["median"]),
                span(d),
                fmt(d["median"] / int(label)),
                pct(d["median"], result["1"]["median"]),
            ]
            for label, d in result.items()
        ],
    )
    return result


async def part_queues(scratch: Scratch, s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Fairness between queues, with claims of up to 400 rows (the default) against 200 and
    50 (the defaults before): queues ``bench`` and ``other``, one worker process each under one
    supervisor. (1) Both get a burst of the same size at once: each queue's jobs/s. (2)
    ``bench`` gets a burst while ``other`` gets one job every 50 ms: their wake latency,
    insert call to the job's first line, against the same trickle into an idle fleet."""
    os.environ[STAMP_ENV] = os.path.join(
        tempfile.mkdtemp(prefix="bench-stamp-"), "stamps"
    )  # the workers inherit it
    receiver = StampReceiver(os.environ[STAMP_ENV])
    system = await pgdurable_db(scratch, "queues")
    conn = await system._conn()
    result: dict[str, Any] = {}

    async def done_by_queue(mark: int) -> dict[str, int]:
        cur = await conn.execute(
            "SELECT queue, count(*) FROM pgdurable.instances WHERE id > %s AND status = 'done'"
            " AND fsm = 'bench_noop' GROUP BY queue",
            [mark],
        )
        return {q: int(n) for q, n in await cur.fetchall()}

    async def both() -> dict[str, float]:
        mark = await system.mark()
        t0 = time.perf_counter()
        finished: dict[str, float] = {}

        async def insert(queue: str) -> None:
            for i in range(0, s.jobs, 1000):
                k = min(1000, s.jobs - i)
                await system.client.insert_many([Insert(noop, {}, queue=queue) for _ in range(k)])

        await asyncio.gather(insert("bench"), insert("other"))
        while len(finished) < 2 and time.perf_counter() - t0 < s.deadline:
            counts = await done_by_queue(mark)
            for q in ("bench", "other"):
                if q not in finished and counts.get(q, 0) >= s.jobs:
                    finished[q] = time.perf_counter() - t0
            await asyncio.sleep(0.02)
        return {q: s.jobs / finished[q] if q in finished else 0.0 for q in ("bench", "other")}

    async def trickle(during_burst: bool) -> list[float]:
        samples: list[float] = []
        sent: dict[int, float] = {}
        load = (
            asyncio.ensure_future(system.insert_noop_many(s.jobs, 1000))
            if during_burst
            else asyncio.ensure_future(asyncio.sleep(0))
        )
        for seq in range(40):
            await asyncio.sleep(0.05)
            receiver.drain()
            sent[seq] = time.time()
            await system.client.insert(stamped, {"seq": seq}, queue="other")
        await load
        deadline = time.monotonic() + 10
        while len(receiver.started) < len(sent) and time.monotonic() < deadline:
            receiver.drain()
            await asyncio.sleep(0.05)
        samples = [(receiver.started[k] - sent[k]) * 1000 for k in sent if k in receiver.started]
        receiver.started.clear()
        return samples

    variants = {
        "batch 400 (default)": {},
        "batch 800": {"batch": 800},
        "batch 200": {"batch": 200},
        "batch 50": {"batch": 50},
    }
    rows: dict[str, dict[str, list[float]]] = {
        v: {"bench": [], "other": [], "idle_p50": [], "idle_p99": [], "load_p50": [], "load_p99": []}
        for v in variants
    }
    try:
        for r in range(args.rounds):
            for label, keys in variants.items():
                fleet = SupervisorFleet(
                    system.dsn, SCHEMA, {"processes": 1, **keys}, None, {"other": {"processes": 1, **keys}}
                )
                try:
                    await fleet.ready()
                    await asyncio.sleep(1.0)
                    rates = await both()
                    idle = await trickle(during_burst=False)
                    load = await trickle(during_burst=True)
                finally:
                    await fleet.stop()
                    shutil.rmtree(fleet.dir, ignore_errors=True)
                row = rows[label]
                row["bench"].append(rates["bench"])
                row["other"].append(rates["other"])
                for name, ms in (("idle", idle), ("load", load)):
                    if ms:
                        row[f"{name}_p50"].append(percentile(ms, 0.5))
                        row[f"{name}_p99"].append(percentile(ms, 0.99))
                log(f"  round {r + 1}/{args.rounds}, {label}: {rates}, idle {len(idle)}, load {len(load)}")
    finally:
        receiver.close()
        await system.close()
    result = {label: {k: spread(v) for k, v in row.items()} for label, row in rows.items()}
    print(
        f"### queues: two queues, one worker process each; bursts of {s.jobs:,} jobs on both at once, "
        "then one job every 50 ms on `other` (40 samples) with `bench` idle and during a burst on `bench`\n"
    )
    print_table(
        ["claims of up to", "bench jobs/s", "other jobs/s", "other ÷ bench", "wake p50 / p99 idle (ms)",
         "wake p50 / p99 during the burst (ms)"],
        [
            [
                label,
                fmt(d["bench"]["median"]),
                fmt(d["other"]["median"]),
                f"{d['other']['median'] / d['bench']['median']:.2f}" if d["bench"]["median"] else "—",
                f"{fmt(d['idle_p50']['median'])} / {fmt(d['idle_p99']['median'])}",
                f"{fmt(d['load_p50']['median'])} / {fmt(d['load_p99']['median'])}",
            ]
            for label, d in result.items()
        ],
    )  # fmt: skip
    return result


async def part_supervisors(scratch: Scratch, s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    system = await pgdurable_db(scratch, "supervisors")
    variants = [Variant(f"{n} × 1", system, supervisors=n, processes=1) for n in (1, 2, 3)]
    variants.append(Variant("1 × 2", system, supervisors=1, processes=2))
    try:
        figures = await interleave(variants, ["noop"], s, args.rounds)
    finally:
        await system.close()
    result = {label: spread(kinds["noop"]) for label, kinds in figures.items()}
    ref = result["1 × 1"]["median"]
    print(
        f"### supervisors: no-op burst of {s.jobs:,} jobs, supervisors × worker processes each, "
        "one database and queue\n"
    )
    print_table(
        ["supervisors × processes", "jobs/s (median)", "min–max", "% of 1 × 1", "% of 1 × 2"],
        [
            [
                label,
                fmt(d["median"]),
                span(d),
                pct(d["median"], ref),
                pct(d["median"], result["1 × 2"]["median"]),
            ]
            for label, d in result.items()
        ],
    )
    return result


# -- part 5: a snapshot held under sustained load ------------------------------------------
class Producer:
    """``<script> produce`` (harness.produce) in a process of its own."""

    def __init__(self, python: str, script: Path, dsn: str, rate: float, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [python, str(script), "produce", "--dsn", dsn, "--rate", str(rate)],
            stdout=subprocess.PIPE,
            env={**os.environ, **env},
            cwd=BENCH_DIR,
            start_new_session=True,
        )
        self.last = ""

    async def ready(self, timeout: float = 60.0) -> Producer:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
            if not line:
                raise RuntimeError(f"producer exited {self.proc.wait()} before READY")
            if line.strip() == b"READY":
                break
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            if line.strip():
                self.last = line.decode()

    async def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, 30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return {"failed": "killed after 30 s"}
        await asyncio.sleep(0.2)  # the reader thread takes the last line
        try:
            return dict(json.loads(self.last))
        except ValueError:
            return {"failed": f"exited {self.proc.returncode}"}


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU seconds of a process so far (``/proc/<pid>/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by a changing set of processes between two readings, in % of one core.
    A process that ends between two readings loses its last interval (short-lived backends,
    autovacuum workers): a floor, not the exact figure. The first reading only primes it."""

    def __init__(self) -> None:
        self.last: dict[int, float] = {}
        self.at = time.monotonic()

    def read(self, pids: list[int]) -> float:
        now, used = time.monotonic(), 0.0
        seen = {}
        for pid in pids:
            value = cpu_seconds(pid)
            if value is not None:
                seen[pid] = value
                # A process first seen now started in this interval: all its CPU is new.
                used += value - self.last.get(pid, 0.0)
        elapsed, self.last, self.at = now - self.at, seen, now
        return round(100 * used / elapsed, 1) if elapsed > 0 else 0.0


@dataclass
class Side:
    """One system of the held part and how it is read."""

    name: str
    dsn: str
    job_table: str  # qualified
    other_table: str  # the table every finished job also writes
    finished: sql.Composable  # (since, until) -> count, mean insert → done seconds
    pending: sql.Composable
    conn: psycopg.AsyncConnection[Any] | None = None
    holder: psycopg.AsyncConnection[Any] | None = None
    since: Any = None  # the server time the next interval starts at
    samples: list[dict[str, Any]] = field(default_factory=list)
    fleet_pids: Callable[[], list[int]] = list
    fleet_cpu: CpuMeter = field(default_factory=CpuMeter)
    db_cpu: CpuMeter = field(default_factory=CpuMeter)

    async def connect(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        row = await (await self.conn.execute("SELECT now() - interval '2 seconds'")).fetchone()
        assert row is not None
        self.since = row[0]
        self.fleet_cpu.read(self.fleet_pids())
        self.db_cpu.read(await self.backends())

    async def backends(self) -> list[int]:
        """The server processes of this database (PostgreSQL runs on this host)."""
        assert self.conn is not None
        cur = await self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return [int(pid) for (pid,) in await cur.fetchall()]

    async def sample(self, t: float, phase: str) -> dict[str, Any]:
        assert self.conn is not None
        # Read 2 s late: a job counts by its finish time (the now() of the transaction that
        # finished it), and a transaction that began before the bound may commit after it.
        row = await (await self.conn.execute("SELECT now() - interval '2 seconds'")).fetchone()
        assert row is not None
        until = row[0]
        cur = await self.conn.execute(self.finished, [self.since, until])
        count, wait = await cur.fetchone() or (0, None)
        pending = await (await self.conn.execute(self.pending)).fetchone()
        stats = await self.conn.execute(
            """SELECT c.name, s.n_live_tup, s.n_dead_tup, pg_total_relation_size(s.relid),
                      s.autovacuum_count
               FROM unnest(%s::text[]) AS c (name)
               JOIN pg_stat_user_tables AS s ON s.relid = c.name::regclass""",
            [[self.job_table, self.other_table]],
        )
        tables = {name: (live, dead, size, av) for name, live, dead, size, av in await stats.fetchall()}
        job, other = tables[self.job_table], tables[self.other_table]
        seconds = (until - self.since).total_seconds()
        self.since = until
        fleet_cpu, db_cpu = self.fleet_cpu.read(self.fleet_pids()), self.db_cpu.read(await self.backends())
        sample = {
            "t": round(t),
            "phase": phase,
            "finished_per_s": round(count / seconds, 1) if seconds > 0 else None,
            "wait_ms": round(float(wait) * 1000, 1) if wait is not None else None,
            "pending": int(pending[0]) if pending else None,
            "job_live": job[0],
            "job_dead": job[1],
            "other_live": other[0],
            "other_dead": other[1],
            "job_bytes": job[2],
            "other_bytes": other[2],
            "autovacuums": job[3] + other[3],
            "fleet_cpu": fleet_cpu,
            "db_cpu": db_cpu,
        }
        self.samples.append(sample)
        return sample

    async def hold(self) -> None:
        self.holder = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        await self.holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        table = sql.Identifier(*self.job_table.split("."))
        await self.holder.execute(sql.SQL("SELECT 1 FROM {} LIMIT 1").format(table))

    async def holder_xmin(self) -> bool:
        """Whether the holder's snapshot is in place (``backend_xmin`` set)."""
        assert self.conn is not None and self.holder is not None
        cur = await self.conn.execute(
            "SELECT backend_xmin IS NOT NULL FROM pg_stat_activity WHERE pid = %s",
            [self.holder.info.backend_pid],
        )
        row = await cur.fetchone()
        return bool(row and row[0])

    async def release(self) -> None:
        if self.holder is not None:
            with contextlib.suppress(psycopg.Error):
                await self.holder.execute("ROLLBACK")
            await self.holder.close()
            self.holder = None

    async def close(self) -> None:
        await self.release()
        if self.conn is not None:
            await self.conn.close()


def pgdurable_side(dsn: str) -> Side:
    schema = sql.Identifier(SCHEMA)
    return Side(
        "pgdurable",
        dsn,
        f"{SCHEMA}.instances",
        f"{SCHEMA}.history",
        sql.SQL(
            """SELECT count(*), avg(EXTRACT(EPOCH FROM updated_at - inserted_at))
               FROM {}.instances WHERE status = 'done' AND updated_at > %s AND updated_at <= %s"""
        ).format(schema),
        sql.SQL("SELECT count(*) FROM {}.instances WHERE status = 'runnable'").format(schema),
    )


def pgqueuer_side(dsn: str) -> Side:
    return Side(
        "pgqueuer",
        dsn,
        "public.pgqueuer",
        "public.pgqueuer_log",
        # A job's log rows: 'queued' when inserted, 'successful' when done; its first row is
        # the 'queued' one. min() over (job_id, created) is one probe of pgqueuer's own index
        # (a filter on status was planned through the status index: half the log per row).
        sql.SQL(
            """SELECT count(*), avg(EXTRACT(EPOCH FROM s.created - q.created))
               FROM pgqueuer_log AS s
               CROSS JOIN LATERAL (
                   SELECT min(l.created) AS created FROM pgqueuer_log AS l
                   WHERE l.job_id = s.job_id) AS q
               WHERE s.created > %s AND s.created <= %s AND s.status = 'successful'"""
        ),
        sql.SQL("SELECT count(*) FROM pgqueuer WHERE status = 'queued'"),
    )


def mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def summarize_side(side: Side, args: argparse.Namespace) -> dict[str, Any]:
    samples = side.samples
    ends = {
        "warm-up": args.warmup,
        "held": args.warmup + args.hold,
        "released": args.warmup + args.hold + args.cooldown,
    }

    def last_minute(phase: str) -> list[dict[str, Any]]:
        length = {"warm-up": args.warmup, "held": args.hold, "released": args.cooldown}[phase]
        start = ends[phase] - min(60, length)
        # The first interval is the ramp-up (fleets and producers just started): not "before".
        start = max(start, samples[0]["t"]) if len(samples) > 1 else start
        return [x for x in samples if x["phase"] == phase and x["t"] > start]

    def at_end(phase: str) -> dict[str, Any] | None:
        inside = [x for x in samples if x["phase"] == phase]
        return inside[-1] if inside else None

    out: dict[str, Any] = {}
    for phase in ends:
        window = last_minute(phase)
        out[f"finished_per_s_{phase}"] = mean([x["finished_per_s"] for x in window])
        out[f"wait_ms_{phase}"] = mean([x["wait_ms"] for x in window])
        out[f"fleet_cpu_{phase}"] = mean([x["fleet_cpu"] for x in window])
        out[f"db_cpu_{phase}"] = mean([x["db_cpu"] for x in window])
        end = at_end(phase)
        out[f"pending_end_{phase}"] = end["pending"] if end else None
        out[f"bytes_end_{phase}"] = end["job_bytes"] + end["other_bytes"] if end else None
    out["job_dead_peak"] = max((x["job_dead"] for x in samples), default=None)
    out["other_dead_peak"] = max((x["other_dead"] for x in samples), default=None)
    out["pending_peak"] = max((x["pending"] or 0 for x in samples), default=None)
    return out


async def part_held(scratch: Scratch, s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    peers_python = args.peers_python
    if not Path(peers_python).exists():
        raise RuntimeError(
            f"no peers' interpreter at {peers_python}: run bench/run.py once, or --peers-python"
        )
    pgq_script = BENCH_DIR / "peers" / "pgqueuer_bench.py"
    # The peers' scripts import harness from bench/ (an outer PYTHONPATH stays behind it).
    peer_env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")]))}
    pgd = pgdurable_side(scratch.create("held_pgdurable"))
    pgq = pgqueuer_side(scratch.create("held_pgqueuer"))
    await Pgdurable(pgd.dsn).setup()
    setup = await asyncio.to_thread(
        subprocess.run,
        [peers_python, str(pgq_script), "setup", "--dsn", pgq.dsn],
        env={**os.environ, **peer_env},
        cwd=BENCH_DIR,
        capture_output=True,
        text=True,
    )
    if setup.returncode != 0:
        raise RuntimeError(f"pgqueuer setup failed: {setup.stderr[-2000:]}")

    logs: list[str] = []
    producers: list[Producer] = []
    results: dict[str, Any] = {
        "rate": args.rate,
        "warmup": args.warmup,
        "hold": args.hold,
        "cooldown": args.cooldown,
        "sample": args.sample,
        "snapshot_warning": args.snapshot_warning,
    }
    pgq_fleet: ProcessFleet | None = None
    try:
        maintenance = {"snapshot_warning": args.snapshot_warning}
        async with fleets(pgd.dsn, s, maintenance=maintenance, logs=logs) as pgd_fleets:
            # pgqueuer at the settings bench/fair.py's sweep found best, when recorded.
            knobs = recorded_best().get("pgqueuer", {})
            pgq_fleet = await ProcessFleet(
                str(pgq_script), pgq.dsn, replace(s, knobs=knobs), env=peer_env, python=peers_python
            ).ready()
            for side, fleet in ((pgd, pgd_fleets[0]), (pgq, pgq_fleet)):
                side.fleet_pids = lambda fleet=fleet: [pid for pids in fleet.pids().values() for pid in pids]
            producers = [
                Producer(sys.executable, BENCH_DIR / "workloads_pgdurable.py", pgd.dsn, args.rate, {}),
                Producer(peers_python, pgq_script, pgq.dsn, args.rate, peer_env),
            ]
            await asyncio.gather(*(p.ready() for p in producers))
            await asyncio.gather(pgd.connect(), pgq.connect())
            t0 = time.monotonic()
            total = args.warmup + args.hold + args.cooldown
            log(
                f"held: {args.rate:g} jobs/s each; warm-up {args.warmup} s, hold {args.hold} s, "
                f"cool-down {args.cooldown} s"
            )
            k = 0
            while k * args.sample < total:
                k += 1
                t = k * args.sample
                await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))
                phase = (
                    "warm-up" if t <= args.warmup else "held" if t <= args.warmup + args.hold else "released"
                )
                a, b = await asyncio.gather(pgd.sample(t, phase), pgq.sample(t, phase))
                log(
                    f"  t={t:4.0f} s {phase:8s} pgdurable {a['finished_per_s']}/s pending {a['pending']} "
                    f"dead {a['job_dead']} | pgqueuer {b['finished_per_s']}/s pending {b['pending']} "
                    f"dead {b['job_dead']}"
                )
                if t == args.warmup:
                    await asyncio.gather(pgd.hold(), pgq.hold())
                    results["holders_have_snapshot"] = {
                        side.name: await side.holder_xmin() for side in (pgd, pgq)
                    }
                    log(f"  snapshots held: {results['holders_have_snapshot']}")
                elif t == args.warmup + args.hold:
                    await asyncio.gather(pgd.release(), pgq.release())
                    log("  snapshots released")
            produced = await asyncio.gather(*(p.stop() for p in producers))
            producers = []
    finally:
        for p in producers:
            await p.stop()
        if pgq_fleet is not None:
            await pgq_fleet.stop()
        await pgd.close()
        await pgq.close()

    warnings = [line for text in logs for line in text.splitlines() if "holds back vacuum" in line]
    for side, prod in zip((pgd, pgq), produced, strict=True):
        results[side.name] = {
            "samples": side.samples,
            "summary": summarize_side(side, args),
            "producer": prod,
        }
    results["pgdurable"]["vacuum_held_warnings"] = warnings
    print_held(results, args)
    return results


def mib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.1f}"


def print_held(results: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"### held: a REPEATABLE READ snapshot held {args.hold} s in each database under "
        f"{args.rate:g} jobs/s each, pgdurable and pgqueuer side by side\n"
    )
    other = {"pgdurable": "history", "pgqueuer": "pgqueuer_log"}
    job = {"pgdurable": "instances", "pgqueuer": "pgqueuer"}
    for name in ("pgdurable", "pgqueuer"):
        print(f"#### {name} over time (every {args.sample} s)\n")
        print_table(
            [
                "t (s)",
                "phase",
                "finished/s",
                "insert → done (ms)",
                "pending",
                f"{job[name]} dead",
                f"{job[name]} live",
                f"{other[name]} dead",
                f"{job[name]} MiB",
                f"{other[name]} MiB",
                "CPU % fleet",
                "CPU % db",
            ],
            [
                [
                    str(x["t"]),
                    x["phase"],
                    fmt(x["finished_per_s"]),
                    fmt(x["wait_ms"]),
                    f"{x['pending']:,}",
                    f"{x['job_dead']:,}",
                    f"{x['job_live']:,}",
                    f"{x['other_dead']:,}",
                    mib(x["job_bytes"]),
                    mib(x["other_bytes"]),
                    fmt(x["fleet_cpu"]),
                    fmt(x["db_cpu"]),
                ]
                for x in results[name]["samples"]
            ],
        )
    names = ("pgdurable", "pgqueuer")
    sums = {n: results[n]["summary"] for n in names}

    def rel(n: str, key: str, phase: str) -> str:
        value, before = sums[n][f"{key}_{phase}"], sums[n][f"{key}_warm-up"]
        return fmt(value) + (f" ({pct(value, before)})" if phase != "warm-up" else "")

    rows = []
    for key, label in (
        ("finished_per_s", "finished/s"),
        ("wait_ms", "insert → done, mean (ms)"),
        ("fleet_cpu", "CPU of the fleet (% of a core)"),
        ("db_cpu", "CPU of the database's backends (% of a core)"),
    ):
        for phase, when in (
            ("warm-up", "last minute of warm-up"),
            ("held", "last minute of the hold"),
            ("released", "last minute of cool-down"),
        ):
            rows.append([f"{label}, {when}"] + [rel(n, key, phase) for n in names])
    rows.append(["pending at the end of the hold"] + [f"{sums[n]['pending_end_held']:,}" for n in names])
    rows.append(["pending at peak"] + [f"{sums[n]['pending_peak']:,}" for n in names])
    rows.append(["dead tuples at peak, job table"] + [f"{sums[n]['job_dead_peak']:,}" for n in names])
    rows.append(
        ["dead tuples at peak, history / pgqueuer_log"] + [f"{sums[n]['other_dead_peak']:,}" for n in names]
    )
    rows.append(
        ["MiB of both tables: end of warm-up → end of hold → end"]
        + [" → ".join(mib(sums[n][f"bytes_end_{p}"]) for p in ("warm-up", "held", "released")) for n in names]
    )
    rows.append(
        ["producer: jobs inserted (rate achieved, most jobs due at one insert)"]
        + [
            f"{p.get('inserted', 0):,} ({p.get('rate')}/s, {p.get('behind_max')})"
            if "failed" not in p
            else p["failed"]
            for p in (results[n]["producer"] for n in names)
        ]
    )
    warned = results["pgdurable"]["vacuum_held_warnings"]
    rows.append(["`vacuum_held` warning logged"] + [("yes" if warned else "no"), "(no such warning)"])
    print("#### summary (% of the last minute of warm-up)\n")
    print_table(["", *names], rows)
    for line in warned:
        print(f"pgdurable logged: `{line.strip()}`")
    if warned:
        print()


# -- the driver ---------------------------------------------------------------------------
PART_FUNCS: dict[str, Callable[[Scratch, Settings, argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "rows": part_rows,
    "history": part_history,
    "processes": part_processes,
    "supervisors": part_supervisors,
    "queues": part_queues,
    "held": part_held,
}


async def run(args: argparse.Namespace, s: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for part in args.only:
        scratch = Scratch(args.dsn)
        log(f"{part} ...")
        t0 = time.monotonic()
        try:
            results[part] = await PART_FUNCS[part](scratch, s, args)
        except Exception as exc:  # noqa: BLE001 - a failed part is reported, the rest runs
            log(f"{part} failed: {type(exc).__name__}: {exc}")
            results[part] = {"failed": f"{type(exc).__name__}: {exc}"}
            print(f"### {part}: failed: {type(exc).__name__}: {exc}\n")
        finally:
            await asyncio.to_thread(scratch.drop)
        log(f"{part} done in {time.monotonic() - t0:.0f} s")
        sys.stdout.flush()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", required=True, help="a maintenance database on the server to use")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter hold")
    parser.add_argument("--json", help="also write every result here")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {','.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant (default 3)")
    parser.add_argument("--jobs", type=int, help="no-op jobs per burst (10,000; 2,000 with --quick)")
    parser.add_argument("--fsm", type=int, help="5-step instances per burst (2,000; 300 with --quick)")
    parser.add_argument("--rows", help="rows: comma-separated finished rows per size (0,1000000,10000000)")
    parser.add_argument("--rate", type=float, default=300.0, help="held: jobs/s per producer (300)")
    parser.add_argument("--warmup", type=int, help="held: seconds before the hold (120; 30 with --quick)")
    parser.add_argument(
        "--hold", type=int, help="held: seconds the snapshots are held (600; 60 with --quick)"
    )
    parser.add_argument("--cooldown", type=int, help="held: seconds after the hold (180; 60 with --quick)")
    parser.add_argument("--sample", type=int, default=10, help="held: seconds between samples (10)")
    parser.add_argument(
        "--snapshot-warning",
        type=float,
        default=30.0,
        help="held: pgdurable's maintenance.snapshot_warning (30)",
    )
    parser.add_argument("--peers-python", default=str(VENV / "bin" / "python"), help="held: runs pgqueuer")
    args = parser.parse_args()
    args.only = [p for p in args.only.split(",") if p]
    unknown = set(args.only) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    base = Settings.quick() if args.quick else Settings()
    s = Settings(jobs=args.jobs or base.jobs, fsm=args.fsm or base.fsm, deadline=base.deadline)
    default_rows = "0,100000,1000000" if args.quick else "0,1000000,10000000"
    args.rows = [int(n) for n in (args.rows or default_rows).split(",")]
    args.warmup = args.warmup if args.warmup is not None else 30 if args.quick else 120
    args.hold = args.hold if args.hold is not None else 60 if args.quick else 600
    args.cooldown = args.cooldown if args.cooldown is not None else 60 if args.quick else 180
    if args.warmup <= 0 or args.hold <= 0:
        parser.error("--warmup and --hold must be positive")
    for key in ("warmup", "hold", "cooldown"):
        if getattr(args, key) % args.sample:
            parser.error(f"--{key} must be a multiple of --sample ({args.sample} s)")

    facts = server_facts(args.dsn)
    rev = revision()
    t0 = time.monotonic()
    results = asyncio.run(run(args, s))
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} cores, {mem_gib:.0f} GiB; PostgreSQL "
        f"{facts['server_version']} (synchronous_commit={facts['synchronous_commit']}, "
        f"fsync={facts['fsync']}, "
        f"shared_buffers={facts['shared_buffers']}); Python {platform.python_version()}; pgdurable at {rev}; "
        f"mode {'quick' if args.quick else 'full'}, {args.rounds} rounds, {s.jobs:,} jobs per burst; "
        f"{time.monotonic() - t0:.0f} s in all."
    )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "dsn"}
        Path(args.json).write_text(
            json.dumps(
                {
                    "facts": facts,
                    "revision": rev,
                    "args": settings,
                    "settings": asdict(s),
                    "results": results,
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
