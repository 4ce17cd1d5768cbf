"""Chaos run: supervisors serve keyed, gated, rate-limited and spawning machines while their
workers, whole supervisors, their database backends and the database server are killed;
afterwards every invariant is checked against what the steps themselves recorded.

    python bench/chaos.py                 # long form: 3 supervisors, 1500 instances, 180 s of faults
    python bench/chaos.py --quick         # the short form tests/test_chaos.py runs
    python bench/chaos.py --dsn DSN       # an existing server (needs CREATEDB); no server restart

The run starts its own throwaway PostgreSQL (tests/dbserver.py) unless given ``--dsn``,
creates a database, migrates a schema and starts ``--supervisors`` supervisors, each on a
config file of its own (so each is a node of its own, see pgdurable/runtime/identity.py),
serving the queue ``chaos`` with the machines of bench/chaos_machines.py: five steps, some
under a concurrency key (three keys, one at a time each), some through a gate (two keys,
two at a time), some through a rate limit, some spawning two children. A producer inserts
the instances over the fault phase. A fault loop meanwhile injects, at
random intervals drawn from the seed: ``kill -9`` of a worker process; ``kill -9`` of a
supervisor's whole process group, restarted at once on the same config (its start
reclaims its dead incarnation's rows); ``pg_terminate_backend`` of every pgdurable backend
of the database; and, when the run owns its server, one restart of the server
(``pg_ctl stop -m immediate``, a pause, ``pg_ctl start`` on the same data directory). Then
the faults stop, the run waits (bounded) until no instance is live, stops the supervisors
and checks:

- every instance (and every child) is ``done``, and nothing is left executing;
- ``n`` equals the number of steps, and the final ``trail`` is a chain of recorded runs,
  one per step, each of which read the state its predecessor committed;
- no step committed twice: of the runs of one step of one instance, at most one is named
  in any committed state (re-runs whose outcome did not commit are counted, not failed);
- one at a time held for every ``acct:*`` key: no two recorded intervals overlap (a run
  killed mid-step has no end row: it ends when its process was killed);
- the gate held: at most ``limit`` intervals of one ``gate:*`` key at any instant;
- the rate limit held: admissions (the row's ``updated_at`` at the rated step's start) in
  any window of one period are at most ``allowed + burst``;
- every gate counter is full again.

The figures — faults by kind, re-runs, time to settle, crashes, server-log errors (among
them unique violations on ``instances_concurrency_active``) and the supervisors' warnings —
are printed as a table; a broken invariant is listed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import dataclasses
import logging
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from pgdurable import Insert
from pgdurable.client import Client
from pgdurable.contract.errors import DuplicateInstance
from pgdurable.contract.spec import STATUSES
from pgdurable.db import migrations

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

SCHEMA = "chaos"
QUEUE = "chaos"
STEPS = {"chaos": ("s1", "s2", "s3", "s4", "s5"), "chaos_child": ("c1", "c2")}
CHILDREN = 2
KINDS = {"plain": 0.40, "keyed": 0.20, "gated": 0.15, "rated": 0.15, "parent": 0.10}
KEYS = 3  # acct:0 … acct:2, one at a time each
GATES, GATE_LIMIT = 2, 2  # gate:0, gate:1, two at a time each
RATE_ALLOWED, RATE_PERIOD, RATE_BURST = 2, 1.0, 3
BATCH_PERIOD = 0.5  # seconds between the producer's inserts
RATED_EVERY = 8  # rated instances arrive in clumps, one batch in this many, so the bucket empties
LIVE = ("runnable", "executing", "awaiting_signal", "awaiting_children", "held")
FAULTS = {"worker_kill": 0.5, "backend_terminate": 0.25, "supervisor_kill": 0.25}

CONFIG = """
[database]
dsn = "{dsn}"
schema = "{schema}"

[runtime]
modules = ["chaos_machines"]
lease = {lease}
heartbeat = {heartbeat}
poll_ceiling = 5
drain_timeout = 10
max_crashes = {max_crashes}

[maintenance]
interval = 1
gc_interval = 3600   # no gate-counter repair during the run: a leaked slot stays visible

[queues.{queue}]
processes = {processes}
concurrency = {concurrency}
prefetch = {prefetch}
batch = 20

[concurrency_limits]
gate = {{ limit = {gate_limit} }}

