"""Where the time of pgdurable's no-op drain goes: CPU per job in the worker processes, in
PostgreSQL's backends and background processes, the statements and round trips per job,
and (optionally) a sampled profile of one worker.

    python bench/burst_profile.py --dsn postgresql://127.0.0.1/postgres [--jobs 30000]
        [--settings '{"processes": 2, "batch": 400}']
        [--py-spy | --py-spy-native] [--py-spy-out stacks.folded] [--json out.json]

``--dsn`` names a maintenance database; the script creates a scratch database
``bench_prof_<random>`` next to it, and drops it at the end. PostgreSQL must run on this
host: the CPU of its processes is read from ``/proc``.

What is measured. A real ``pgdurable supervise`` (``bench/fleet.py``) is started and warmed
with a small burst. Then queue ``bench`` is paused, the N no-op jobs are inserted, and the
drain is timed from ``resume`` (whose NOTIFY wakes the workers) until no row is runnable
or executing. Inserting while paused keeps the COPY's cost, the producer and process
start-up out of the drain, while the workers, their connections and caches are warm
(``bench/run.py``'s burst inserts while the fleet runs: its rate also pays for the inserts).
Over the drain:

- CPU (utime + stime from ``/proc/<pid>/stat``) of the supervisor, each worker, every
  PostgreSQL backend of the scratch database (``pg_stat_activity``; the fleet's are those
  named ``pgdurable …``) and the server's background processes (WAL writer, checkpointer,
  autovacuum…), sampled during the drain so that a process that starts meanwhile counts;
  the postmaster's reaped-children time catches those that also ended; the machine's busy
  and idle time from ``/proc/stat``. "Other" is the machine's busy time that none of these
  account for: this machine's other work, the kernel's softirqs, the profiler itself.
- Statements: ``pg_stat_statements`` (before/after snapshots of the scratch database's
  entries, rather than a reset, which would clear other databases' figures too) when the
  server preloads it; the claim's and the flush's rows per call are the batches achieved.
  Otherwise the script says how to enable it and falls back to ``pg_stat_database``
  (transactions) and ``pg_stat_user_tables`` (rows).
  To enable it (one restart)::

      ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements';
      -- then restart the server, e.g. pg_ctlcluster 15 main restart

- ``--py-spy``: ``py-spy record --format raw --nonblocking`` on the first worker during the
  drain (``pip install py-spy``; needs ptrace rights, e.g. root), aggregated into functions
  by self and inclusive samples and into buckets (psycopg, msgspec, asyncio, pgdurable's
  claim and commit paths, step code). ``--py-spy-native`` adds C frames (msgspec, libpq,
  uvloop) but pauses the process at each sample, so it slows the worker it samples.

- ``--perf``: ``perf record`` (Linux perf; needs the rights to profile other users'
  processes, e.g. root) on the fleet's PostgreSQL backends during the drain, reported as
  the server functions (symbols of the postgres binary, libc and the kernel) that took the
  most of their samples, self time, and the same by module. Without PostgreSQL's debug
  symbols the server's own functions still show by name (the binary exports them).
  ``--perf-inclusive`` (implies ``--perf``) records DWARF call graphs and adds the
  inclusive share of the functions a row's write goes through (``PERF_INCLUSIVE``).

The verdict line says which side bounds the rate: the machine's biggest consumer when it
is saturated, else one process at a full core, else latency. Other work on the machine
shows as "other" and "backends of other databases"; past 10 % of the machine the report
warns that its rate is a shared machine's. Measure with short drains only after a
warm-up, and compare runs made side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from fleet import SupervisorFleet
from pgdurable_machines import QUEUE, noop
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgdurable import Insert
from pgdurable.client import Client
from pgdurable.db import migrations
from pgdurable.db.queries import Queries

SCHEMA = "pgdurable"
APP = "bench profile"  # application_name of this script's own connections
TAG = "/* bench profile */ "  # marks this script's statements in pg_stat_statements
CLK = os.sysconf("SC_CLK_TCK")
WARMUP = 2_000
INSERT_BATCH = 1_000
STATS_IDLE = 11.0  # seconds: PostgreSQL's idle stats flush interval (10 s), and a margin
POLL = 0.05  # seconds between two "is the queue drained?" queries
SAMPLE = 0.25  # seconds between two samples of pg_stat_activity and /proc
#: The fleet: two processes, every other queue key at pgdurable's default unless --settings names it.
DEFAULTS: dict[str, int | bool] = {"processes": 2}
KNOBS = {"processes", "concurrency", "prefetch", "batch", "history"}
# PostgreSQL's processes that serve the whole server, not one database.
EXITED = "pg exited during the drain (any database)"  # the postmaster's reaped children
BACKGROUND = {
    "walwriter",
    "checkpointer",
    "background writer",
    "autovacuum launcher",
    "autovacuum worker",
    "logical replication launcher",
    "walsender",
    "archiver",
    "startup",
    "walreceiver",
}


# -- /proc --------------------------------------------------------------------------------
def proc_stat(pid: int) -> tuple[float, float, float, int] | None:
    """utime, stime, cutime + cstime in seconds and the start time in ticks since boot."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    rest = text[text.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(v) for v in rest[11:15])
    return utime / CLK, stime / CLK, (cutime + cstime) / CLK, int(rest[19])


def ppid(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[1])


