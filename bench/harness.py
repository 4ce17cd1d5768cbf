"""The workloads, written once for every system: pgdurable and each peer.

Standard library only: this module runs in pgdurable's virtualenv and in the peers' one
(bench/run.py puts bench/ on PYTHONPATH). A system's script implements ``System`` — how
to install its schema, start its fleet of worker processes, insert, count what finished
and seed a big table — and calls ``main(make_system)``; everything measured is measured
here, the same way for all. The result is one JSON document on stdout (``--out`` also
writes it to a file).

Workload order, chosen so that no workload leaves work for the next one: (c) inserts on a
second, empty database; then on the main one, fleet started and idle: memory idle, (a)
no-op burst (memory under load), (b) 5-step machines, (d) wake latency; fleet stopped;
(e) the no-op burst on a new fleet, fleet stopped, the big table seeded, a new fleet, the
burst again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

BENCH_DIR = Path(__file__).resolve().parent
STAMP_ENV = "BENCH_STAMP_SOCKET"
POLL = 0.05  # seconds between two "how many finished?" queries


@dataclass
class Settings:
    jobs: int = 10_000  # (a), (e): no-op jobs per burst
    fsm: int = 2_000  # (b): 5-step instances per variant
    inserts: int = 10_000  # (c): rows per insert workload
    insert_batch: int = 1_000  # (c): rows per insert_many call
    producers: int = 16  # (c): concurrent single-row producers
    latency: int = 400  # (d): samples (p99 is then about the fifth worst)
    terminal: int = 1_000_000  # (e): finished rows seeded
    future: int = 100_000  # (e): rows scheduled a day ahead
    processes: int = 2  # worker processes of every fleet (one per core here)
    concurrency: int = 10  # jobs in flight per process
    deadline: float = 120.0  # give up a burst after this many seconds, report what finished
    rounds: int = 3  # (a), (c) bulk, (e): the median of this many rounds...
    round_budget: float = 15.0  # ...or of as many as started within this many seconds
    #: The system's own settings (its documented knobs, by their own names), passed to every
    #: worker process; a knob left out keeps the script's setting (``bench/fair.py`` passes
    #: each system's defaults explicitly, and the settings its sweep found best).
    knobs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            jobs=2_000,
            fsm=300,
            inserts=2_000,
            latency=30,
            terminal=100_000,
            future=10_000,
            deadline=45.0,
            rounds=1,
        )


# -- what a system provides ---------------------------------------------------------------
class Fleet(Protocol):
    def pids(self) -> dict[str, list[int]]:
        """Process ids by role: "worker", and "supervisor" where there is one."""
        ...

    async def stop(self) -> None: ...


class System(Protocol):
    name: str
    version: str
    settings_note: str  # one sentence: how this system is configured
    unsupported: dict[str, str]  # workload -> why it cannot run

    async def setup(self) -> None:
        """Install the schema (the database exists and is empty)."""

    async def close(self) -> None: ...

    async def start_fleet(self, s: Settings) -> Fleet:
        """Start ``s.processes`` worker processes and return once they can take work."""
        ...

    async def mark(self) -> Any:
        """A position before a workload: ``done()`` counts only what comes after it."""

    async def ping(self) -> None:
        """``SELECT 1`` on a connection of the harness's own, which no producer uses."""

    async def done(self, kind: str, mark: Any) -> int:
        """Finished (committed) no-op jobs ("noop") or 5-step instances ("fsm", "fsm_inline")."""
        ...

    async def insert_noop_many(self, n: int, batch: int) -> None:
        """Insert n no-op jobs with the bulk API, ``batch`` per call."""

    async def insert_noop_one(self) -> None:
        """Insert one no-op job; called concurrently by ``Settings.producers`` tasks."""

    async def insert_fsm(self, n: int, inline: bool) -> None:
        """Start n 5-step instances."""

    async def insert_stamp(self, seq: int) -> None:
        """Insert one job that calls ``stamp(seq)`` first thing when it runs."""

    async def seed(self, terminal: int, future: int) -> None:
        """Add finished rows and rows scheduled a day ahead, then VACUUM ANALYZE and CHECKPOINT."""


# -- used inside jobs ---------------------------------------------------------------------
_stamp_sock: socket.socket | None = None


def stamp(seq: int) -> None:
    """Tell the benchmark that job ``seq`` started now (a datagram; no database work)."""
    global _stamp_sock
    path = os.environ.get(STAMP_ENV)
    if not path:
        return
    if _stamp_sock is None:
        _stamp_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _stamp_sock.setblocking(False)  # never stall a job: a full queue loses the sample
    with contextlib.suppress(OSError):
        _stamp_sock.sendto(f"{seq} {time.time()!r}".encode(), path)