[rate_limits]
chaosrate = {{ allowed = {allowed}, period = "{period}s", burst = {burst} }}
"""


@dataclasses.dataclass
class Settings:
    seconds: float = 180.0  # fault phase
    instances: int = 1500  # top-level instances (parents add two children each)
    supervisors: int = 3
    processes: int = 2  # worker processes per supervisor
    concurrency: int = 4
    prefetch: int = 4
    seed: int = dataclasses.field(default_factory=lambda: random.randrange(1 << 32))
    gap: tuple[float, float] = (1.5, 5.0)  # seconds between two faults, drawn uniformly
    outage: float = 2.0  # seconds the server stays down in its restart
    settle_timeout: float = 240.0
    lease: float = 15.0
    heartbeat: float = 2.0
    max_crashes: int = 10  # consecutive crashes of one step before its instance fails
    restart_server: bool = True  # only ever done on a server the run started itself

    @classmethod
    def quick(cls, **overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "seconds": 30.0,
            "instances": 240,
            "supervisors": 2,
            "gap": (1.0, 3.0),
            "settle_timeout": 45.0,
        }
        return cls(**{**base, **overrides})


@dataclasses.dataclass
class Report:
    settings: Settings
    figures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    workdir: Path | None = None

    def add(self, name: str, value: object) -> None:
        self.figures.append((name, str(value)))

    def fail(self, what: str) -> None:
        self.failures.append(what)

    def table(self) -> str:
        width = max(len(n) for n, _ in self.figures)
        lines = [f"| {'figure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {n:<{width}} | {v} |" for n, v in self.figures]
        return "\n".join(lines)


# -- the database server -----------------------------------------------------------------
class Server:
    """What the run knows of its server: the data directory, the log, and how to restart it
    in place with the installation's own ``pg_ctl``, as the user that owns the data."""

    def __init__(self, dsn: str, owned: bool):
        self.dsn = dsn
        self.owned = owned
        self.restarted = False
        self.data: Path | None = None
        self.log: Path | None = None
        if not owned:  # a shared server's log holds other work's errors: not read
            return
        with psycopg.connect(dsn, autocommit=True) as conn:
            self.data = Path(conn.execute("SHOW data_directory").fetchone()[0])
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        with contextlib.suppress(OSError):
            target = Path(os.readlink(f"/proc/{pid}/fd/2"))  # pg_ctl -l sends stderr there
            if target.is_file():
                self.log = target
        opts = shlex.split((self.data / "postmaster.opts").read_text())
        self.pg_ctl = str(Path(opts[0]).with_name("pg_ctl"))
        args, skip = [], False
        for arg in opts[1:]:  # the postmaster's own options, less its data directory
            if skip or arg == "-D":
                skip = not skip
                continue
            args.append(arg)
        self.options = shlex.join(args)

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log else 0

    def read_log(self, offset: int) -> str | None:
        if self.log is None:
            return None
        with self.log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def _ctl(self, *args: str, timeout: float = 60.0) -> None:
        assert self.data is not None
        st = self.data.stat()
        as_owner: dict[str, Any] = {}
        if os.geteuid() == 0 and st.st_uid != 0:  # PostgreSQL refuses to run as root
            as_owner = {"user": st.st_uid, "group": st.st_gid}
        with tempfile.TemporaryFile() as err:  # not a pipe: the server would inherit it
            done = subprocess.run(
                [self.pg_ctl, "-D", str(self.data), *args],
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd="/",
                timeout=timeout,
                check=False,
                **as_owner,
            )
            if done.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"pg_ctl {' '.join(args)} failed: {err.read().decode(errors='replace')}")

    def restart(self, outage: float, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: as a crash, recovery at start), wait, start it."""
        self.restarted = True
        self._ctl("-m", mode, "-w", "stop")
        time.sleep(outage)
        log = ["-l", str(self.log)] if self.log else []
        self._ctl(*log, "-o", self.options, "-w", "-t", "60", "start", timeout=90)

    def stop_if_restarted(self) -> None:
        # The throwaway server's own cleanup only stops the postmaster it started; after a
        # restart that one is gone, so the new one is stopped here before its data goes.
        if self.restarted:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._ctl("-m", "fast", "-w", "stop")


# -- supervisors ---------------------------------------------------------------------------
class Node:
    """One supervisor on a config file of its own; restarted on the same file."""

    def __init__(self, index: int, workdir: Path, dsn: str, s: Settings):
        self.name = f"node{index}"
        self.config = workdir / f"{self.name}.toml"
        self.config.write_text(
            CONFIG.format(
                dsn=dsn.replace("\\", "\\\\").replace('"', '\\"'),
                schema=SCHEMA,
                queue=QUEUE,
                lease=s.lease,
                heartbeat=s.heartbeat,
                max_crashes=s.max_crashes,
                processes=s.processes,
                concurrency=s.concurrency,
                prefetch=s.prefetch,
                gate_limit=GATE_LIMIT,
                allowed=RATE_ALLOWED,
                period=RATE_PERIOD,
                burst=RATE_BURST,
            )
        )
        self.workdir = workdir
        self.log = workdir / f"{self.name}.log"
        self.sock_path = workdir / f"{self.name}.notify"
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(BENCH), str(ROOT), os.environ.get("PYTHONPATH")])
            ),
            "CHAOS_DSN": dsn,
            "CHAOS_SCHEMA": SCHEMA,
        }
        self.ready = False
        self.starts = 0
        self.exits: list[int] = []  # exit codes of incarnations that ended on their own

    def start(self) -> None:
        if self.sock is not None:
            self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.setblocking(False)
        self.ready = False
        self.starts += 1
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgdurable", "supervise", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, "NOTIFY_SOCKET": str(self.sock_path)},
                cwd=self.workdir,
                start_new_session=True,
            )

    def poll(self) -> bool:
        """Read what the supervisor sent; whether it is ready."""
        while self.sock is not None:
            try:
                if b"READY=1" in self.sock.recv(4096):
                    self.ready = True
            except (BlockingIOError, OSError):
                break
        return self.ready

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[int]:
        if self.proc is None:
            return []
        try:
            return [
                int(p)
                for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            ]
        except OSError:
            return []

    def workers(self) -> list[int]:
        out = []
        for pid in self.children():
            with contextlib.suppress(OSError):
                if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"pgdurable: maintenance"):
                    out.append(pid)
        return out

    def kill_group(self) -> list[int]:
        """``kill -9`` the supervisor and every process of its group; the pids killed."""
        assert self.proc is not None
        pids = [self.proc.pid, *self.children()]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        return pids

    def stop(self, timeout: float = 40.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            return None
        finally:
            self.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# -- the workload --------------------------------------------------------------------------
def plan(s: Settings, rng: random.Random) -> list[list[Insert]]:
    """The producer's batches, one every BATCH_PERIOD over the fault phase."""
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=s.instances)
    batches: list[list[Insert]] = [[] for _ in range(max(1, int(s.seconds / BATCH_PERIOD)))]
    clumps = list(range(0, len(batches), RATED_EVERY))
    rated = other = 0
    for i, kind in enumerate(kinds):
        if kind == "rated":
            batch, rated = batches[clumps[rated % len(clumps)]], rated + 1
        else:
            batch, other = batches[other % len(batches)], other + 1
        key = None
        if kind == "keyed":
            key = f"acct:{rng.randrange(KEYS)}"
        elif kind == "gated":
            key = f"gate:{rng.randrange(GATES)}"
        batch.append(
            Insert(
                "chaos",
                {"kind": kind, "n": 0, "trail": []},
                queue=QUEUE,
                concurrency_key=key,
                correlation_key=f"chaos-{i}",
                correlation_scope=list(STATUSES),  # dedups a retried insert for good
            )
        )
    return batches


