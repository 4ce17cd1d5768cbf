"""The slots of a worker process: the rows it holds and the steps it runs.

A claimed row waits in the ``buffer`` (prefetched, or the next step of an inline
continuation), takes a slot while its step's code runs (``running``), and is ``committing``
while its outcome waits for the group commit. The feeder fills the buffer; a finished step
sets ``wake`` so the feeder looks again.

A sync step past its timeout is *overdue*: its row's outcome (a ``StepTimeout``) is committed
as usual, but its thread cannot be stopped, so it keeps a slot (``overdue``) until it returns;
a step process keeps one until it is killed. The slots never run more step code at once than
``concurrency``, which is also the size of the thread pool and of the step process pool.

Stopping is the drain: give the buffered rows back, let running steps finish within the
drain timeout, cancel what is left and give it back (guarded by each claim's token, so a row
whose outcome did commit meanwhile is untouched).
"""

from __future__ import annotations

import asyncio
from typing import Any

from pgdurable.engine.claim import Claimed
from pgdurable.engine.commit import continued
from pgdurable.runtime.board import RunningBoard
from pgdurable.runtime.context import Runtime
from pgdurable.runtime.flusher import Flusher
from pgdurable.runtime.lifecycle import Component

#: The most steps one claim runs ahead inline before the row goes back to the queue.
MAX_INLINE = 100
#: While steps are short, the buffer holds what the slots start within this many seconds
#: (more than ``prefetch``, at most ``batch`` rows): bigger claims and commits for quick
#: steps, no hoarding of rows by a process whose steps are slow.
BUFFER_HORIZON = 0.02


class Slots(Component):
    name = "slots"

    def __init__(self, rt: Runtime, flusher: Flusher, board: RunningBoard | None = None):
        super().__init__()
        self.rt, self.flusher, self.board = rt, flusher, board
        self.buffer: list[Claimed] = []  # claimed, not started (prefetch, inline continues)
        self.running: dict[int, Claimed] = {}  # step code running: these take the slots
        self.committing: dict[int, Claimed] = {}  # step done, outcome waiting for its commit
        self.tasks: dict[int, asyncio.Task[None]] = {}
        #: Threads or step processes of steps past their timeout, each holding a slot until gone.
        self.overdue: set[asyncio.Future[Any]] = set()
        self.wake = asyncio.Event()  # set when a step finished or a row was given back
        self._solo: int | None = None
        self.step_time = 1.0  # seconds, a moving average; until measured: slow, plain prefetch

    # -- what the feeder asks ---------------------------------------------------------------
    def room(self) -> int:
        """Rows this process may hold, running or waiting to start: its slots plus a buffer
        of ``prefetch`` rows, or, while steps are quick, of what the slots start within
        ``BUFFER_HORIZON`` (at most ``batch``). ``prefetch = 0`` means no buffer at all."""
        settings = self.rt.settings
        if settings.prefetch == 0:
            return settings.concurrency
        quick = int(settings.concurrency * BUFFER_HORIZON / max(self.step_time, 1e-6))
        return settings.concurrency + max(settings.prefetch, min(quick, settings.batch))

    def demand(self) -> int:
        """How many rows a claim may take now."""
        return min(self.room() - self.busy - len(self.buffer), self.rt.settings.batch)

    @property
    def busy(self) -> int:
        """Slots taken: steps running, and overdue ones whose thread or process goes on."""
        return len(self.running) + len(self.overdue)

    @property
    def idle(self) -> bool:
        return not self.running and not self.buffer and not self.committing

    def held(self) -> list[int]:
        """Every row id this process holds a claim on (the heartbeat extends their leases)."""
        engine = self.rt.engine
        # A step in a serializable (or repeatable-read) transaction is left alone: extending
        # its lease would make its own outcome fail to serialize. Its lease bounds it.
        running = [i for i, r in self.running.items() if not engine.keeps_snapshot(r)]
        return [r.id for r in self.buffer] + running + list(self.committing)

    # -- running steps ----------------------------------------------------------------------
    def fill(self, rows: list[Claimed]) -> None:
        """Buffer claimed rows and start as many as there are free slots."""
        self.buffer.extend(rows)
        self.start_from_buffer()

    def start_from_buffer(self) -> None:
        loop = None
        while self.buffer and self.busy < self.rt.settings.concurrency and not self.closing.is_set():
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
            # The loop read once, not by asyncio.create_task for each row (on Python 3.11 each
            # lookup of the running loop is a getpid() system call).
            loop = loop or asyncio.get_running_loop()
            self.tasks[row.id] = loop.create_task(self._run_one(row), name=f"step-{row.id}")

    async def _run_one(self, row: Claimed) -> None:
        rt = self.rt
        try:
            started = rt.clock()
            report = None
            try:
                if rt.engine.transactional(row):
                    # Its own transaction on a pooled connection: its writes and its outcome
                    # commit together there (engine.transactional), not in the group commit.
                    async with rt.pool.connection() as conn:
                        result, report = await rt.engine.run_transactional(conn, row, rt.queue)
                else:
                    result = await rt.engine.run(row)
            finally:
                self.step_time += 0.2 * (rt.clock() - started - self.step_time)
                # The step's code is done: its slot is free while the outcome waits for the
                # group commit (the row stays held, and heartbeated, until then).
                self.running.pop(row.id, None)
                if self.board is not None:
                    self.board.stop(row.id)
                if self._solo == row.id:
                    self._solo = None
                self.committing[row.id] = row
                # The freed slot takes the next buffered row now, not when the feeder next
                # runs: the feeder may be in a claim's round trip, and quick steps would
                # otherwise start only in rounds of ``concurrency`` between two claims.
                self.start_from_buffer()
                self.wake.set()
            if report is None:
                committed = await self.flusher.submit(result)
            else:
                committed = self.flusher.committed_alone(result, report.stale)
            rt.stats.steps += 1
            if committed and rt.metrics is not None:
                rt.metrics.step(row, result)
            if committed and result.inline:
                # The continue kept the claim: its next step goes first in line.
                nxt = continued(row, result)
                if self.closing.is_set() or nxt.depth > MAX_INLINE:
                    await self.release([nxt])
                else:
                    self.buffer.insert(0, nxt)
                    self.start_from_buffer()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the row stays executing; recovery reclaims it
            rt.stats.error(repr(exc))
        finally:
            self.committing.pop(row.id, None)
            self.tasks.pop(row.id, None)
            self.wake.set()

    def hold_overdue(self, late: asyncio.Future[Any]) -> None:
        """A step ran past its timeout while its thread or process goes on: it keeps a slot
        until ``late`` completes (``Executor.on_overdue``)."""
        self.rt.stats.overdue += 1
        self.overdue.add(late)

        def gone(f: asyncio.Future[Any]) -> None:
            self.overdue.discard(f)
            self.wake.set()  # a slot is free again

        late.add_done_callback(gone)

    async def release(self, rows: list[Claimed]) -> None:
        """Give claimed rows that will not run here back to runnable."""
        if rows:
            async with self.rt.pool.connection() as conn:
                await self.rt.engine.release(conn, rows)

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        await self.closing.wait()

    async def stop(self, timeout: float = 0.0) -> None:
        """The drain: buffered rows go back now, running steps get ``timeout`` seconds."""
        self.close()
        buffered, self.buffer = self.buffer, []
        await self.release(buffered)
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=timeout)
        leftover = [*self.running.values(), *self.committing.values()]
        for task in list(self.tasks.values()):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()))
        # Guarded by the claim's token: a row whose outcome did commit meanwhile is untouched.
        await self.release(leftover)
        await super().stop(0)
