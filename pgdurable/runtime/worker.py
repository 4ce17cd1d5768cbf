"""A worker process: one queue, one event loop, its own pool; claim → run → group commit.

Components, each with start/stop: the feeder (claims batches sized to free slots plus
prefetch and starts steps, on a connection of its own that also LISTENs on the queue's
channel, see feedconn.py), the flusher (commits the outcomes that wait together in one
transaction), and the heartbeat (one statement extends every lease held, then a report to
the supervisor over the pipe).

Stopping (SIGTERM): stop claiming, give the prefetched rows back, let in-flight steps finish
within the drain timeout, cancel and give back what is left, flush, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
import setproctitle
from psycopg_pool import AsyncConnectionPool

from pgdurable.contract.fsm import Registry
from pgdurable.engine.claim import Claimed
from pgdurable.engine.commit import continued
from pgdurable.engine.executor import Executor, Result
from pgdurable.engine.pipeline import Engine
from pgdurable.runtime.board import RunningBoard
from pgdurable.runtime.config import Config, Queue
from pgdurable.runtime.feedconn import FeedConnection

log = logging.getLogger("pgdurable.worker")

#: The most steps one claim runs ahead inline before the row goes back to the queue.
MAX_INLINE = 100
#: While steps are short, the buffer holds what the slots start within this many seconds
#: (more than ``prefetch``, at most ``batch`` rows): bigger claims and commits for quick
#: steps, no hoarding of rows by a process whose steps are slow.
BUFFER_HORIZON = 0.02
#: An idle process whose claim came back empty while rows were due (another process holds
#: them, or their concurrency key is busy) waits at least this long before looking again,
#: instead of spinning against the holder; a notification still wakes it at once.
EMPTY_CLAIM_PAUSE = 0.05


@dataclass
class Stats:
    steps: int = 0
    stale: int = 0
    errors: int = 0
    last_error: str | None = None


@dataclass
class _Pending:
    result: Result
    done: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Flusher:
    """Group commit: outcomes submitted while a flush runs are committed together next."""

    def __init__(self, engine: Engine, pool: AsyncConnectionPool, stats: Stats, queue: str):
        self._engine, self._pool, self._stats, self._queue_name = engine, pool, stats, queue
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="flusher")

    async def submit(self, result: Result) -> bool:
        """Wait until the outcome is durable; False when it was stale (claim lost)."""
        item = _Pending(result)
        self._queue.append(item)
        self._wake.set()
        return await item.done

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                async with self._pool.connection() as conn:
                    report = await self._engine.flush(conn, [p.result for p in batch], self._queue_name)
            except Exception as exc:  # noqa: BLE001 - rows stay executing; recovery reclaims them
                self._stats.errors += 1
                self._stats.last_error = f"flush failed: {exc!r}"
                log.exception("flush failed", extra={"event": "flush_failed"})
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(exc)
                continue
            for p in batch:
                stale = p.result.row.id in report.stale
                self._stats.stale += stale
                if not p.done.done():
                    p.done.set_result(not stale)

    async def stop(self) -> None:
        """Flush what is waiting, then stop (safe twice or before start)."""
        if self._task is None:
            return
        while self._queue:
            self._wake.set()
            await asyncio.sleep(0.01)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None


class Worker:
    """The composition root of one worker process."""

    def __init__(
        self,
        cfg: Config,
        dsn: str,
        queue: str,
        index: int,
        registry: Registry,
        worker_id: str,
        report_fd: int | None,
        board: RunningBoard | None = None,
    ):
        self.cfg, self.dsn, self.queue_name, self.index = cfg, dsn, queue, index
        self.board = board
        self.q: Queue = cfg.queues[queue]
        self.report_fd = report_fd
        self.stats = Stats()
        self._threads = ThreadPoolExecutor(max_workers=self.q.concurrency, thread_name_prefix=f"step-{queue}")

        def run_sync(fn: Any, *args: Any) -> asyncio.Future[Any]:
            return asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

        self.engine = Engine(
            registry,
            schema=cfg.database.schema,
            worker_id=worker_id,
            lease=dt.timedelta(seconds=cfg.runtime.lease),
            executor=Executor(registry, run_sync=run_sync, logger=log, limits=cfg.limits),
            limits=cfg.limits,
        )
        self.buffer: list[Claimed] = []  # claimed, not started (prefetch, inline continues)
        self.running: dict[int, Claimed] = {}  # step code running: these take the slots
        self.committing: dict[int, Claimed] = {}  # step done, outcome waiting for its commit
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self._solo: int | None = None
        self.feed: FeedConnection  # set in run(), once the channel is known
        self._step_time = 1.0  # seconds, a moving average; until measured: slow, plain prefetch

    # -- lifecycle -----------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        pool = AsyncConnectionPool(
            self.dsn,
            min_size=2,
            max_size=4,
            kwargs={"autocommit": True, "application_name": f"pgdurable worker {self.queue_name}"},
            open=False,
        )
        await pool.open(wait=True, timeout=30)
        self.pool = pool
        async with pool.connection() as conn:
            cur = await conn.execute(self.engine.q["queue_channel"], {"queue": self.queue_name})
            row = await cur.fetchone()
            assert row is not None
            channel = str(row[0])
        self.flusher = Flusher(self.engine, pool, self.stats, self.queue_name)
        self.feed = FeedConnection(
            self.dsn,
            self.queue_name,
            channel,
            probe_every=self.cfg.runtime.heartbeat,
            on_connect=self.wake.set,
        )
        self.flusher.start()
        heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
        try:
            await self._feed()
            await self._drain()
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self.flusher.stop()
            await self.feed.close()
            await pool.close()
            self._threads.shutdown(wait=False, cancel_futures=True)
        return 0

    # -- feeder ----------------------------------------------------------------------------
    def room(self) -> int:
        """Rows this process may hold, running or waiting to start: its slots plus a buffer
        of ``prefetch`` rows, or, while steps are quick, of what the slots start within
        ``BUFFER_HORIZON`` (at most ``batch``). ``prefetch = 0`` means no buffer at all."""
        q = self.q
        if q.prefetch == 0:
            return q.concurrency
        quick = int(q.concurrency * BUFFER_HORIZON / max(self._step_time, 1e-6))
        return q.concurrency + max(q.prefetch, min(quick, q.batch))

    async def _feed(self) -> None:
        q = self.q
        while not self.stopping.is_set():
            # Cleared before looking: whatever happens from here on (a step finishing, a
            # notification) sets it again and cuts the wait below short; nothing is missed
            # and nothing spins.
            self.wake.clear()
            room = self.room()
            min_demand = max(1, min(q.batch, room // 4))
            demand = min(room - len(self.running) - len(self.buffer), q.batch)
            idle = not self.running and not self.buffer and not self.committing
            claimed = 0
            if demand > 0 and (demand >= min_demand or idle):
                rows = await self._claim(demand)
                claimed = self.engine.last_claimed  # admitted or deferred by a limit
                self.buffer.extend(rows)
            self._start_from_buffer()
            if claimed and not self.feed.sync:
                # Busy again: claims go back to synchronous commit, while the steps just
                # started run (not before them: that would add a round trip to the wake-up).
                # Let them start first: sending the SET costs ~0.2 ms of Python before the
                # feeder yields, which would delay the first line of a woken step.
                await asyncio.sleep(0)
                await self._claim_durability(wait_for_disk=True)
            if claimed and claimed == demand:
                continue  # there may be more right away
            timeout = self.cfg.runtime.poll_ceiling
            idle = not self.running and not self.buffer and not self.committing
            if idle:
                timeout = await self._idle_timeout(came_back_empty=claimed == 0)
                await self._claim_durability(wait_for_disk=False)
            # A notification matters only when the next round would claim: listen for one then.
            demand = min(self.room() - len(self.running) - len(self.buffer), q.batch)
            await self._wait(timeout, listen=idle or demand >= min_demand)

    async def _claim(self, limit: int) -> list[Claimed]:
        try:
            conn = await self.feed.get()
            rows = await self.engine.claim(conn, self.queue_name, limit)
            self.feed.answered()
            self.feed.failures = 0
            return rows
        except Exception as exc:  # noqa: BLE001 - a failed pick is retried on the next wake
            self.stats.errors += 1
            self.stats.last_error = f"claim failed: {exc!r}"
            log.warning("claim failed: %r", exc, extra={"event": "claim_failed"})
            if not self.feed.connected:
                await self.feed.lost(exc)
            # Backing off, but a stop (SIGTERM) is not kept waiting for it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.feed.retry_delay())
            return []

    async def _claim_durability(self, *, wait_for_disk: bool) -> None:
        """Commit claims synchronously (busy) or asynchronously (the claim after a wake-up).

        A claim need not be durable: if the server crashes before it reaches disk, the row
        is simply runnable again after recovery, and the step's late outcome is refused by
        the fencing token — at-least-once holds, and every outcome still commits
        synchronously. An idle worker therefore waits with asynchronous commit, so the claim
        right after a wake-up does not wait for a disk flush (wake-up latency). A busy one
        claims synchronously again: measured faster under load, because rows written by
        not-yet-flushed transactions cannot get their hint bits set and later scans pay.
        """
        if self.feed.sync == wait_for_disk:
            return
        try:
            conn = await self.feed.get()
            value = "on" if wait_for_disk else "off"
            await conn.execute(self.engine.q["session_synchronous_commit"], {"value": value}, prepare=True)
            self.feed.sync = wait_for_disk
            self.feed.answered()
        except psycopg.Error as exc:
            await self.feed.lost(exc)  # reconnected (synchronous) at the next claim

    async def _idle_timeout(self, *, came_back_empty: bool) -> float:
        """Sleep until the queue's earliest future row is due, at most the poll ceiling.

        Rows due now that the claim just did not get are held by another process (locked,
        or their concurrency key busy): pause a little rather than spin against it.
        """
        ceiling = self.cfg.runtime.poll_ceiling
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    self.engine.q["instance_next_eligible"], {"queue": self.queue_name}, prepare=True
                )
                row = await cur.fetchone()
        except Exception:  # noqa: BLE001
            return min(ceiling, 1.0)
        wait = row[0] if row else None
        if wait is None:
            return ceiling
        if came_back_empty and wait <= 0:
            return EMPTY_CLAIM_PAUSE
        return max(0.0, min(ceiling, float(wait) + 0.001))

    async def _wait(self, timeout: float, *, listen: bool) -> None:
        """Until ``wake`` (a step finished), ``stopping``, a notification (when ``listen``)
        or ``timeout``, at most ``heartbeat`` seconds: the feeder connection answers at
        least that often (a claim, or the probe of ``tend`` while the slots are full)."""
        await self.feed.tend()
        timeout = min(timeout, self.cfg.runtime.heartbeat)
        waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(self.stopping.wait())]
        notified = asyncio.ensure_future(self.feed.notified(timeout)) if listen else None
        try:
            await asyncio.wait(
                waiters if notified is None else [*waiters, notified],
                timeout=timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for w in waiters:
                w.cancel()
            if notified is not None:
                # It holds the connection: let it go before the next claim.
                notified.cancel()
                await asyncio.wait([notified])

    def _start_from_buffer(self) -> None:
        while self.buffer and len(self.running) < self.q.concurrency and not self.stopping.is_set():
            if self._solo is not None:
                break  # a suspect runs alone
            if self.buffer[0].crashes > 0:
                # Its worker died during this step before: run it alone, so that if it kills
                # this process too, no innocent neighbour is blamed for the crash.
                if self.running:
                    break
                self._solo = self.buffer[0].id
            row = self.buffer.pop(0)
            self.running[row.id] = row
            # On the board before the step runs: if this process dies now, this step is a
            # suspect and counts a crash; rows merely held are innocent.
            if self.board is not None:
                self.board.start(row.id)
            self.tasks[row.id] = asyncio.create_task(self._run_one(row), name=f"step-{row.id}")

    async def _run_one(self, row: Claimed) -> None:
        try:
            started = time.monotonic()
            try:
                result = await self.engine.run(row)
            finally:
                self._step_time += 0.2 * (time.monotonic() - started - self._step_time)
                # The step's code is done: its slot is free while the outcome waits for the
                # group commit (the row stays held, and heartbeated, until then).
                self.running.pop(row.id, None)
                if self.board is not None:
                    self.board.stop(row.id)
                if self._solo == row.id:
                    self._solo = None
                self.committing[row.id] = row
                self.wake.set()
            committed = await self.flusher.submit(result)
            self.stats.steps += 1
            if committed and result.inline:
                # The continue kept the claim: its next step goes first in line.
                nxt = continued(row, result)
                if self.stopping.is_set() or nxt.depth > MAX_INLINE:
                    await self._release([nxt])
                else:
                    self.buffer.insert(0, nxt)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the row stays executing; recovery reclaims it
            self.stats.errors += 1
            self.stats.last_error = repr(exc)
        finally:
            self.committing.pop(row.id, None)
            self.tasks.pop(row.id, None)
            self.wake.set()

    # -- stopping --------------------------------------------------------------------------
    async def _drain(self) -> None:
        await self._release(self.buffer)
        self.buffer = []
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=self.cfg.runtime.drain_timeout)
        leftover = [*self.running.values(), *self.committing.values()]
        for task in list(self.tasks.values()):
            task.cancel()
        # Guarded by the claim's token: a row whose outcome did commit meanwhile is untouched.
        await self._release(leftover)

    async def _release(self, rows: list[Claimed]) -> None:
        if rows:
            async with self.pool.connection() as conn:
                await self.engine.release(conn, rows)

    # -- heartbeat -------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Report every second; extend every held lease every ``heartbeat`` seconds."""
        last_extend = time.monotonic()
        while True:
            held = [r.id for r in self.buffer] + list(self.running) + list(self.committing)
            if held and time.monotonic() - last_extend >= self.cfg.runtime.heartbeat:
                last_extend = time.monotonic()
                try:
                    async with self.pool.connection() as conn:
                        await conn.execute(
                            self.engine.q["instance_lease_extend_many"],
                            {"worker": self.engine.worker_id, "ids": held, "lease": self.engine.lease},
                            prepare=True,
                        )
                except Exception as exc:  # noqa: BLE001
                    self.stats.errors += 1
                    self.stats.last_error = f"heartbeat failed: {exc!r}"
            self.report(held=len(held))
            setproctitle.setproctitle(
                f"pgdurable: worker {self.queue_name} {self.index + 1}/{self.q.processes} "
                f"busy {len(self.running)}/{self.q.concurrency}"
            )
            await asyncio.sleep(1.0)

    def report(self, **extra: Any) -> None:
        """One JSON line to the supervisor: alive, load, held rows, errors, listener health."""
        if self.report_fd is None:
            return
        feed = self.feed
        listening = feed.listening and time.monotonic() - feed.seen < 3 * self.cfg.runtime.heartbeat + 5
        msg = {
            "pid": os.getpid(),
            "worker": self.engine.worker_id,
            "queue": self.queue_name,
            "busy": len(self.running),
            "buffered": len(self.buffer),
            "concurrency": self.q.concurrency,
            "steps": self.stats.steps,
            "stale": self.stats.stale,
            "errors": self.stats.errors,
            "limit_errors": self.engine.limit_errors,
            "last_error": self.stats.last_error,
            "listening": listening,
            **extra,
        }
        self._send((json.dumps(msg) + "\n").encode())

    def _send(self, data: bytes) -> None:
        if self.report_fd is None:
            return
        try:
            os.write(self.report_fd, data)
        except BlockingIOError:
            pass  # the supervisor is behind: a report may be dropped, never block the loop
        except OSError:
            self.stopping.set()  # the supervisor is gone: stop
