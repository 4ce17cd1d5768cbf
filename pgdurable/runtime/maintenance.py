"""The maintenance process: one per supervisor, forked and restarted like a worker.

It runs the sweeps — the reaper, await deadlines, expiry and instance deadlines, garbage
collection, the look for queues no worker serves — and the cron component that fires
schedules (``sweeps.cron``), each a component
with the one lifecycle, on their own short-lived connections, so a slow sweep (a large GC)
never stalls the supervisor's loop (reaping, restarts, the systemd watchdog). It reports to
the supervisor once a second over the same pipe as the workers.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

import psycopg
import setproctitle

from pgdurable.contract.fsm import Registry
from pgdurable.db.queries import for_schema
from pgdurable.runtime.config import Config
from pgdurable.runtime.forked import reset_after_fork, run_loop
from pgdurable.runtime.lifecycle import Component
from pgdurable.runtime.reporter import Reporter
from pgdurable.runtime.sweeps.awaits import AwaitDeadlines
from pgdurable.runtime.sweeps.base import Sweep
from pgdurable.runtime.sweeps.cron import Cron
from pgdurable.runtime.sweeps.deadlines import Deadlines
from pgdurable.runtime.sweeps.gc import Collector
from pgdurable.runtime.sweeps.horizon import SnapshotWatch
from pgdurable.runtime.sweeps.reaper import Reaper
from pgdurable.runtime.sweeps.unserved import UnservedQueues

log = logging.getLogger("pgdurable.maintenance")

#: How long a stopping sweep may take to finish the pass it is in before it is cancelled.
SWEEP_STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class MaintenanceSpec:
    cfg: Config
    dsn: str
    registry: Registry
    report_fd: int | None = None


class Maintenance:
    """The composition root of the maintenance process."""

    def __init__(self, spec: MaintenanceSpec):
        self.spec = spec
        cfg = spec.cfg
        queries = for_schema(cfg.database.schema)
        m = cfg.maintenance
        self.sweeps: list[Sweep] = [
            Reaper(
                self.connect, queries, spec.registry, cfg.runtime.max_crashes, m.interval, cfg.runtime.lease
            ),
            AwaitDeadlines(self.connect, queries, m.interval, log),
            Deadlines(self.connect, queries, m.interval),
            Collector(self.connect, queries, m.gc_interval, m.retention, m.gc_batch),
        ]
        if m.queue_check_interval > 0:
            self.sweeps.append(UnservedQueues(self.connect, queries, m.queue_check_interval, log))
        if m.snapshot_warning > 0:
            every = min(60.0, m.snapshot_warning)
            self.sweeps.append(SnapshotWatch(self.connect, queries, every, m.snapshot_warning, log))
        self.cron = Cron(self.connect, spec.dsn, queries, m.interval)

    def connect(self) -> psycopg.Connection[Any]:
        # Bounded, so that a stop never waits long on a sweep.
        return psycopg.connect(
            self.spec.dsn,
            autocommit=True,
            connect_timeout=10,
            options="-c statement_timeout=10000",
            application_name="pgdurable maintenance",
        )

    def snapshot(self) -> dict[str, Any]:
        return {
            "role": "maintenance",
            "sweeps": {s.name: s.runs for s in self.sweeps} | {"cron": self.cron.runs},
            "errors": sum(s.failures for s in self.sweeps) + self.cron.failures,
            "cron_fired": self.cron.fired,
        }

    async def run(self) -> int:
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        reporter = Reporter(
            self.spec.report_fd, self.snapshot, lambda: "pgdurable: maintenance", stopping.set
        )
        components: list[Component] = [reporter, *self.sweeps, self.cron]
        for c in components:
            c.start()
        stop = asyncio.ensure_future(stopping.wait())
        tasks = [c.task for c in components if c.task is not None]
        try:
            await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            failed = any(c.failed() is not None for c in components)
            await asyncio.gather(*(s.stop(SWEEP_STOP_TIMEOUT) for s in [*self.sweeps, self.cron]))
            await reporter.stop()
        return 1 if failed else 0


def main(spec: MaintenanceSpec, *, parent_pid: int, signal_mask: set[int | signal.Signals]) -> int:
    """Run the forked maintenance process to its end; returns its exit code."""
    reset_after_fork(parent_pid, signal_mask, spec.report_fd)
    setproctitle.setproctitle("pgdurable: maintenance")
    return run_loop(Maintenance(spec).run())