def machine() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot; iowait counts as idle."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    # guest time is already included in user time
    total = sum(fields[:8])
    return (total - idle) / CLK, idle / CLK


def title(pid: int) -> str:
    """The process title (pgdurable sets it: "pgdurable: worker bench 1/2", "pgdurable: maintenance")."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def uptime_ticks() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * CLK)


@dataclass
class Proc:
    role: str  # "worker", "supervisor", "pg fleet", "pg harness", "pg <backend_type>", ...
    first: tuple[float, float] | None = None  # (user, system) s when first seen; None: started since
    last: tuple[float, float] = (0.0, 0.0)

    @property
    def user(self) -> float:
        return self.last[0] - (self.first[0] if self.first else 0.0)

    @property
    def system(self) -> float:
        return self.last[1] - (self.first[1] if self.first else 0.0)

    @property
    def used(self) -> float:
        return self.user + self.system


@dataclass
class CpuTracker:
    """CPU of named processes over an interval, sampled so that late starters count."""

    t0_ticks: int = 0
    procs: dict[int, Proc] = field(default_factory=dict)

    def start(self) -> None:
        self.t0_ticks = uptime_ticks()

    def see(self, pid: int, role: str) -> None:
        st = proc_stat(pid)
        if st is None:
            return
        user, system, _, started = st
        p = self.procs.get(pid)
        if p is None:
            # A process that started after the drain began counts from zero.
            p = self.procs[pid] = Proc(role, None if started >= self.t0_ticks else (user, system))
        p.last = (user, system)

    def by_role(self) -> dict[str, float]:
        out: Counter[str] = Counter()
        for p in self.procs.values():
            out[p.role] += p.used
        return dict(out)

    def system_by_role(self) -> dict[str, float]:
        out: Counter[str] = Counter()
        for p in self.procs.values():
            out[p.role] += p.system
        return dict(out)


# -- the database -------------------------------------------------------------------------
def dsn_for(dsn: str, dbname: str, **extra: str) -> str:
    return make_conninfo(dsn, dbname=dbname, **extra)


def pg_processes(conn: psycopg.Connection[Any], db: str) -> list[tuple[int, str]]:
    """(pid, role) of the scratch database's backends and the server's background ones."""
    out = []
    for pid, backend_type, datname, app in conn.execute(
        TAG + "SELECT pid, backend_type, datname, application_name FROM pg_stat_activity"
    ):
        if backend_type in BACKGROUND:
            if backend_type == "autovacuum worker" and datname != db:
                continue  # vacuuming another database: not ours
            out.append((pid, f"pg {backend_type}"))
        elif datname == db:
            out.append((pid, "pg harness" if app == APP else "pg fleet"))
        elif backend_type == "client backend" and datname is not None:
            out.append((pid, "pg other databases"))
    return out


def pss_available(conn: psycopg.Connection[Any]) -> tuple[bool, str]:
    row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_stat_statements'").fetchone()
    if row is None:
        return False, "the pg_stat_statements extension is not installed (postgresql-contrib)"
    preload = conn.execute("SHOW shared_preload_libraries").fetchone()
    libs = [s.strip() for s in (preload[0] if preload else "").split(",")]
    if "pg_stat_statements" not in libs:
        return False, (
            "pg_stat_statements is not in shared_preload_libraries; to enable it run "
            "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements' "
            "(keeping any library already listed) and restart the server"
        )
    return True, ""


def pss_snapshot(conn: psycopg.Connection[Any], db: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    rows = conn.execute(
        TAG + "SELECT userid, queryid, toplevel, query, calls, rows, total_exec_time"
        " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)",
        [db],
    ).fetchall()
    return {
        (r[0], r[1], r[2]): {"query": r[3], "calls": r[4], "rows": r[5], "ms": r[6]}
        for r in rows
        if r[1] is not None
    }


def pg_counters(conn: psycopg.Connection[Any], db: str) -> dict[str, int]:
    out: dict[str, int] = {}
    row = conn.execute(
        TAG + "SELECT xact_commit, xact_rollback, blks_hit, blks_read, tup_inserted, tup_updated"
        " FROM pg_stat_database WHERE datname = %s",
        [db],
    ).fetchone()
    assert row is not None
    for k, v in zip(
        ("xact_commit", "xact_rollback", "blks_hit", "blks_read", "tup_inserted", "tup_updated"),
        row,
        strict=True,
    ):
        out[k] = int(v)
    for rel, ins, upd, hot in conn.execute(
        TAG + "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd"
        " FROM pg_stat_user_tables WHERE schemaname = %s",
        [SCHEMA],
    ):
        out[f"{rel}.ins"], out[f"{rel}.upd"], out[f"{rel}.hot_upd"] = int(ins), int(upd), int(hot)
    wal = conn.execute(TAG + "SELECT wal_records, wal_bytes, wal_fpi FROM pg_stat_wal").fetchone()
    if wal is not None:
        out["wal_records"], out["wal_bytes"], out["wal_fpi"] = int(wal[0]), int(wal[1]), int(wal[2])
    return out


_COMMENT = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
_LITERAL = re.compile(r"'(?:[^']|'')*'")
_WORD = re.compile(r"[a-z_][a-z0-9_]*")
_NOISE = {"interval", "true", "false", "null"}  # constants pg_stat_statements may replace


def words(text: str) -> list[str]:
    """The identifiers and keywords of a statement: what survives pg_stat_statements'
    normalisation (constants become $n) and psycopg's placeholders (%(x)s become $n)."""
    text = _LITERAL.sub(" ", _COMMENT.sub(" ", text)).lower()
    text = re.sub(r"%\(\w+\)s", " ", text)
    return [w for w in _WORD.findall(text) if w not in _NOISE]


