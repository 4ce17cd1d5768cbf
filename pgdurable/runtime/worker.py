"""A worker process: one queue, one event loop, its own pool; claim → run → group commit.

``main`` is the first code a forked worker runs: it resets what it inherited from the
supervisor and starts the loop. ``Worker`` is the process's composition root: it builds the
``Runtime`` and the components, each with the one lifecycle of ``lifecycle.Component``:

- the flusher (group commit of outcomes),
- the slots (the rows held and the steps running),
- the feeder (claims, on a connection of its own that also LISTENs, see ``feedconn``),
- the heartbeat (extends the leases held),
- the reporter (a JSON line a second to the supervisor, and the process title).

Stopping (SIGTERM): the feeder stops claiming, the slots give the prefetched rows back and
let in-flight steps finish within the drain timeout, then cancel and give back what is
left; the flusher commits what waits; exit 0.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import setproctitle
from psycopg_pool import AsyncConnectionPool

from pgdurable.contract.fsm import Registry
from pgdurable.engine import Engine
from pgdurable.engine.executor import Executor
from pgdurable.engine.transactional import any_transactional
from pgdurable.runtime.board import RunningBoard
from pgdurable.runtime.config import Config
from pgdurable.runtime.context import Pool, Runtime
from pgdurable.runtime.feedconn import FeedConnection
from pgdurable.runtime.feeder import Feeder
from pgdurable.runtime.flusher import Flusher
from pgdurable.runtime.forked import reset_after_fork, run_loop, tune_gc
from pgdurable.runtime.heartbeat import Heartbeat
from pgdurable.runtime.isolation import StepPool
from pgdurable.runtime.lifecycle import Component
from pgdurable.runtime.metrics import WorkerMetrics
from pgdurable.runtime.observe.tracing import worker_tracer
from pgdurable.runtime.reporter import Reporter
from pgdurable.runtime.slots import Slots

log = logging.getLogger("pgdurable.worker")

#: How long a stopping feeder may take to finish the claim it is in before it is cancelled.
FEEDER_STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor hands a worker process it forks."""

    cfg: Config
    dsn: str
    queue: str
    index: int
    registry: Registry
    worker_id: str
    report_fd: int | None = None
    board: RunningBoard | None = None