class Producer(threading.Thread):
    """Inserts the planned batches on time; a batch that failed is inserted again, less
    the instances that the failed attempt did commit (their correlation keys say which)."""

    def __init__(self, dsn: str, batches: list[list[Insert]]):
        super().__init__(name="chaos-producer", daemon=True)
        self.dsn = dsn
        self.batches = batches
        self.inserted = 0
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.dsn, schema=SCHEMA) as client:
                due = time.monotonic()
                for batch in self.batches:
                    time.sleep(max(0.0, due - time.monotonic()))
                    self._insert(client, batch)
                    due += BATCH_PERIOD
        except BaseException as exc:  # noqa: BLE001 - reported as a failure of the run
            self.error = exc

    def _insert(self, client: Client, batch: list[Insert]) -> None:
        deadline = time.monotonic() + 120
        while batch:
            try:
                client.insert_many(batch)
                self.inserted += len(batch)
                return
            except DuplicateInstance:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    there = {
                        k
                        for (k,) in conn.execute(
                            f'SELECT correlation_key FROM "{SCHEMA}".instances '
                            "WHERE correlation_key = ANY(%s)",
                            [[s.correlation_key for s in batch]],
                        )
                    }
                self.inserted += sum(s.correlation_key in there for s in batch)
                batch = [s for s in batch if s.correlation_key not in there]
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise
                self.retries += 1
                time.sleep(0.2)