def advance(state: dict[str, Any], k: int) -> dict[str, Any]:
    """Step k of a 5-step chain: the state every peer carries from one step to the next."""
    return {"n": state["n"], "trail": [*state.get("trail", []), k]}


class StampReceiver:
    """Collects the stamps as they arrive (a reader on the running event loop)."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.started: dict[int, float] = {}
        asyncio.get_running_loop().add_reader(self.sock, self.drain)

    def drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(256)
            except (BlockingIOError, InterruptedError):
                return
            seq, at = data.decode().split()
            self.started.setdefault(int(seq), float(at))

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# -- processes and memory -----------------------------------------------------------------
def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


class RssSampler:
    """Samples the RSS of every fleet process every 0.2 s in a thread; keeps the maximum."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.peak: dict[str, float] = {}  # "role:pid" -> MiB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self) -> dict[str, float]:
        out = {}
        for role, pids in self.fleet.pids().items():
            for pid in pids:
                value = rss_mib(pid)
                if value is not None:
                    out[f"{role}:{pid}"] = value
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.snapshot().items():
                self.peak[key] = max(self.peak.get(key, 0.0), value)
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def summarize_rss(sample: dict[str, float]) -> dict[str, Any]:
    by_role: dict[str, list[float]] = {}
    for key, value in sample.items():
        by_role.setdefault(key.split(":")[0], []).append(round(value, 1))
    return {
        "supervisor": max(by_role.get("supervisor", []), default=None),
        "workers": sorted(by_role.get("worker", [])),
        "total": round(sum(sample.values()), 1),
    }