class Namer:
    """Names a pg_stat_statements entry after the named query it is (best word match)."""

    def __init__(self, schema: str):
        q = Queries(schema)
        self.known = {name: words(q[name].decode()) for name in q.names()}

    def __call__(self, query: str) -> str:
        if TAG.strip() in query:
            return "(this script) " + " ".join(query.replace(TAG.strip(), "").split())[:40]
        mine = words(query)
        best, score = "", 0.0
        for name, theirs in self.known.items():
            m = difflib.SequenceMatcher(None, mine, theirs, autojunk=False)
            if m.real_quick_ratio() <= score or m.quick_ratio() <= score:
                continue
            r = m.ratio()
            if r > score:
                best, score = name, r
        if score >= 0.9:
            return best
        return " ".join(query.split())[:60]


# -- py-spy -------------------------------------------------------------------------------
def py_spy_binary() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    if here.exists():
        return str(here)
    return shutil.which("py-spy")


BUCKETS = [
    # (bucket, predicate on one frame "func (file:line)"), tried from the leaf up: the first
    # frame that matches names the sample's bucket.
    ("msgspec encode/decode", lambda f: "msgspec" in f),
    ("psycopg / libpq (protocol, adaptation, pool)", lambda f: "psycopg" in f or "libpq" in f),
    ("step code", lambda f: "pgdurable_machines.py" in f),
    (
        "pgdurable claim (feeder, claim)",
        lambda f: any(s in f for s in ("engine/claim.py", "runtime/feeder.py", "runtime/feedconn.py")),
    ),
    (
        "pgdurable commit (flusher, outcomes, history)",
        lambda f: any(
            s in f
            for s in ("engine/commit.py", "runtime/flusher.py", "engine/history.py", "engine/outcome.py")
        ),
    ),
    ("pgdurable executor and other", lambda f: "pgdurable/" in f),
    # Without --native, the C code of uvloop's loop and of asyncio's tasks has no frame of
    # its own: it is the self time of the frame that entered the loop (Runner.run).
    (
        "event loop (uvloop, asyncio tasks: C code under Runner.run)",
        lambda f: any(s in f for s in ("asyncio/", "uvloop", "selectors.py")),
    ),
]


def parse_folded(path: Path) -> list[tuple[list[str], int]]:
    out = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        # Frames are "func (file:line)"; the line is dropped so a function is one entry.
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        out.append((frames, int(count)))
    return out


def leaf_name(frame: str) -> str:
    return frame.split(" (", 1)[0].lstrip("_")


# With C frames (--native), a sample waiting in the event loop's poll shows as such, and py-spy
# counts some of those as active: they are idle time, left out. Socket I/O system calls are
# a bucket of their own: the kernel's loopback TCP work is billed to the sender.
IDLE_LEAVES = {"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6"}
SOCKET_LEAVES = {"send", "sendto", "sendmsg", "recv", "recvfrom", "recvmsg", "libc_send", "libc_recv"}


def aggregate(stacks: list[tuple[list[str], int]], top: int) -> dict[str, Any]:
    idle = sum(n for frames, n in stacks if frames and leaf_name(frames[-1]) in IDLE_LEAVES)
    stacks = [(frames, n) for frames, n in stacks if frames and leaf_name(frames[-1]) not in IDLE_LEAVES]
    total = sum(n for _, n in stacks)
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    for frames, n in stacks:
        self_t[frames[-1]] += n
        if leaf_name(frames[-1]) in SOCKET_LEAVES:
            buckets["socket send/recv system calls (kernel, loopback TCP)"] += n
            for f in set(frames):
                incl[f] += n
            continue
        for f in set(frames):
            incl[f] += n
        for f in reversed(frames):
            bucket = next((b for b, match in BUCKETS if match(f)), None)
            if bucket is not None:
                buckets[bucket] += n
                break
        else:
            buckets["other (interpreter, libraries)"] += n
    # The process's entry chain (main, supervisor, fork, run loop) is in nearly every sample
    # and says nothing: leave out what is in more than 80 % of them.
    own = Counter(
        {
            f: n
            for f, n in incl.items()
            if ("pgdurable/" in f or "pgdurable_machines" in f) and n <= 0.8 * total
        }
    )
    return {
        "samples": total,
        "idle_excluded": idle,
        "self": self_t.most_common(top),
        "inclusive_own": own.most_common(top),
        "buckets": buckets.most_common(),
    }


# -- the run ------------------------------------------------------------------------------
def connect(dsn: str, patience: float = 120.0) -> psycopg.Connection[Any]:
    """Connect, waiting while the server is full: it is shared with other benchmark runs."""
    t0 = time.monotonic()
    while True:
        try:
            return psycopg.connect(dsn, autocommit=True)
        except psycopg.OperationalError as exc:
            if "too many clients" not in str(exc) or time.monotonic() - t0 > patience:
                raise
            time.sleep(1.0)