class Monitor(threading.Thread):
    """Watches the supervisors' children (when each pid was last seen alive) and samples
    the crash counters of live rows."""

    def __init__(self, dsn: str, nodes: list[Node]):
        super().__init__(name="chaos-monitor", daemon=True)
        self.dsn = dsn
        self.nodes = nodes
        self.stopping = threading.Event()
        self.seen: dict[int, float] = {}  # pid -> last time.time() it was seen
        self.max_crashes = 0
        self.max_crash_sum = 0

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        tick = 0
        while not self.stopping.wait(0.05):
            now = time.time()
            for node in self.nodes:
                for pid in node.children():
                    self.seen[pid] = now
            tick += 1
            if tick % 10:
                continue
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                top, total = conn.execute(
                    f'SELECT coalesce(max(crashes), 0), coalesce(sum(crashes), 0) FROM "{SCHEMA}".instances '
                    "WHERE status <> ALL(%s)",
                    [["done", "failed", "cancelled"]],
                ).fetchone()
                self.max_crashes = max(self.max_crashes, int(top))
                self.max_crash_sum = max(self.max_crash_sum, int(total))
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()


# -- faults --------------------------------------------------------------------------------
class Faults:
    def __init__(self, s: Settings, rng: random.Random, dsn: str, nodes: list[Node], server: Server):
        self.s = s
        self.rng = rng
        self.dsn = dsn
        self.nodes = nodes
        self.server = server
        self.counts: collections.Counter[str] = collections.Counter()
        self.killed: dict[int, float] = {}  # pid -> time.time() of its kill -9
        self.log: list[str] = []
        self.restart_window: tuple[float, float] | None = None  # time.time(), server down

    def note(self, what: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {what}")

    def keep_alive(self) -> None:
        """A supervisor that exited on its own (refused to start while the server was
        down, say) is started again."""
        for node in self.nodes:
            node.poll()
            if node.proc is not None and not node.alive():
                code = node.proc.returncode
                node.exits.append(code)
                self.note(f"{node.name} exited {code} on its own; restarted")
                node.start()

    def run(self, seconds: float) -> None:
        start = time.monotonic()
        end = start + seconds
        restart_at = None
        if self.server.owned and self.s.restart_server:
            restart_at = start + self.rng.uniform(0.35, 0.65) * seconds
        due = start + self.rng.uniform(*self.s.gap)
        while time.monotonic() < end:
            self.keep_alive()
            now = time.monotonic()
            if restart_at is not None and now >= restart_at:
                restart_at = None
                self.restart_server()
            elif now >= due:
                kind = self.rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
                getattr(self, kind)()
                due = time.monotonic() + self.rng.uniform(*self.s.gap)
            time.sleep(0.05)

    def worker_kill(self) -> None:
        victims = [(n, p) for n in self.nodes if n.alive() for p in n.workers()]
        if not victims:
            return
        node, pid = self.rng.choice(victims)
        self.killed[pid] = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.counts["worker_kill"] += 1
        self.note(f"kill -9 worker {pid} of {node.name}")

    def supervisor_kill(self) -> None:
        ready = [n for n in self.nodes if n.alive() and n.poll()]
        if not ready:
            return
        node = self.rng.choice(ready)
        at = time.time()
        for pid in node.kill_group():
            self.killed[pid] = at
        self.counts["supervisor_kill"] += 1
        self.note(f"kill -9 process group of {node.name}; restarted on {node.config.name}")
        node.start()

    def backend_terminate(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                (n,) = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name LIKE 'pgdurable%%' "
                    "AND pid <> pg_backend_pid()"
                ).fetchone()
        except psycopg.Error as exc:
            self.note(f"pg_terminate_backend failed: {exc!r}")
            return
        self.counts["backend_terminate"] += 1
        self.counts["backends_terminated"] += n
        self.note(f"pg_terminate_backend of {n} pgdurable backends")

    def restart_server(self) -> None:
        down = time.time()
        self.note("server: pg_ctl stop -m immediate")
        self.server.restart(self.s.outage)
        self.restart_window = (down, time.time())
        self.counts["server_restart"] += 1
        self.note(f"server: started again after {time.time() - down:.1f} s")


# -- checks --------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    token: str
    iid: int
    fsm: str
    step: str
    n: int
    trail: list[str]
    pid: int
    key: str | None
    start: float
    end: float | None
    admitted: float | None


def intervals(runs: list[Run], faults: Faults, monitor: Monitor, offset: float) -> tuple[list[Any], int]:
    """(key, start, end, run, exact) of every keyed run. A run without an end row ends when
    its process was killed (exact), else when its process was last seen alive (an estimate);
    the times in the database's clock."""
    out = []
    unknown = 0
    for r in runs:
        if r.key is None:
            continue
        exact = True
        end = r.end
        if end is None and r.pid in faults.killed:
            end = faults.killed[r.pid] + offset
        elif end is None and r.pid in monitor.seen:
            end, exact = monitor.seen[r.pid] + 0.05 + offset, False
        elif end is None:
            unknown += 1
            continue
        out.append((r.key, r.start, end, r, exact))
    return out, unknown


def check(
    report: Report,
    conn: psycopg.Connection[Any],
    s: Settings,
    faults: Faults,
    monitor: Monitor,
    offset: float,
) -> None:
    rows = conn.execute(
        "SELECT s.token, s.iid, s.fsm, s.step, s.n, s.trail, s.pid, s.key, extract(epoch FROM s.at)::float8, "
        "extract(epoch FROM e.at)::float8, extract(epoch FROM s.admitted_at)::float8 "
        "FROM chaos_runs AS s LEFT JOIN chaos_runs AS e ON e.token = s.token AND e.what = 'end' "
        "WHERE s.what = 'start'"
    ).fetchall()
    runs = {r[0]: Run(*r) for r in rows}
    inst = conn.execute(
        f"SELECT id, fsm, status, result, crashes, last_error, parent_id, state->>'kind' "
        f'FROM "{SCHEMA}".instances ORDER BY id'
    ).fetchall()

    # Every instance done, with exactly one committed run per step, chained.
    statuses = collections.Counter(i[2] for i in inst)
    top = [i for i in inst if i[1] == "chaos"]
    children = [i for i in inst if i[1] == "chaos_child"]
    report.add("instances (top-level + children)", f"{len(top)} + {len(children)}")
    report.add("statuses at the end", ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    if len(top) != s.instances:
        report.fail(f"{len(top)} top-level instances in the table, {s.instances} planned")
    for iid, fsm, status, _result, _crashes, error, _parent, _kind in inst:
        if status != "done":
            report.fail(f"instance {iid} ({fsm}) is {status}: {error}")
    parents = collections.Counter(i[6] for i in children)
    for iid, *_, kind in top:
        if kind == "parent" and parents.get(iid) != CHILDREN:
            report.fail(f"parent {iid} has {parents.get(iid, 0)} children, not {CHILDREN}")
    committed: dict[tuple[int, str], set[str]] = collections.defaultdict(set)
    for r in runs.values():
        for i, token in enumerate(r.trail):
            committed[(r.iid, STEPS[r.fsm][i])].add(token)
    steps_committed = 0
    for iid, fsm, status, result, *_ in inst:
        if status != "done":
            continue
        steps = STEPS[fsm]
        trail = result.get("trail", []) if isinstance(result, dict) else []
        n = result.get("n") if isinstance(result, dict) else None
        steps_committed += len(trail)
        if n != len(steps) or len(trail) != len(steps):
            report.fail(f"instance {iid} ({fsm}): n = {n}, trail of {len(trail)}, {len(steps)} steps")
        for i, token in enumerate(trail[: len(steps)]):
            committed[(iid, steps[i])].add(token)
            r = runs.get(token)
            if r is None or (r.iid, r.step, r.n, r.trail) != (iid, steps[i], i, trail[:i]):
                report.fail(
                    f"instance {iid}: the committed run of {steps[i]} ({token}) "
                    "is not in the side table as such"
                )
    twice = {k: v for k, v in committed.items() if len(v) > 1}
    for (iid, step), tokens in sorted(twice.items())[:20]:
        report.fail(f"instance {iid}: step {step} committed by {len(tokens)} runs {sorted(tokens)}")

    # Re-runs: a step started more than once (its first run was killed or its claim lost).
    per_step = collections.Counter((r.iid, r.step) for r in runs.values())
    report.add("steps committed", steps_committed)
    report.add("step runs recorded", len(runs))
    report.add("re-runs (runs beyond the first)", sum(c - 1 for c in per_step.values()))
    report.add("steps started more than once", sum(c > 1 for c in per_step.values()))
    report.add("runs without an end row (killed mid-step)", sum(r.end is None for r in runs.values()))
    if twice:
        report.add("steps committed more than once", len(twice))

    # One at a time per acct key; at most GATE_LIMIT at once per gate key.
    spans, unknown = intervals(list(runs.values()), faults, monitor, offset)
    by_key: dict[str, list[Any]] = collections.defaultdict(list)
    for span in spans:
        by_key[span[0]].append(span)
    overlaps = estimated = 0
    gate_max = 0
    for key, group in sorted(by_key.items()):
        group.sort(key=lambda x: x[1])
        if key.startswith("acct:"):
            last = None
            for span in group:
                if last is not None and span[1] < last[2]:
                    a, b = last[3], span[3]
                    what = (
                        f"key {key}: run {a.token} (instance {a.iid} {a.step}, pid {a.pid}, "
                        f"{a.start:.3f}–{last[2]:.3f}) overlaps run {b.token} (instance {b.iid} {b.step}, "
                        f"pid {b.pid}, {b.start:.3f}–{span[2]:.3f})"
                    )
                    if last[4] and span[4]:
                        overlaps += 1
                        report.fail(what + _near_restart(faults, offset, b.start))
                    else:
                        estimated += 1
                        faults.note("estimated end, overlap not counted: " + what)
                if last is None or span[2] > last[2]:
                    last = span
        else:
            events = sorted(
                [(x[1], 1) for x in group] + [(x[2], -1) for x in group], key=lambda e: (e[0], e[1])
            )
            level = 0
            for _, step in events:
                level += step
                gate_max = max(gate_max, level)
    keyed = sum(1 for sp in spans if sp[0].startswith("acct:"))
    report.add("one-at-a-time intervals checked (acct:*)", f"{keyed}, overlaps {overlaps}")
    if estimated or unknown:
        report.add("keyed runs with an estimated / unknown end", f"{estimated} / {unknown}")
    report.add("gate: most at once on one key (limit)", f"{gate_max} ({GATE_LIMIT})")
    if gate_max > GATE_LIMIT:
        report.fail(f"gate: {gate_max} runs of one key at once, limit {GATE_LIMIT}")

    # Rate limit: admissions per period.
    admitted = sorted(r.admitted for r in runs.values() if r.admitted is not None)
    most = _most_in_window(admitted, RATE_PERIOD)
    starts = _most_in_window(sorted(r.start for r in runs.values() if r.admitted is not None), RATE_PERIOD)
    report.add(
        "rate: most admissions / starts in one period (allowed + burst)",
        f"{most} / {starts} ({RATE_ALLOWED + RATE_BURST}) of {len(admitted)}",
    )
    if most > RATE_ALLOWED + RATE_BURST:
        report.fail(
            f"rate limit: {most} admissions within {RATE_PERIOD} s, "
            f"allowed + burst is {RATE_ALLOWED + RATE_BURST}"
        )

    leaked = conn.execute(
        f'SELECT key, shard, capacity, available FROM "{SCHEMA}".gate_slots WHERE available <> capacity'
    ).fetchall()
    report.add("gate slots not given back", len(leaked))
    for key, shard, cap, avail in leaked:
        report.fail(f"gate counter {key}/{shard}: {avail} of {cap} available with nothing executing")
    crashes = [i[4] for i in inst]
    report.add(
        "crashes: sum / max at the end; max of one row, max sum seen",
        f"{sum(crashes)} / {max(crashes, default=0)}; {monitor.max_crashes}, {monitor.max_crash_sum}",
    )


def _most_in_window(times: list[float], period: float) -> int:
    return max((bisect.bisect_left(times, t + period) - i for i, t in enumerate(times)), default=0)


def _near_restart(faults: Faults, offset: float, at: float) -> str:
    if faults.restart_window is None:
        return ""
    down, up = (t + offset for t in faults.restart_window)
    if down - 1 <= at <= up + 5:
        return " (started around the server restart)"
    return ""


def summarize_logs(report: Report, server_log: str | None, nodes: list[Node]) -> None:
    if server_log is None:
        report.add("server log", "not read (a server the run did not start)")
    else:
        lines = server_log.splitlines()
        errors = [m.group(1) for m in (re.search(r"\bERROR:\s+(.*)", x) for x in lines) if m]
        fatals = [m.group(1) for m in (re.search(r"\bFATAL:\s+(.*)", x) for x in lines) if m]
        unique = sum('unique constraint "instances_concurrency_active"' in e for e in errors)
        report.add("server log: ERROR lines", len(errors))
        report.add("server log: unique violations on instances_concurrency_active", unique)
        report.add("server log: deadlocks", sum("deadlock detected" in e for e in errors))
        report.add("server log: FATAL lines", len(fatals))
        for message, count in collections.Counter(_shape(e) for e in errors).most_common(4):
            report.add("server log: ERROR", f"{count} × {message}")
    text = "\n".join(n.log.read_text(errors="replace") for n in nodes if n.log.exists())
    patterns = {
        "claim collisions on a concurrency key": r"collided on a concurrency key",
        "claims failed": r"claim failed:",
        "flushes retried": r"retrying on a new connection",
        "feeder connections lost": r"feeder connection lost",
        "reclaims failed": r"reclaim failed:",
        "children died (worker or maintenance)": r"died \(exit",
        "tracebacks": r"^Traceback",
    }
    counts = {name: len(re.findall(p, text, re.M)) for name, p in patterns.items()}
    reclaimed = sum(int(x) for x in re.findall(r"reclaimed (\d+) rows", text))
    report.add(
        "supervisor logs",
        "; ".join(f"{name} {n}" for name, n in counts.items()) + f"; rows reclaimed {reclaimed}",
    )


def _shape(message: str) -> str:
    return re.sub(r"\d+", "N", message)[:100]


# -- the run -------------------------------------------------------------------------------
def run(s: Settings, dsn: str | None = None, workdir: Path | None = None, say=print) -> Report:
    """One chaos run; ``dsn``: an existing server to use (no server restart then)."""
    report = Report(s)
    rng = random.Random(s.seed)
    with contextlib.ExitStack() as stack:
        if dsn is None:
            if str(ROOT) not in sys.path:
                sys.path.insert(0, str(ROOT))
            from tests.dbserver import throwaway_server

            server_dsn, owned = stack.enter_context(throwaway_server()), True
        else:
            server_dsn, owned = dsn, False
        server = Server(server_dsn, owned)
        stack.callback(server.stop_if_restarted)  # before the throwaway server's own cleanup
        db = stack.enter_context(_database(server_dsn))
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="pgdurable-chaos-"))
        report.workdir = workdir
        _prepare(db)
        offset = _clock_offset(db)
        log_from = server.log_size()
        nodes = [Node(i, workdir, db, s) for i in range(s.supervisors)]
        for node in nodes:
            stack.callback(node.close)
        say(
            f"chaos: seed {s.seed}, {s.supervisors} supervisors, {s.instances} instances, "
            f"{s.seconds:.0f} s of faults"
        )
        t0 = time.monotonic()
        for node in nodes:
            node.start()
        _wait(lambda: all(n.poll() for n in nodes), 60, "the supervisors to be ready", nodes)
        report.add("seed", s.seed)
        report.add(
            "supervisors × worker processes × concurrency",
            f"{s.supervisors} × {s.processes} × {s.concurrency}",
        )
        report.add("supervisors ready after", f"{time.monotonic() - t0:.1f} s")

        monitor = Monitor(db, nodes)
        monitor.start()
        stack.callback(monitor.stopping.set)
        producer = Producer(db, plan(s, rng))
        producer.start()
        faults = Faults(s, rng, db, nodes, server)
        faults.run(s.seconds)
        report.add("fault phase", f"{s.seconds:.0f} s")
        report.add(
            "faults",
            ", ".join(
                f"{k} {faults.counts[k]}"
                for k in (
                    "worker_kill",
                    "supervisor_kill",
                    "backend_terminate",
                    "backends_terminated",
                    "server_restart",
                )
            ),
        )

        # Settle: no more faults; every supervisor up; wait until nothing is live.
        t1 = time.monotonic()
        producer.join(max(5.0, s.settle_timeout))
        settled = False
        while time.monotonic() - t1 < s.settle_timeout:
            faults.keep_alive()
            with contextlib.suppress(psycopg.Error):
                (live,) = _one(
                    db, f'SELECT count(*) FROM "{SCHEMA}".instances WHERE status = ANY(%s)', [list(LIVE)]
                )
                if not producer.is_alive() and live == 0:
                    settled = True
                    break
            time.sleep(0.2)
        settle = time.monotonic() - t1
        report.add(
            "time to settle after the last fault", f"{settle:.1f} s" + ("" if settled else " (timed out)")
        )
        if producer.error is not None:
            report.fail(f"the producer failed: {producer.error!r}")
        report.add("instances inserted (insert retries)", f"{producer.inserted} ({producer.retries})")
        report.add("supervisor exits on their own (restarted)", sum(len(n.exits) for n in nodes))
        codes = [n.stop() for n in nodes]
        monitor.stopping.set()
        monitor.join(5)
        report.add("supervisor exit codes at the stop", codes)
        if not settled:
            with psycopg.connect(db, autocommit=True) as conn:
                stuck = conn.execute(
                    f'SELECT id, fsm, step, status, locked_by, last_error FROM "{SCHEMA}".instances '
                    "WHERE status = ANY(%s) ORDER BY id LIMIT 10",
                    [list(LIVE)],
                ).fetchall()
            report.fail(f"not settled within {s.settle_timeout:.0f} s; live rows: {stuck}")
        with psycopg.connect(db, autocommit=True) as conn:
            check(report, conn, s, faults, monitor, offset)
        summarize_logs(report, server.read_log(log_from), nodes)
        (workdir / "faults.log").write_text("\n".join(faults.log) + "\n")
    return report