class Worker:
    """The composition root of one worker process."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        settings = spec.cfg.queues[spec.queue]
        self._threads = ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix=f"step-{spec.queue}"
        )

        def run_sync(fn: Any, *args: Any) -> asyncio.Future[Any]:
            # As asyncio.to_thread does: the step's context variables (its log capture, its
            # trace span) follow it into the thread.
            ctx = contextvars.copy_context()
            return asyncio.get_running_loop().run_in_executor(self._threads, ctx.run, fn, *args)

        cfg = spec.cfg
        # isolation = "process": sync steps run in step processes (spawned on first use).
        self._processes = StepPool(cfg, spec.queue) if settings.isolation == "process" else None
        self.executor = Executor(
            spec.registry,
            run_sync=run_sync,
            logger=log,
            limits=cfg.limits,
            processes=self._processes,
            capture=cfg.logging.capture_settings(),
        )
        self.engine = Engine(
            spec.registry,
            schema=cfg.database.schema,
            worker_id=spec.worker_id,
            lease=dt.timedelta(seconds=cfg.runtime.lease),
            executor=self.executor,
            limits=cfg.limits,
            history_off=() if settings.history else (spec.queue,),
            tracer=worker_tracer(cfg),
        )

    async def _configure(self, conn: Any) -> None:
        """Each pooled connection plans its statements for their parameters (the flush's
        ids): see ``session_plan_custom``."""
        await conn.execute(self.engine.q["session_plan_custom"])

    async def run(self) -> int:
        spec, cfg = self.spec, self.spec.cfg
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        txn_slots = cfg.queues[spec.queue].concurrency if any_transactional(spec.registry) else 0
        pool: Pool = AsyncConnectionPool(
            spec.dsn,
            # A transactional step holds a connection while it runs: one each, besides the
            # flusher's, the heartbeat's and the claims', opened up front (a pool growing one
            # connection at a time would stall the first burst of them).
            min_size=2 + txn_slots,
            max_size=4 + txn_slots,
            kwargs={"autocommit": True, "application_name": f"pgdurable worker {spec.queue}"},
            configure=self._configure,
            open=False,
        )
        await pool.open(wait=True, timeout=30)
        rt = Runtime(cfg, spec.dsn, spec.queue, spec.index, self.engine, pool, log, stopping=stopping)
        if cfg.metrics.listen is not None:
            rt.metrics = WorkerMetrics()
        feed: FeedConnection | None = None
        components: list[Component] = []
        failed = False
        try:
            channel = await self._channel(pool)
            flusher = Flusher(rt)
            slots = Slots(rt, flusher, spec.board)
            self.executor.on_overdue = slots.hold_overdue
            feed = FeedConnection(
                spec.dsn, spec.queue, channel, probe_every=cfg.runtime.heartbeat, on_connect=slots.wake.set
            )
            feeder = Feeder(rt, slots, feed)
            flusher.on_delayed = feeder.due_in
            components = [
                flusher,
                slots,
                Heartbeat(rt, slots),
                Reporter(
                    spec.report_fd,
                    partial(_snapshot, rt, slots, feed),
                    partial(_title, rt, slots),
                    stopping.set,
                ),
                feeder,
            ]
            for c in components:
                c.start()
            failed = await self._until_stop(rt, components)
            # Two phases, in order: stop claiming; drain the slots (their outcomes reach the
            # flusher); commit what waits; then the rest.
            await feeder.stop(FEEDER_STOP_TIMEOUT)
            await slots.stop(cfg.runtime.drain_timeout)
            await flusher.stop(cfg.runtime.drain_timeout)
        finally:
            for c in reversed(components):
                await c.stop()  # no-ops for those stopped above; cancels the rest
            if feed is not None:
                await feed.close()
            if self._processes is not None:
                await self._processes.close()
            await pool.close()
            # An overdue thread is not waited for: the process ends with os._exit.
            self._threads.shutdown(wait=False, cancel_futures=True)
        return 1 if failed else 0

    async def _channel(self, pool: Pool) -> str:
        async with pool.connection() as conn:
            cur = await conn.execute(self.engine.q["queue_channel"], {"queue": self.spec.queue})
            row = await cur.fetchone()
        assert row is not None
        return str(row[0])

    @staticmethod
    async def _until_stop(rt: Runtime, components: list[Component]) -> bool:
        """Wait for a stop request, or a component that died; True for the latter."""
        stop = asyncio.ensure_future(rt.stopping.wait())
        tasks = [c.task for c in components if c.task is not None]
        try:
            await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        return any(c.failed() is not None for c in components)


def _snapshot(rt: Runtime, slots: Slots, feed: FeedConnection) -> dict[str, Any]:
    """A worker's report: load, held rows, errors, and whether its LISTEN answers."""
    listening = feed.listening and rt.clock() - feed.seen < 3 * rt.cfg.runtime.heartbeat + 5
    return {
        "role": "worker",
        "worker": rt.worker_id,
        "queue": rt.queue,
        "busy": slots.busy,
        "overdue": len(slots.overdue),  # slots held by steps past their timeout
        "overdue_total": rt.stats.overdue,
        "buffered": len(slots.buffer),
        "held": len(slots.held()),
        "concurrency": rt.settings.concurrency,
        "steps": rt.stats.steps,
        "stale": rt.stats.stale,
        "errors": rt.stats.errors,
        "limit_errors": rt.engine.limit_errors,
        "last_error": rt.stats.last_error,
        "listening": listening,
    } | ({} if rt.metrics is None else {"metrics": rt.metrics.snapshot()})


def _title(rt: Runtime, slots: Slots) -> str:
    settings = rt.settings
    busy = f"busy {slots.busy}/{settings.concurrency}"
    overdue = f" overdue {len(slots.overdue)}" if slots.overdue else ""
    return f"pgdurable: worker {rt.queue} {rt.index + 1}/{settings.processes} {busy}{overdue}"


def main(spec: WorkerSpec, *, parent_pid: int, signal_mask: set[int | signal.Signals]) -> int:
    """Run a forked worker process to its end; returns its exit code."""
    reset_after_fork(parent_pid, signal_mask, spec.report_fd)
    tune_gc()
    processes = spec.cfg.queues[spec.queue].processes
    setproctitle.setproctitle(f"pgdurable: worker {spec.queue} {spec.index + 1}/{processes}")
    log.debug("worker %s starting", spec.worker_id, extra={"event": "worker_starting", "queue": spec.queue})
    return run_loop(Worker(spec).run())