@contextlib.contextmanager
def scratch_database(dsn: str) -> Iterator[str]:
    name = f"bench_prof_{secrets.token_hex(4)}"
    with connect(dsn) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with connect(dsn) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def start_fleet(dsn: str, knobs: dict[str, int | bool]) -> SupervisorFleet:
    """Start the supervisor; again, a few times, when the shared server had no free slot."""
    for attempt in range(5):
        fleet = SupervisorFleet(dsn, SCHEMA, knobs)
        try:
            return await fleet.ready()
        except RuntimeError as exc:
            await fleet.stop()
            shutil.rmtree(fleet.dir, ignore_errors=True)
            if "too many clients" not in str(exc) or attempt == 4:
                raise
            await asyncio.sleep(5.0)
    raise AssertionError("unreachable")


def remaining(conn: psycopg.Connection[Any]) -> int:
    # Both counts walk a partial index that holds only live rows (instances_pick,
    # instances_lease), so the poll stays cheap as the table fills with finished rows.
    row = conn.execute(
        sql.SQL(
            TAG + "SELECT (SELECT count(*) FROM {s}.instances WHERE status = 'runnable' AND queue = %s)"
            " + (SELECT count(*) FROM {s}.instances"
            "    WHERE status = 'executing' AND lease_expires_at IS NOT NULL)"
        ).format(s=sql.Identifier(SCHEMA)),
        [QUEUE],
        prepare=True,
    ).fetchone()
    return int(row[0]) if row else 0


def drain_until_empty(conn: psycopg.Connection[Any], deadline: float) -> None:
    t0 = time.monotonic()
    while remaining(conn) > 0:
        if time.monotonic() - t0 > deadline:
            raise RuntimeError(f"the queue did not drain within {deadline:.0f} s")
        time.sleep(POLL)