@contextlib.contextmanager
def _database(server_dsn: str) -> Iterator[str]:
    name = f"pgdurable_chaos_{secrets.token_hex(4)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(server_dsn, dbname=name)
    finally:
        with contextlib.suppress(psycopg.Error), psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _prepare(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn, SCHEMA)
        conn.execute(
            """
            CREATE TABLE chaos_runs (
                token text NOT NULL, what text NOT NULL, iid bigint NOT NULL, fsm text NOT NULL,
                step text NOT NULL, n int NOT NULL, trail jsonb NOT NULL, pid int NOT NULL, key text,
                admitted_at timestamptz, at timestamptz NOT NULL,
                PRIMARY KEY (token, what))
            """
        )


def _clock_offset(dsn: str) -> float:
    """The database clock minus this process's clock (the kill times are taken here)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        samples = []
        for _ in range(5):
            before = time.time()
            (db,) = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
            after = time.time()
            samples.append((after - before, db - (before + after) / 2))
    return min(samples)[1]


def _one(dsn: str, query: str, params: list[Any]) -> Any:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(query, params).fetchone()


def _wait(predicate: Any, timeout: float, what: str, nodes: list[Node]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(n.proc is not None and n.proc.poll() is not None for n in nodes):
            break
        time.sleep(0.1)
    logs = "\n".join(f"--- {n.name}\n{n.log.read_text(errors='replace')[-3000:]}" for n in nodes)
    raise RuntimeError(f"timed out waiting for {what}\n{logs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="an existing server (needs CREATEDB); default: a throwaway one")
    parser.add_argument("--quick", action="store_true", help="the short form (tests/test_chaos.py)")
    parser.add_argument("--seconds", type=float, help="length of the fault phase")
    parser.add_argument("--instances", type=int, help="top-level instances")
    parser.add_argument("--supervisors", type=int, help="supervisors, one config file each")
    parser.add_argument("--seed", type=int, help="the random seed (default: drawn and printed)")
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in vars(args).items()
        if k in ("seconds", "instances", "supervisors", "seed") and v is not None
    }
    s = Settings.quick(**overrides) if args.quick else Settings(**overrides)
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # the producer's pool, during a restart
    started = time.monotonic()
    report = run(s, dsn=args.dsn)
    report.add("wall time", f"{time.monotonic() - started:.0f} s")
    print(report.table())
    if report.failures:
        print(f"\n{len(report.failures)} invariant(s) broken (seed {s.seed}); logs in {report.workdir}:")
        for f in report.failures[:50]:
            print(f"- {f}")
        return 1
    if report.workdir is not None:
        shutil.rmtree(report.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