class ProcessFleet:
    """Worker processes of a peer: ``<script> worker --dsn ... --index i``, each printing
    READY on stdout once it can take work. ``python``: the interpreter to run them with
    (this one by default: the peer's own script runs them from its own virtualenv)."""

    def __init__(
        self,
        script: str,
        dsn: str,
        s: Settings,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
    ):
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        for i in range(s.processes):
            log = Path(tempfile.mkstemp(prefix=f"bench-{Path(script).stem}-{i}-", suffix=".log")[1])
            self.logs.append(log)
            cmd = [python, script, "worker", "--dsn", dsn, "--index", str(i)]
            cmd += ["--concurrency", str(s.concurrency), "--knobs", json.dumps(s.knobs)]
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    stdout=subprocess.PIPE,
                    stderr=log.open("w"),
                    env={**os.environ, **(env or {})},
                    start_new_session=True,
                )
            )

    async def ready(self, timeout: float = 60.0) -> ProcessFleet:
        async def one(p: subprocess.Popen[bytes], log: Path) -> None:
            assert p.stdout is not None
            while True:  # a library may log to stdout before
                line = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), timeout)
                if not line:
                    raise RuntimeError(f"worker exited before READY: {log.read_text()[-2000:]}")
                if line.strip() == b"READY":
                    break
            # From now on nobody reads the pipe: send the rest where stderr goes.
            threading.Thread(target=_discard, args=(p.stdout,), daemon=True).start()

        try:
            await asyncio.gather(*(one(p, log) for p, log in zip(self.procs, self.logs, strict=True)))
        except BaseException:
            await self.stop()  # workers that never got ready are not left behind
            raise
        return self

    def pids(self) -> dict[str, list[int]]:
        return {"worker": [p.pid for p in self.procs if p.poll() is None]}

    async def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs:
            try:
                await asyncio.to_thread(p.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in self.logs:
            log.unlink(missing_ok=True)


def _discard(stream: Any) -> None:
    for _ in iter(stream.readline, b""):
        pass


def worker_ready() -> None:
    """Called by a peer's worker process when it can take work."""
    print("READY", flush=True)


# -- the workloads ------------------------------------------------------------------------
@dataclass
class Outcome:
    value: float | None = None  # the headline figure
    unit: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    note: str = ""


async def burst(
    system: System, kind: str, n: int, insert: Callable[[], Awaitable[None]], s: Settings
) -> Outcome:
    """Insert n (of ``kind``) into an idle fleet; time from the first insert until the last
    one is committed as finished."""
    mark = await system.mark()
    t0 = time.perf_counter()
    await insert()
    inserted = time.perf_counter() - t0
    finished = 0
    while True:
        finished = await system.done(kind, mark)
        if finished >= n or time.perf_counter() - t0 > s.deadline:
            break
        await asyncio.sleep(POLL)
    elapsed = time.perf_counter() - t0
    out = Outcome(
        finished / elapsed,
        "/s",
        {"n": n, "finished": finished, "seconds": round(elapsed, 3), "insert_seconds": round(inserted, 3)},
    )
    if finished < n:
        out.note = f"gave up after {s.deadline:.0f} s: {finished} of {n} finished"
    return out


async def rows_burst(system: System, kind: str, s: Settings) -> Outcome:
    """(b) with a row inserted by every step: ``fsm_insert`` in the step's transaction
    (pgdurable's ``transactional=True``, a DBOS datasource transaction), ``fsm_insert_own``
    on a connection of the step's own. Checks that 5 rows per instance were inserted."""
    insert = getattr(system, "insert_fsm_rows", None)
    if insert is None:
        return Outcome(note="n/a: not measured for this system")
    before = await system.rows()  # type: ignore[attr-defined]
    out = await burst(system, kind, s.fsm, lambda: insert(s.fsm, kind), s)
    out.detail["rows"] = await system.rows() - before  # type: ignore[attr-defined]
    return out


async def median_of(s: Settings, work: Callable[[], Awaitable[Outcome]]) -> Outcome:
    """Run a short throughput workload up to ``s.rounds`` times; keep the median round.

    A burst of 10,000 jobs lasts a second or two on the fast systems, where one noisy
    second on this shared machine moves the figure by 10 %; the median of three is
    steadier. Rounds stop once ``s.round_budget`` seconds have gone by (the slow systems
    measure for long enough in one round), so every system runs at least one.
    """
    t0 = time.perf_counter()
    outs = [await work()]
    while len(outs) < s.rounds and time.perf_counter() - t0 < s.round_budget:
        outs.append(await work())
    ranked = sorted(outs, key=lambda o: o.value or 0.0)
    out = ranked[(len(ranked) - 1) // 2]
    out.detail["rounds"] = [round(o.value or 0.0, 1) for o in outs]
    return out


async def insert_many(system: System, s: Settings) -> Outcome:
    t0 = time.perf_counter()
    await system.insert_noop_many(s.inserts, s.insert_batch)
    elapsed = time.perf_counter() - t0
    return Outcome(s.inserts / elapsed, "rows/s", {"n": s.inserts, "batch": s.insert_batch})


async def insert_concurrent(system: System, s: Settings) -> Outcome:
    per = s.inserts // s.producers

    async def producer() -> None:
        for _ in range(per):
            await system.insert_noop_one()

    await system.insert_noop_one()  # open pools and caches before the clock starts
    t0 = time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(s.producers)))
    elapsed = time.perf_counter() - t0
    return Outcome(per * s.producers / elapsed, "rows/s", {"n": per * s.producers, "producers": s.producers})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def latency(system: System, s: Settings, receiver: StampReceiver) -> Outcome:
    """One job at a time into an idle fleet: insert call → the job's first line."""
    sent: dict[int, float] = {}
    await asyncio.sleep(1.0)  # idle: every worker back asleep
    for seq in range(s.latency):
        await asyncio.sleep(random.uniform(0.15, 0.35))
        # Wake the machine, not the system: on a VM whose idle vCPUs halt, the first query
        # after 0.2 s of quiet takes ~7 ms longer whoever sends it (a bare SELECT 1: 0.1 ms
        # busy, 7.5 ms after 0.2 s idle). Unwarmed, every sample carries that hypervisor
        # delay and its jitter, whichever system is measured.
        await system.ping()
        receiver.drain()
        sent[seq] = time.time()
        await system.insert_stamp(seq)
    deadline = time.monotonic() + 10
    while len(receiver.started) < len(sent) and time.monotonic() < deadline:
        receiver.drain()
        await asyncio.sleep(0.05)
    ms = [(receiver.started[k] - sent[k]) * 1000 for k in sent if k in receiver.started]
    if not ms:
        return Outcome(None, "ms", note="no job started")
    detail = {f"p{int(q * 100)}": round(percentile(ms, q), 2) for q in (0.5, 0.95, 0.99)}
    detail.update(samples=len(ms), lost=len(sent) - len(ms), max=round(max(ms), 2))
    return Outcome(detail["p50"], "ms", detail)