async def profile(args: argparse.Namespace) -> dict[str, Any]:
    knobs = {**DEFAULTS, **json.loads(args.settings)}
    unknown = set(knobs) - KNOBS
    if unknown:
        raise SystemExit(f"--settings: unknown keys {sorted(unknown)} (known: {sorted(DEFAULTS)})")
    n = args.jobs
    with scratch_database(args.dsn) as db:
        fleet_dsn = dsn_for(args.dsn, db)
        own_dsn = dsn_for(args.dsn, db, application_name=APP)
        with connect(own_dsn) as conn:
            migrations.migrate(conn, SCHEMA)
            use_pss, why = pss_available(conn)
            if use_pss:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            ncpu = os.cpu_count() or 1
            client = Client(own_dsn, schema=SCHEMA)
            fleet = await start_fleet(fleet_dsn, knobs)
            spy: subprocess.Popen[bytes] | None = None
            perf: subprocess.Popen[bytes] | None = None
            spy_dir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
            spy_out = spy_dir / "worker.folded"
            perf_out = spy_dir / "backends.perf"
            try:
                # Warm-up: imports, prepared statements, pools, the flusher's buffers.
                client.insert_many([Insert(noop, {}) for _ in range(WARMUP)])
                drain_until_empty(conn, 60)
                warmed = time.monotonic()

                client.pause(QUEUE)
                t_ins = time.perf_counter()
                for i in range(0, n, INSERT_BATCH):
                    client.insert_many([Insert(noop, {}) for _ in range(min(INSERT_BATCH, n - i))])
                insert_s = time.perf_counter() - t_ins
                # Closing the producer's pool ends its backends, which flushes their counts
                # (the COPY's rows) before the drain's baseline is read; a busy backend
                # flushes at most once a second, so the fleet's are flushed after the pause.
                client.close()
                # An idle backend flushes its counts ten seconds after it went idle (a busy one
                # at most once a second): wait so that the warm-up's land before the baseline.
                await asyncio.sleep(max(1.5, STATS_IDLE - (time.monotonic() - warmed)))

                pids = fleet.pids()
                supervisor = pids.get("supervisor", [])
                # The supervisor's children are its workers and its maintenance process.
                children = pids.get("worker", [])
                workers = [pid for pid in children if "worker" in title(pid)]
                others = [pid for pid in children if pid not in workers]
                if args.py_spy:
                    binary = py_spy_binary()
                    if binary is None:
                        raise SystemExit("--py-spy: no py-spy executable (pip install py-spy)")
                    cmd = [binary, "record", "--format", "raw", "--function", "--rate", str(args.py_spy_rate)]
                    cmd += ["--pid", str(workers[0]), "-o", str(spy_out)]
                    cmd += ["--native"] if args.py_spy_native else ["--nonblocking"]
                    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    await asyncio.sleep(1.0)  # attached and sampling before the drain starts

                if args.perf:
                    perf_bin = shutil.which("perf")
                    if perf_bin is None:
                        raise SystemExit("--perf: no perf executable (Debian: apt-get install linux-perf)")
                    backends = [str(p) for p, r in pg_processes(conn, db) if r == "pg fleet"]
                    cmd = [perf_bin, "record", "-F", str(args.perf_rate), "-o", str(perf_out)]
                    cmd += ["--call-graph", "dwarf,16384"] if args.perf_inclusive else []
                    perf = subprocess.Popen(
                        [*cmd, "-p", ",".join(backends)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                    )
                    await asyncio.sleep(1.0)  # attached before the drain starts

                walwriter = next((p for p, r in pg_processes(conn, db) if r == "pg walwriter"), None)
                postmaster = ppid(walwriter) if walwriter else None
                tracker = CpuTracker()
                tracker.start()

                def sample() -> None:
                    for pid in workers:
                        tracker.see(pid, "worker")
                    for pid in supervisor:
                        tracker.see(pid, "supervisor")
                    for pid in others:
                        tracker.see(pid, "maintenance")
                    for pid, role in pg_processes(conn, db):
                        tracker.see(pid, role)
                    tracker.see(os.getpid(), "harness")
                    if spy is not None:
                        tracker.see(spy.pid, "py-spy")
                    if postmaster:
                        tracker.see(postmaster, "pg postmaster")

                sample()
                pm0 = proc_stat(postmaster) if postmaster else None
                pss0 = pss_snapshot(conn, db) if use_pss else {}
                cnt0 = pg_counters(conn, db)
                busy0, idle0 = machine()
                t0 = time.perf_counter()
                client.resume(QUEUE, conn=conn)
                last_sample = t0
                while True:
                    left = remaining(conn)
                    now = time.perf_counter()
                    if left == 0 or now - t0 > args.deadline:
                        break
                    if now - last_sample >= SAMPLE:
                        sample()
                        last_sample = now
                    time.sleep(POLL)
                elapsed = time.perf_counter() - t0
                busy1, idle1 = machine()
                sample()
                pm1 = proc_stat(postmaster) if postmaster else None
                pss1 = pss_snapshot(conn, db) if use_pss else {}
                if perf is not None:
                    perf.send_signal(signal.SIGINT)  # perf writes its file on SIGINT
                    _, err = await asyncio.to_thread(perf.communicate, None, 60)
                    if not perf_out.exists():
                        print(f"perf failed ({perf.returncode}): {err.decode()[-1000:]}", file=sys.stderr)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                    _, err = await asyncio.to_thread(spy.communicate, None, 30)
                    if spy.returncode not in (0, -signal.SIGINT) or not spy_out.exists():
                        print(f"py-spy failed ({spy.returncode}): {err.decode()[-1000:]}", file=sys.stderr)
                # A backend flushes its pg_stat_database and pg_stat_user_tables counts at
                # most once a second while busy, ten seconds after it went idle, and when it
                # exits: stop the fleet (nothing is left to release) and wait for its backends
                # to be gone. The counts then hold the shutdown's few statements too.
                await fleet.stop()
                for _ in range(100):
                    if not any(role == "pg fleet" for _, role in pg_processes(conn, db)):
                        break
                    await asyncio.sleep(0.1)
                cnt1 = pg_counters(conn, db)
                finished = conn.execute(
                    sql.SQL("SELECT count(*) FROM {}.instances WHERE status = 'done'").format(
                        sql.Identifier(SCHEMA)
                    )
                ).fetchone()
            finally:
                for profiler in (spy, perf):
                    if profiler is not None and profiler.poll() is None:
                        profiler.kill()
                        profiler.wait()
                await fleet.stop()
                shutil.rmtree(fleet.dir, ignore_errors=True)
                client.close()
        done = int(finished[0]) - WARMUP if finished else 0

    cpu = tracker.by_role()
    reaped = (pm1[2] - pm0[2]) if pm0 and pm1 else 0.0
    if reaped:
        cpu[EXITED] = reaped
    busy, idle = busy1 - busy0, idle1 - idle0
    result: dict[str, Any] = {
        "jobs": n,
        "finished": done,
        "settings": knobs,
        "cores": ncpu,
        "insert_seconds": round(insert_s, 3),
        "drain_seconds": round(elapsed, 3),
        "rate": round(done / elapsed, 1),
        "machine": {"busy_s": round(busy, 3), "idle_s": round(idle, 3)},
        "cpu_s": {k: round(v, 3) for k, v in sorted(cpu.items())},
        "sys_s": {k: round(v, 3) for k, v in sorted(tracker.system_by_role().items())},
        "per_process": sorted(
            ({"pid": pid, "role": p.role, "cpu_s": round(p.used, 3)} for pid, p in tracker.procs.items()),
            key=lambda d: -d["cpu_s"],
        ),
        "counters": {k: cnt1[k] - cnt0.get(k, 0) for k in cnt1},
    }
    if use_pss:
        result["statements"] = statement_table(pss0, pss1, Namer(SCHEMA))
    else:
        result["statements_note"] = why
    if args.py_spy and spy_out.exists():
        result["py_spy"] = {"pid": workers[0], **aggregate(parse_folded(spy_out), args.top)}
        result["py_spy_native"] = args.py_spy_native
        if args.py_spy_out:
            shutil.copyfile(spy_out, args.py_spy_out)
    if args.perf and perf_out.exists():
        result["perf"] = perf_report(perf_out, args.top, inclusive=args.perf_inclusive)
    shutil.rmtree(spy_dir, ignore_errors=True)
    return result


# -- perf ---------------------------------------------------------------------------------
_PERF_LINE = re.compile(r"^\s*([0-9.]+)%\s+(\S+)\s+\[([.k])\]\s+(.+?)\s*$")


#: The server's functions whose inclusive share ``--perf-inclusive`` reports: where a row's
#: write goes (the heap, its indexes, stored generated columns, constraints, WAL), what the
#: JSON documents of the flush cost to parse, planning, and the commit.
PERF_INCLUSIVE = [
    "ExecInsertIndexTuples", "ExecComputeStoredGenerated", "ExecConstraints", "heap_update",
    "heap_insert", "heap_multi_insert", "XLogInsert", "json_lex", "jsonb_in",
    "pg_parse_json", "pg_plan_query", "CommitTransaction", "XLogFlush", "ExecScan",
    "ExecLockRows", "CopyFrom", "MakeTupleTableSlot", "ExecDropSingleTupleTableSlot",
]  # fmt: skip


def _perf_report_text(path: Path, *how: str) -> str:
    cmd = [shutil.which("perf") or "perf", "report", "-i", str(path), "--stdio", "-g", "none", *how]
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout


def perf_report(path: Path, top: int, inclusive: bool = False) -> dict[str, Any]:
    """The backends' samples by function (self) and by module, from ``perf report``; with
    ``inclusive`` (call graphs recorded), also the inclusive share of ``PERF_INCLUSIVE``."""
    text = _perf_report_text(path, "--no-children", "--sort", "dso,sym")
    functions: list[dict[str, Any]] = []
    modules: dict[str, float] = {}
    kernel = 0.0
    for line in text.splitlines():
        m = _PERF_LINE.match(line)
        if m is None:
            continue
        share, dso, space, sym = float(m[1]), m[2], m[3], m[4]
        modules[dso] = modules.get(dso, 0.0) + share
        kernel += share if space == "k" else 0.0
        functions.append({"share": share, "module": dso, "function": sym, "kernel": space == "k"})
    samples = re.search(r"^# Samples: (\S+)", text, re.MULTILINE)
    covered: list[list[Any]] = []
    if inclusive:
        for line in _perf_report_text(path, "--children", "--sort", "sym").splitlines():
            m = re.match(r"^\s*([0-9.]+)%\s+([0-9.]+)%\s+\[[.k]\]\s+(\S+)", line)
            if m is not None and m[3] in PERF_INCLUSIVE:
                covered.append([m[3], float(m[1])])
    return {
        "inclusive": covered,
        "samples": samples[1] if samples else "?",
        "kernel_share": round(kernel, 2),
        "modules": sorted(([k, round(v, 2)] for k, v in modules.items()), key=lambda kv: -kv[1])[:top],
        "functions": functions[: top * 2],
    }


def statement_table(
    before: dict[tuple[Any, ...], dict[str, Any]], after: dict[tuple[Any, ...], dict[str, Any]], name: Namer
) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for key, a in after.items():
        b = before.get(key, {"calls": 0, "rows": 0, "ms": 0.0})
        calls = a["calls"] - b["calls"]
        if calls <= 0:
            continue
        label = name(a["query"])
        r = rows.setdefault(label, {"statement": label, "calls": 0, "rows": 0, "ms": 0.0})
        r["calls"] += calls
        r["rows"] += a["rows"] - b["rows"]
        r["ms"] += a["ms"] - b["ms"]
    return sorted(rows.values(), key=lambda r: -r["ms"])


# -- the report ---------------------------------------------------------------------------
def table(head: list[str], rows: list[list[Any]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


SATURATED = 0.85  # of the machine or of one core: above it, the scheduler's gaps are the idle left
PY = "worker processes (Python)"
SUP = "supervisor and its maintenance process"
PG = "PostgreSQL backends of the fleet"
PG_BG = "PostgreSQL background"
FOREIGN = "PostgreSQL backends of other databases"
OTHER = "other (machine busy minus the above)"


def verdict(r: dict[str, Any], groups: dict[str, float]) -> str:
    """Which side bounds the rate: a saturated machine's biggest consumer, else a single
    busy process (an event loop holds one core at most), else the round trips' latency."""
    elapsed, cores = r["drain_seconds"], r["cores"]
    capacity = cores * elapsed
    busy = r["machine"]["busy_s"] / capacity
    workers = [p["cpu_s"] / elapsed for p in r["per_process"] if p["role"] == "worker"]
    backends = [p["cpu_s"] / elapsed for p in r["per_process"] if p["role"] == "pg fleet"]
    py, pg = groups[PY], groups[PG] + groups[PG_BG]
    own = sum(v for k, v in groups.items() if k not in (FOREIGN, OTHER)) / capacity
    line = (
        f"Reading: the machine was {100 * busy:.0f} % busy, {100 * own:.0f} % for this drain "
        "(fleet, its backends, the server's background, this script); each worker used "
        + ", ".join(f"{100 * w:.0f} %" for w in sorted(workers, reverse=True))
        + " of a core, the busiest fleet backend "
        + (f"{100 * max(backends):.0f} %" if backends else "n/a")
        + f"; PostgreSQL took {pg / max(py, 1e-9):.2f}× the workers' CPU. "
    )
    side = "PostgreSQL" if pg > py else "the workers' Python"
    # The ceiling counts what a production drain pays: the fleet and the server, not this
    # script's polling nor the profiler.
    drain = groups[PY] + groups[SUP] + pg
    line += (
        f"At the drain's {1e6 * drain / r['finished']:.0f} µs of CPU per job (fleet and server), "
        f"{cores} cores allow at most {cores * r['finished'] / max(drain, 1e-9):,.0f} jobs/s. "
    )
    if busy >= SATURATED and own < SATURATED - 0.1:
        return line + (
            f"The box is saturated, but {100 * (busy - own):.0f} % of it by other work: this run "
            f"cannot say what bounds the rate alone; of the drain's own CPU, {side} takes more."
        )
    if busy >= SATURATED:
        return line + f"The box is saturated and {side} takes the larger share: CPU bounds the rate."
    if workers and max(workers) >= SATURATED:
        return line + "A worker's event loop is at a full core: the workers' Python bounds the rate."
    return line + (
        "Neither the machine nor one process is saturated: the rate is bound by latency "
        "(round trips and wake-ups per batch against the slots in flight)."
    )


def report(r: dict[str, Any]) -> str:
    n, elapsed, cores = r["finished"] or 1, r["drain_seconds"], r["cores"]
    capacity = cores * elapsed
    out = [
        f"## No-op drain: {r['finished']:,} of {r['jobs']:,} jobs in {elapsed:.2f} s = "
        f"**{r['rate']:,.0f} jobs/s** ({r['settings']})",
        "",
        f"Inserted beforehand (queue paused) in {r['insert_seconds']:.2f} s. Machine: {cores} cores, "
        f"{capacity:.2f} CPU-s of capacity over the drain.",
        "",
    ]
    cpu: dict[str, float] = dict(r["cpu_s"])
    sys_s: dict[str, float] = r["sys_s"]
    groups: dict[str, float] = {}
    kernel: dict[str, float] = {}

    def take(label: str, keys: list[str]) -> None:
        groups[label] = sum(cpu.pop(k, 0.0) for k in keys)
        kernel[label] = sum(sys_s.get(k, 0.0) for k in keys)

    take(PY, ["worker"])
    take(SUP, ["supervisor", "maintenance"])
    take(PG, ["pg fleet"])
    bg = [k for k in cpu if k.startswith("pg ") and k not in ("pg harness", "pg other databases")]
    bg_detail = {k: cpu[k] for k in bg}
    take(PG_BG, bg)
    take("this script and its backend (polling)", ["harness", "pg harness"])
    take(FOREIGN, ["pg other databases"])
    if "py-spy" in cpu:
        take("py-spy", ["py-spy"])
    busy, idle = r["machine"]["busy_s"], r["machine"]["idle_s"]
    groups[OTHER] = busy - sum(groups.values())

    def row(label: str, v: float, k: float | None) -> list[str]:
        share = "" if k is None or v <= 0 else f"{100 * k / v:.0f} %"
        return [label, f"{v:.2f}", f"{v / n * 1e6:.0f}", f"{100 * v / capacity:.0f} %", share]

    rows = [row(label, v, kernel.get(label)) for label, v in groups.items()]
    rows += [row("**machine busy**", busy, None), row("idle capacity left", idle, None)]
    out += [table(["where", "CPU s", "µs per job", "% of machine", "of it kernel"], rows), ""]
    foreign = groups[OTHER] + groups[FOREIGN]
    if foreign > 0.1 * capacity:
        out += [
            f"**Warning**: {100 * foreign / capacity:.0f} % of the machine went to work that is not "
            "this drain's (other databases, other processes): the rate and the idle share are "
            "those of a shared machine.",
            "",
        ]
    out += [verdict(r, groups), ""]
    if bg_detail:
        detail = [[k.removeprefix("pg "), f"{v:.2f}", f"{v / n * 1e6:.0f}"] for k, v in bg_detail.items()]
        out += [table(["PostgreSQL background", "CPU s", "µs per job"], detail), ""]

    c = r["counters"]
    facts = [
        ["transactions committed", c.get("xact_commit", 0), f"{c.get('xact_commit', 0) / n:.3f}"],
        ["rows updated (all tables)", c.get("tup_updated", 0), f"{c.get('tup_updated', 0) / n:.3f}"],
        ["rows inserted (all tables)", c.get("tup_inserted", 0), f"{c.get('tup_inserted', 0) / n:.3f}"],
        ["instances: updates (HOT)", f"{c.get('instances.upd', 0)} ({c.get('instances.hot_upd', 0)})", ""],
        ["WAL records (whole server)", c.get("wal_records", 0), f"{c.get('wal_records', 0) / n:.2f}"],
        ["WAL bytes (whole server)", c.get("wal_bytes", 0), f"{c.get('wal_bytes', 0) / n:.0f}"],
        ["WAL full-page images (whole server)", c.get("wal_fpi", 0), f"{c.get('wal_fpi', 0) / n:.3f}"],
    ]
    out += [table(["server counters over the drain", "total", "per job"], facts), ""]
    out.append("(Counts of the scratch database up to the fleet's exit, but pg_stat_wal's.)\n")

    if "statements" in r:
        mine = [s for s in r["statements"] if s["statement"].startswith("(this script)")]
        st = [s for s in r["statements"] if s not in mine]
        total_ms = sum(s["ms"] for s in st) or 1.0
        calls = sum(s["calls"] for s in st)
        rows = [
            [
                f"`{s['statement']}`",
                s["calls"],
                s["rows"],
                f"{s['rows'] / s['calls']:.1f}",
                f"{s['ms'] / s['calls']:.3f}",
                f"{s['ms'] * 1000 / n:.1f}",
                f"{100 * s['ms'] / total_ms:.0f} %",
            ]
            for s in st[: r.get("top", 15)]
        ]
        out += [
            table(["statement", "calls", "rows", "rows/call", "mean ms", "µs per job", "share"], rows),
            "",
            f"Not counted above: this script's {sum(s['calls'] for s in mine)} statements "
            f"({sum(s['ms'] for s in mine):.0f} ms, mostly the drain poll).",
            "",
            f"{calls:,} statements = {calls / n:.3f} per job. Time inside their executors: "
            f"{total_ms / 1000:.2f} s = {total_ms * 1000 / n:.0f} µs per job (wall time: it holds "
            "waits for a core, a lock or a WAL flush); the fleet backends' CPU: "
            f"{r['cpu_s'].get('pg fleet', 0) * 1e6 / n:.0f} µs per job (with parsing, protocol and commits).",
        ]
        by = {s["statement"]: s for s in st}
        claim, flush = by.get("instance_claim"), by.get("instance_commit_if_owned_many")
        if claim and flush:
            # The history rider shares its flush's round trip (one pipeline, one Sync).
            riders = by.get("history_insert_many", {}).get("calls", 0)
            out.append(
                f"Claims: {claim['calls']:,} ({claim['rows'] / claim['calls']:.1f} rows each); "
                f"flushes: {flush['calls']:,} ({flush['rows'] / flush['calls']:.1f} rows each); "
                f"round trips ≈ statements minus history riders = {(calls - riders) / n:.3f} per job."
            )
        out.append("")
    else:
        out += [f"Statements: not counted: {r.get('statements_note', '')}.", ""]

    if "py_spy" in r:
        p = r["py_spy"]
        total = p["samples"] or 1
        out.append(
            f"### py-spy, worker {p['pid']}: {p['samples']:,} samples "
            f"({p['idle_excluded']:,} waiting in the event loop's poll left out)\n"
        )
        out.append(
            "py-spy counts a thread that is runnable as active even while it waits for a core: on "
            "a saturated machine, samples in `send` also hold the time the worker waits after "
            "waking its backend. Shares here are of the worker's non-idle time, not of its CPU "
            "(the kernel share of the table above is the CPU's).\n"
        )
        if not r.get("py_spy_native"):
            out.append(
                "Python frames only: a frame's self time holds the C it calls (libpq and the "
                "socket's system calls under psycopg's send and receive, msgspec under its caller, "
                "uvloop and asyncio's C tasks under `Runner.run`), and `Runner.run`'s also holds "
                "waits in epoll that py-spy counted as active: read the event-loop bucket as an "
                "upper bound. `--py-spy-native` separates them (and slows the sampled worker).\n"
            )
        out += [
            table(
                ["bucket (leaf-most matching frame)", "samples", "share"],
                [[b, k, f"{100 * k / total:.1f} %"] for b, k in p["buckets"]],
            ),
            "",
        ]
        out += [
            table(
                ["function (self)", "samples", "share"],
                [[f"`{f}`", k, f"{100 * k / total:.1f} %"] for f, k in p["self"]],
            ),
            "",
        ]
        out += [
            table(
                ["pgdurable function (inclusive)", "samples", "share"],
                [[f"`{f}`", k, f"{100 * k / total:.1f} %"] for f, k in p["inclusive_own"]],
            ),
            "",
        ]
    if "perf" in r:
        p = r["perf"]
        out.append(
            f"### perf, the fleet's PostgreSQL backends: {p['samples']} samples, "
            f"{p['kernel_share']:.1f} % of them in the kernel\n"
        )
        out += [table(["module", "share"], [[m, f"{v:.1f} %"] for m, v in p["modules"]]), ""]
        rows = [
            [f"`{f['function']}`", f["module"] + (" (kernel)" if f["kernel"] else ""), f"{f['share']:.1f} %"]
            for f in p["functions"]
        ]
        out += [table(["function (self)", "module", "share"], rows), ""]
        if p.get("inclusive"):
            out.append("Inclusive shares (a function and what it calls; they overlap):\n")
            out += [
                table(
                    ["function (inclusive)", "share"], [[f"`{f}`", f"{v:.1f} %"] for f, v in p["inclusive"]]
                ),
                "",
            ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dsn", required=True, help="a maintenance database (the scratch one is made beside it)"
    )
    parser.add_argument("--jobs", type=int, default=30_000)
    parser.add_argument("--settings", default="{}", help=f"JSON of queue knobs, defaults {DEFAULTS}")
    parser.add_argument(
        "--deadline", type=float, default=180.0, help="give up the drain after this many seconds"
    )
    parser.add_argument(
        "--py-spy", action="store_true", help="sample one worker with py-spy during the drain"
    )
    parser.add_argument("--py-spy-native", action="store_true", help="with C frames (pauses the worker)")
    parser.add_argument("--py-spy-out", help="also keep py-spy's folded stacks in this file")
    parser.add_argument("--py-spy-rate", type=int, default=200, help="samples per second")
    parser.add_argument("--perf", action="store_true", help="perf record the fleet's PostgreSQL backends")
    parser.add_argument("--perf-rate", type=int, default=999, help="perf samples per second")
    parser.add_argument(
        "--perf-inclusive", action="store_true", help="with --perf: call graphs (DWARF), inclusive shares"
    )
    parser.add_argument("--top", type=int, default=15, help="rows of each top-N table")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    args.perf = args.perf or args.perf_inclusive
    args.py_spy = args.py_spy or args.py_spy_native
    if conninfo_to_dict(args.dsn).get("host", "127.0.0.1") not in ("127.0.0.1", "localhost", "::1", ""):
        print("warning: the server must run on this host for its CPU to be read", file=sys.stderr)
    result = asyncio.run(profile(args))
    result["top"] = args.top
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(report(result))


if __name__ == "__main__":
    main()
