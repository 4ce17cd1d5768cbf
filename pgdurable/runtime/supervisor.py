"""``pgdurable supervise config.toml``: one per host. Forks per-queue workers and one
maintenance process, replaces the ones that die (returning a dead worker's rows at once),
talks to systemd.

The supervisor itself is a plain synchronous loop: no event loop, no threads, and no
connection open while it forks, so every child starts clean. Its own database work (the
reclaims) runs on short-lived connections; the sweeps run in the maintenance process
(``runtime.maintenance``). Children report over a pipe, one JSON line a second.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import setproctitle

from pgdurable.contract.errors import ConfigError, PgdurableError
from pgdurable.contract.fsm import Registry
from pgdurable.db import migrations
from pgdurable.db.queries import for_schema
from pgdurable.engine import schedules
from pgdurable.engine.pipeline import registration
from pgdurable.runtime import config as config_mod
from pgdurable.runtime import logs
from pgdurable.runtime.board import RunningBoard
from pgdurable.runtime.config import Config
from pgdurable.runtime.identity import node_key
from pgdurable.runtime.sweeps.reaper import reclaim
from pgdurable.runtime.systemd import Notifier

if TYPE_CHECKING:
    from pgdurable.runtime.observe.exporter import LiveWorker, NodeMetrics

log = logging.getLogger("pgdurable.supervisor")

RESTART_BACKOFF = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_HANDLED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


#: The slot key of the maintenance process (queues are keyed by (name, index >= 0)).
MAINTENANCE = ("", -1)


@dataclass
class ChildProcess:
    queue: str
    index: int
    pid: int
    worker_id: str
    fd: int
    generation: int
    board: RunningBoard | None  # None for the maintenance process: it holds no rows
    started: float = field(default_factory=time.monotonic)
    last_report: dict[str, Any] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    buf: bytes = b""


@dataclass
class Slot:
    """A (queue, index) position that should always have a worker."""

    queue: str
    index: int
    failures: int = 0
    restart_at: float = 0.0

    @property
    def maintenance(self) -> bool:
        return (self.queue, self.index) == MAINTENANCE


class Supervisor:
    def __init__(self, cfg: Config, *, notifier: Notifier | None = None, log_level: str | None = None):
        self.cfg = cfg
        self.log_level = log_level  # --log-level: wins over [logging] level, reloads included
        self.host = socket.gethostname()
        # The owner prefix of this incarnation; HOST:KEY: is what its successors look for.
        self.node_prefix = f"{self.host}:{node_key(cfg.path, cfg.runtime.node_id)}:"
        self.node = f"{self.node_prefix}{os.getpid()}:{os.urandom(3).hex()}"
        self.notifier = notifier or Notifier()
        self.children: dict[int, ChildProcess] = {}
        self.slots: dict[tuple[str, int], Slot] = {}
        self.generation = 0
        self.stopping = False
        self.sel = selectors.DefaultSelector()
        self._signals: list[int] = []
        self._embedded: Any = None
        self.dsn = ""
        self.registry = Registry()
        self._next_status = 0.0
        self._ready = False
        self._ready_sent = False  # READY=1 reached systemd (re-sent with each status until then)
        self.metrics: NodeMetrics | None = None  # [metrics] listen: the Prometheus endpoint

    # -- start -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Import the user modules, resolve the database, check the schema — before forking."""
        sys.path.insert(0, str(self.cfg.base_dir))
        config_mod.import_modules(self.cfg)  # a module that fails to import: one line naming it
        self.registry = Registry.from_modules(self.cfg.runtime.modules)
        if self.cfg.tracing.enabled:
            from pgdurable.runtime.observe.tracing import setup_hook

            setup_hook(self.cfg)  # found before any worker is forked, or a clear error now
        dsn = self.cfg.dsn()
        if dsn is None:
            from pgdurable.runtime.embedded import start

            data = Path(self.cfg.database.data_dir)
            if not data.is_absolute():
                data = self.cfg.base_dir / data
            log.info("starting the embedded PostgreSQL in %s", data, extra={"event": "embedded_start"})
            self._embedded = start(data, cleanup="stop")
            dsn = str(self._embedded.get_uri())
            with psycopg.connect(dsn, autocommit=True) as conn:
                migrations.migrate(conn, self.cfg.database.schema)
        self.dsn = dsn
        queries = for_schema(self.cfg.database.schema)
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrations.check(conn, self.cfg.database.schema)
            machines, held = registration(self.registry)
            if machines["names"]:
                with conn.transaction():
                    conn.execute(queries["machine_register_many"], machines)
                    conn.execute(queries["instance_release_held"], held)
            # The @schedule declarations, by name; an operator's run-time changes are kept.
            schedules.register(conn, queries, self.registry.machines())
        unknown = sorted(set(self.cfg.queues) - set(self.registry.queues()))
        if unknown:
            log.warning(
                "queues %s run no machine of the configured modules",
                unknown,
                extra={"event": "queue_unused", "queues": unknown},
            )

    def run(self) -> int:
        self.prepare()
        self._install_signals()
        self._start_metrics()
        self._reclaim_dead_incarnations()
        self._spawn_all()
        setproctitle.setproctitle(f"pgdurable: supervisor {self.cfg.path}")
        try:
            while True:
                self._tick()
                if self.stopping and not self.children:
                    break
        finally:
            if self.metrics is not None:
                self.metrics.endpoint.close()
            self.notifier.send("STOPPING=1")
            self.notifier.close()
        log.info("supervisor stopped", extra={"event": "stopped"})
        return 0

    # -- signals ---------------------------------------------------------------------------
    def _install_signals(self) -> None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        os.set_blocking(r, False)
        self._sigpipe = r
        signal.set_wakeup_fd(w)
        for sig in _HANDLED:
            signal.signal(sig, self._on_signal)
        self.sel.register(r, selectors.EVENT_READ, "signal")

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._sigpipe, 4096)
        while self._signals:
            sig = self._signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                self._begin_stop()
            elif sig == signal.SIGHUP and not self.stopping:
                self._reload()

    # -- workers ---------------------------------------------------------------------------
    def _spawn_all(self) -> None:
        self.generation += 1
        self.slots = {
            (name, i): Slot(name, i)
            for name, settings in self.cfg.queues.items()
            for i in range(settings.processes)
        }
        if self.cfg.maintenance.enabled:
            self.slots[MAINTENANCE] = Slot(*MAINTENANCE)
        for slot in self.slots.values():
            self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        r, w = os.pipe()
        parent_pid = os.getpid()
        role = "maintenance" if slot.maintenance else f"{slot.queue}/{slot.index}"
        worker_id = f"{self.node}/{role}"
        board = None if slot.maintenance else RunningBoard(self.cfg.queues[slot.queue].concurrency)
        # Signals stay blocked across the fork until the child installed its own handlers,
        # so a SIGTERM in between is delivered to the child's handler, not lost.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        pid = os.fork()
        if pid == 0:  # the child: nothing of ours is open but the pipe
            os.close(r)
            if self.metrics is not None:
                self.metrics.endpoint.forget()
            code = 1
            try:
                code = self._child_main(slot, f"{worker_id}/{os.getpid()}", w, parent_pid, old_mask, board)
            except BaseException:
                logging.getLogger("pgdurable.worker").exception(
                    "%s crashed", role, extra={"event": "child_crashed"}
                )
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(w)
        os.set_blocking(r, False)
        child = ChildProcess(slot.queue, slot.index, pid, f"{worker_id}/{pid}", r, self.generation, board)
        self.children[pid] = child
        self.sel.register(r, selectors.EVENT_READ, pid)
        if self.metrics is not None:
            self.metrics.node.started("maintenance" if slot.maintenance else "worker", slot.queue)
        if slot.maintenance:
            log.info(
                "maintenance process %s started", pid, extra={"event": "maintenance_started", "child": pid}
            )
        else:
            log.info(
                "worker %s started for queue %s",
                pid,
                slot.queue,
                extra={
                    "event": "worker_started",
                    "child": pid,
                    "queue": slot.queue,
                    "worker": child.worker_id,
                },
            )

    def _child_main(
        self,
        slot: Slot,
        worker_id: str,
        report_fd: int,
        parent_pid: int,
        mask: set[int | signal.Signals],
        board: RunningBoard | None,
    ) -> int:
        """Runs in the forked child (imports what only the child needs)."""
        if slot.maintenance:
            from pgdurable.runtime import maintenance

            mspec = maintenance.MaintenanceSpec(self.cfg, self.dsn, self.registry, report_fd)
            return maintenance.main(mspec, parent_pid=parent_pid, signal_mask=mask)
        from pgdurable.runtime import worker

        spec = worker.WorkerSpec(
            cfg=self.cfg,
            dsn=self.dsn,
            queue=slot.queue,
            index=slot.index,
            registry=self.registry,
            worker_id=worker_id,
            report_fd=report_fd,
            board=board,
        )
        return worker.main(spec, parent_pid=parent_pid, signal_mask=mask)

    def _read_reports(self, pid: int) -> None:
        child = self.children.get(pid)
        if child is None:
            return
        try:
            data = os.read(child.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(child.fd)
            os.close(child.fd)
            child.fd = -1
            return
        child.buf += data
        *lines, child.buf = child.buf.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                child.last_report = json.loads(line)
                child.last_seen = time.monotonic()
        if not self._ready and self._all_reported():
            self._ready = True
            self._status_and_watchdog()  # READY=1 goes out with this status

    def _all_reported(self) -> bool:
        return bool(self.children) and all(c.last_report for c in self.children.values())

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.metrics is not None and pid in self.children:
                self._drain_reports(pid)  # its last report line carries its final totals
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.fd >= 0:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(child.fd)
                os.close(child.fd)
            code = os.waitstatus_to_exitcode(status)
            graceful = code == 0 and (self.stopping or child.generation != self.generation)
            if self.metrics is not None:
                process = "worker" if child.board is not None else "maintenance"
                if child.board is not None:
                    self.metrics.ended(child.queue, child.last_report)
                if not graceful:
                    self.metrics.node.died(process, child.queue)
            if not graceful and child.board is None:
                log.warning(
                    "maintenance process %s died (exit %s)",
                    pid,
                    code,
                    extra={"event": "maintenance_died", "child": pid, "exit_code": code},
                )
            elif not graceful:
                log.warning(
                    "worker %s of queue %s died (exit %s)",
                    pid,
                    child.queue,
                    code,
                    extra={
                        "event": "worker_died",
                        "child": pid,
                        "queue": child.queue,
                        "worker": child.worker_id,
                        "exit_code": code,
                    },
                )
            if child.board is not None:
                # Whatever it still held goes back now, not when its leases expire; a crash
                # is counted only for the steps it had started, not for its prefetched rows.
                self._reclaim(workers=[child.worker_id], crashed=child.board.running(), cause="worker_died")
                child.board.close()
            slot = self.slots.get((child.queue, child.index))
            if slot is not None and not self.stopping and child.generation == self.generation:
                alive = time.monotonic() - child.started
                slot.failures = 0 if alive > 60 else slot.failures + 1
                slot.restart_at = (
                    time.monotonic() + RESTART_BACKOFF[min(slot.failures, len(RESTART_BACKOFF) - 1)]
                )

    def _drain_reports(self, pid: int) -> None:
        """Read what an ended child still left in its pipe."""
        child = self.children[pid]
        while child.fd >= 0:
            before = len(child.buf), child.last_report
            self._read_reports(pid)
            if (len(child.buf), child.last_report) == before:
                return  # nothing more (a step process may still hold the pipe open)

    def _restart_due(self) -> None:
        if self.stopping:
            return
        running = {(c.queue, c.index) for c in self.children.values() if c.generation == self.generation}
        now = time.monotonic()
        for key, slot in self.slots.items():
            if key not in running and slot.restart_at <= now:
                self._spawn(slot)

    # -- stop and reload -------------------------------------------------------------------
    def _begin_stop(self) -> None:
        log.info("draining", extra={"event": "draining"})
        self.stopping = True
        self.notifier.send("STOPPING=1")
        self._stop_deadline = time.monotonic() + self.cfg.runtime.drain_timeout + 10
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)

    def _reload(self) -> None:
        try:
            cfg = config_mod.load(self.cfg.path)
        except PgdurableError as exc:
            log.error("reload refused: %s", exc, extra={"event": "reload_refused"})
            return
        if cfg.runtime.modules != self.cfg.runtime.modules or cfg.database != self.cfg.database:
            log.error(
                "reload refused: database and modules need a restart", extra={"event": "reload_refused"}
            )
            return
        log.info("reloading", extra={"event": "reload"})
        old = list(self.children.values())
        if cfg.logging != self.cfg.logging:
            logs.configure(cfg.logging, self.log_level)  # before the fork: the new children inherit it
        self.cfg = cfg
        self._spawn_all()  # new generation first, then the old one drains
        for child in old:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)

    # -- the loop --------------------------------------------------------------------------
    def _tick(self) -> None:
        timeout = 0.5
        for key, _ in self.sel.select(timeout):
            if key.data == "signal":
                self._handle_signals()
            elif self.metrics is not None and self.metrics.endpoint.owns(key):
                self.metrics.endpoint.ready(key)
            else:
                self._read_reports(key.data)
        if self.metrics is not None:
            self.metrics.endpoint.expire()
        self._handle_signals()
        self._reap()
        self._restart_due()
        now = time.monotonic()
        if self.stopping:
            if now > self._stop_deadline:
                for child in self.children.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)
            return
        if now >= self._next_status:
            self._next_status = now + 1.0
            self._status_and_watchdog()

    # -- database work (short connections) -------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        # Bounded: the supervisor's loop also feeds systemd's watchdog.
        return psycopg.connect(
            self.dsn, autocommit=True, connect_timeout=10, options="-c statement_timeout=10000"
        )

    def _reclaim(
        self,
        *,
        workers: Sequence[str] = (),
        nodes: Sequence[str] = (),
        expired: bool = False,
        crashed: Sequence[int] | None = None,
        cause: str = "dead_incarnation",
    ) -> int:
        """Return rows of dead owners to runnable. ``crashed``: the ids whose step had started
        (a crash counts only for them); None counts a crash for every reclaimed row."""

        try:
            with self._connect() as conn:
                n = reclaim(
                    conn,
                    for_schema(self.cfg.database.schema),
                    self.registry,
                    self.cfg.runtime.max_crashes,
                    lease=dt.timedelta(seconds=self.cfg.runtime.lease),
                    workers=workers,
                    nodes=nodes,
                    expired=expired,
                    crashed=crashed,
                    cause=cause,
                )
            if self.metrics is not None:
                self.metrics.node.reclaim(cause, n)
            return n
        except psycopg.Error as exc:
            log.warning("reclaim failed: %r", exc, extra={"event": "reclaim_failed", "cause": cause})
            return 0

    def _reclaim_dead_incarnations(self) -> None:
        """Rows held by a previous supervisor of this host whose process is gone."""
        queries = for_schema(self.cfg.database.schema)
        with self._connect() as conn:
            nodes = [
                r[0] for r in conn.execute(queries["instance_node_owners"], {"prefix": self.node_prefix})
            ]
        dead = [n for n in nodes if n != self.node and not _supervisor_alive(int(n.split(":")[-2]))]
        if dead:
            self._reclaim(nodes=dead)

    # -- metrics ---------------------------------------------------------------------------
    def _start_metrics(self) -> None:
        """Open the Prometheus endpoint (``[metrics] listen``); imports prometheus_client."""
        settings = self.cfg.metrics
        if settings.listen is None:
            return
        from pgdurable.runtime.observe.exporter import NodeMetrics

        self.metrics = NodeMetrics(
            settings.address(), self._live_workers, self._instance_counts, settings.database_interval
        )
        try:
            self.metrics.endpoint.open(self.sel)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {settings.listen}: {exc.strerror}",
                file=self.cfg.path,
                key="metrics.listen",
            ) from exc
        log.info(
            "metrics at http://%s/metrics",
            settings.listen,
            extra={"event": "metrics_listening", "listen": settings.listen},
        )

    def _live_workers(self) -> list[LiveWorker]:
        from pgdurable.runtime.observe.exporter import LiveWorker

        return [LiveWorker(c.queue, c.last_report) for c in self.children.values() if c.board is not None]

    def _instance_counts(self) -> list[tuple[str, str, int, float | None]]:
        queries = for_schema(self.cfg.database.schema)
        with self._connect() as conn:
            return [tuple(r) for r in conn.execute(queries["metrics_instances"])]

    # -- health ----------------------------------------------------------------------------
    def _status(self) -> str:
        workers = [c for c in self.children.values() if c.board is not None]
        busy = sum(int(c.last_report.get("busy", 0)) for c in workers)
        cap = sum(int(c.last_report.get("concurrency", 0)) for c in workers)
        steps = sum(int(c.last_report.get("steps", 0)) for c in workers)
        held = sum(int(c.last_report.get("limit_errors", 0)) for c in workers)
        overdue = sum(int(c.last_report.get("overdue", 0)) for c in workers)
        status = f"{len(workers)} workers, busy {busy}/{cap}, {steps} steps"
        status += f", {overdue} overdue" if overdue else ""  # slots held by steps past their timeout
        return status + (f", {held} held by misconfigured limits" if held else "")

    def _healthy(self) -> bool:
        now = time.monotonic()
        expected = len(self.slots)
        current = [c for c in self.children.values() if c.generation == self.generation]
        return (
            len(current) == expected
            and all(now - c.last_seen < max(5.0, 2 * self.cfg.runtime.heartbeat) for c in current)
            and all(c.last_report.get("listening") for c in current if c.board is not None)
        )

    def _status_and_watchdog(self) -> None:
        status = self._status()
        setproctitle.setproctitle(f"pgdurable: supervisor {self.cfg.path} {status}")
        lines = [f"STATUS={status}"]
        if self._ready and not self._ready_sent:
            lines.insert(0, "READY=1")
        if self._ready and self._healthy():
            lines.append("WATCHDOG=1")
        if self.notifier.send(*lines) and lines[0] == "READY=1":
            self._ready_sent = True


def _supervisor_alive(pid: int) -> bool:
    """Whether a pgdurable supervisor still runs as ``pid`` on this host.

    Our own pid means a previous incarnation that had the same pid (a container's pid 1);
    a live pid running something else was reused.
    """
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return b"pgdurable" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: assume alive, the reaper is the floor


def supervise(path: str, log_level: str | None = None) -> int:
    """``pgdurable supervise``: load the config, set up logging (``log_level`` wins over
    ``[logging] level``), run until drained; returns the exit status."""
    cfg = config_mod.load(path)
    logs.configure(cfg.logging, log_level)
    return Supervisor(cfg, log_level=log_level).run()