async def produce(system: System, rate: float, tick: float) -> dict[str, Any]:
    """Insert no-op jobs at ``rate`` a second until SIGTERM or SIGINT: every ``tick`` seconds
    one bulk insert of the jobs due by then.

    Open loop, like the producers of an application: the schedule is the clock's, not the
    queue's, so a slow insert does not lower the rate — the jobs it delayed go in the next
    insert (``behind_max``: the most jobs ever due and not yet inserted).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker_ready()
    t0 = time.monotonic()
    inserted, behind_max, ticks = 0, 0, 0
    while not stop.is_set():
        due = int(rate * (time.monotonic() - t0))
        behind_max = max(behind_max, due - inserted)
        if due > inserted:
            await system.insert_noop_many(due - inserted, 1000)
            inserted = due
        ticks += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, t0 + ticks * tick - time.monotonic()))
    seconds = time.monotonic() - t0
    return {
        "inserted": inserted,
        "seconds": round(seconds, 1),
        "rate": round(inserted / seconds, 1) if seconds else None,
        "behind_max": behind_max,
    }


# -- the driver ---------------------------------------------------------------------------
class Run:
    def __init__(self, system: System, s: Settings, only: set[str] | None):
        self.system, self.s, self.only = system, s, only
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    def wanted(self, name: str) -> bool:
        return self.only is None or name in self.only or name.split("_")[0] in self.only

    async def step(self, name: str, work: Callable[[], Awaitable[Outcome]]) -> None:
        if not self.wanted(name):
            return
        if name in self.system.unsupported:
            self.results[name] = asdict(Outcome(note=f"n/a: {self.system.unsupported[name]}"))
            return
        print(f"[{self.system.name}] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            out = await work()
            self.results[name] = asdict(out)
        except Exception as exc:  # noqa: BLE001 - a failed workload is reported, the rest runs
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            self.results[name] = asdict(Outcome(note=f"failed: {type(exc).__name__}: {exc}"[:300]))
            traceback.print_exc()
        print(f"[{self.system.name}] {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


async def run_all(
    make_system: Callable[[str], System], dsn: str, insert_dsn: str, s: Settings, only: set[str] | None
) -> dict[str, Any]:
    sock_path = os.path.join(tempfile.mkdtemp(prefix="bench-stamp-"), "stamps")
    os.environ[STAMP_ENV] = sock_path  # inherited by every worker process
    receiver = StampReceiver(sock_path)
    system = make_system(dsn)
    run = Run(system, s, only)
    memory: dict[str, Any] = {}
    try:
        if any(run.wanted(n) for n in ("insert_many", "insert_concurrent")):
            inserter = make_system(insert_dsn)
            await inserter.setup()
            try:
                await run.step("insert_many", lambda: median_of(s, lambda: insert_many(inserter, s)))
                await run.step("insert_concurrent", lambda: insert_concurrent(inserter, s))
            finally:
                await inserter.close()

        await system.setup()
        if any(run.wanted(n) for n in ("noop", "fsm", "fsm_inline", "latency", "memory")):
            fleet = await system.start_fleet(s)
            try:
                await asyncio.sleep(1.0)
                sampler = RssSampler(fleet)
                memory["idle"] = summarize_rss(sampler.snapshot())
                with sampler:
                    await run.step(
                        "noop",
                        lambda: median_of(
                            s,
                            lambda: burst(
                                system, "noop", s.jobs, lambda: system.insert_noop_many(s.jobs, 1000), s
                            ),
                        ),
                    )
                memory["load"] = summarize_rss(sampler.peak)
                for kind, inline in (("fsm", False), ("fsm_inline", True)):
                    await run.step(
                        kind,
                        lambda kind=kind, inline=inline: burst(
                            system, kind, s.fsm, lambda: system.insert_fsm(s.fsm, inline), s
                        ),
                    )
                for kind in ("fsm_insert", "fsm_insert_own"):
                    await run.step(kind, lambda kind=kind: rows_burst(system, kind, s))
                await run.step("latency", lambda: latency(system, s, receiver))
            finally:
                await fleet.stop()

        if run.wanted("backlog"):

            async def backlog() -> Outcome:
                async def bursts() -> Outcome:
                    fleet = await system.start_fleet(s)
                    try:
                        await asyncio.sleep(1.0)
                        return await median_of(
                            s,
                            lambda: burst(
                                system, "noop", s.jobs, lambda: system.insert_noop_many(s.jobs, 1000), s
                            ),
                        )
                    finally:
                        await fleet.stop()

                # The reference: the same bursts right before the seeding (the table holds
                # what (a), (b) and (d) left), so that the machine's drift over the minutes
                # between (a) and (e) does not move the ratio.
                before = await bursts()
                t0 = time.perf_counter()
                await system.seed(s.terminal, s.future)
                seeded = time.perf_counter() - t0
                out = await bursts()
                out.detail.update(
                    terminal=s.terminal,
                    future=s.future,
                    seed_seconds=round(seeded, 1),
                    before_seeding=round(before.value or 0.0, 1),
                    before_rounds=before.detail["rounds"],
                    of_before=round(100 * (out.value or 0.0) / before.value, 1) if before.value else None,
                )
                return out

            await run.step("backlog", backlog)
    finally:
        await system.close()
        receiver.close()
    return {
        "system": system.name,
        "version": system.version,
        "settings_note": system.settings_note,
        "settings": asdict(s),
        "results": run.results,
        "memory": memory,
        "errors": run.errors,
    }


async def measure_one(
    make_system: Callable[[str], System], dsn: str, s: Settings, role: str, workload: str | None
) -> dict[str, Any]:
    """One measurement for ``bench/fair.py``: ``setup`` installs the schema (once per
    database); ``measure`` starts a fleet with ``s.knobs``, lets it go idle, runs one round
    of ``workload`` and stops the fleet (``insert_many`` runs without a fleet)."""
    system = make_system(dsn)
    if role == "setup":
        try:
            await system.setup()
        finally:
            await system.close()
        return {"system": system.name, "version": system.version}
    sock_path = os.path.join(tempfile.mkdtemp(prefix="bench-stamp-"), "stamps")
    os.environ[STAMP_ENV] = sock_path  # inherited by every worker process
    receiver = StampReceiver(sock_path)
    out: Outcome
    try:
        if hasattr(system, "prepare"):
            await system.prepare()  # per-process state that setup() would have made
        if workload == "insert_many":
            out = await insert_many(system, s)
        else:
            fleet = await system.start_fleet(s)
            try:
                await asyncio.sleep(1.0)
                if workload == "noop":
                    out = await burst(
                        system, "noop", s.jobs, lambda: system.insert_noop_many(s.jobs, 1000), s
                    )
                elif workload in ("fsm", "fsm_inline"):
                    inline = workload == "fsm_inline"
                    out = await burst(system, workload, s.fsm, lambda: system.insert_fsm(s.fsm, inline), s)
                elif workload == "latency":
                    out = await latency(system, s, receiver)
                else:
                    raise ValueError(f"unknown workload {workload!r}")
            finally:
                await fleet.stop()
    except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
        traceback.print_exc()
        out = Outcome(note=f"failed: {type(exc).__name__}: {exc}"[:300])
    finally:
        await system.close()
        receiver.close()
    return {"system": system.name, "version": system.version, "knobs": s.knobs, **asdict(out)}


def main(make_system: Callable[[str], System], worker: Callable[[argparse.Namespace], None] | None) -> None:
    """Entry point of a system's script: ``run`` (the workloads), ``worker`` (one worker
    process of a peer's fleet), ``setup`` (install the schema), ``measure`` (one round of a
    workload, for ``bench/fair.py``) or ``produce`` (no-op jobs at ``--rate`` a second until
    SIGTERM; READY on stdout once started, then a line of JSON)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["run", "worker", "setup", "measure", "produce"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--insert-dsn", help="an empty database for the insert workloads")
    parser.add_argument("--settings", default="{}", help="JSON of Settings fields")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="comma-separated workloads")
    parser.add_argument("--out", help="also write the JSON result here")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--knobs", default="{}", help="JSON: the system's own settings (workers)")
    parser.add_argument("--workload", help="measure: noop, fsm, fsm_inline, latency or insert_many")
    parser.add_argument("--rate", type=float, default=300.0, help="produce: jobs per second")
    parser.add_argument("--tick", type=float, default=0.1, help="produce: seconds between inserts")
    args = parser.parse_args()
    if args.role == "worker":
        assert worker is not None
        args.knobs = json.loads(args.knobs)
        worker(args)
        return
    if args.role == "produce":

        async def one() -> dict[str, Any]:
            system = make_system(args.dsn)
            try:
                return await produce(system, args.rate, args.tick)
            finally:
                await system.close()

        print(json.dumps(asyncio.run(one())), flush=True)
        return
    base = Settings.quick() if args.quick else Settings()
    s = Settings(**{**asdict(base), **json.loads(args.settings)})
    if args.role in ("setup", "measure"):
        result = asyncio.run(measure_one(make_system, args.dsn, s, args.role, args.workload))
        print(json.dumps(result))
        return
    only = set(args.only.split(",")) if args.only else None
    result = asyncio.run(run_all(make_system, args.dsn, args.insert_dsn or args.dsn, s, only))
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
