"""The feeder: claims batches for its queue and hands them to the slots.

It claims ``min(free room, batch)`` rows in one statement on its own connection, which also
LISTENs on the queue's channel (``feedconn``). Between claims it sleeps until a step
finishes, a notification arrives, or the queue's earliest future row is due — busy or idle
— at most ``poll_ceiling`` seconds, so delayed and retried work starts on time without
polling.

Knowing when the next row is due: an idle feeder asks the database
(``instance_next_eligible``) before each sleep. A busy one asks only when something may have
changed it — a notification was read (producers notify for every insert, future ones
included), or its own claim deferred rows for a limit — and learns the due time of its own
delayed outcomes (``Next(delay=)``, ``Retry``, delayed children) from the flusher, which
calls ``due_in`` after their commit. Busy or idle, a delayed row starts on time.
"""

from __future__ import annotations

import asyncio
import contextlib

import psycopg

from pgdurable.engine.claim import Claimed
from pgdurable.runtime.context import Runtime
from pgdurable.runtime.feedconn import FeedConnection
from pgdurable.runtime.lifecycle import Component
from pgdurable.runtime.slots import Slots

#: An idle process whose claim came back empty while rows were due (another process holds
#: them, or their concurrency key is busy) waits at least this long before looking again,
#: instead of spinning against the holder; a notification still wakes it at once.
EMPTY_CLAIM_PAUSE = 0.05


class Feeder(Component):
    name = "feeder"

    def __init__(self, rt: Runtime, slots: Slots, feed: FeedConnection):
        super().__init__()
        self.rt, self.slots, self.feed = rt, slots, feed
        self.next_due: float | None = None  # the clock's time when the earliest known row is due
        self._heard = 0  # feed.heard when the feeder last asked the database for next_due
        self._look = True  # ask the database before the next sleep, even when busy

    def due_in(self, seconds: float) -> None:
        """A row of this queue becomes due in ``seconds`` (told by the flusher after it
        committed a delayed outcome): wake up then, busy or idle."""
        due = self.rt.clock() + max(0.0, seconds)
        if self.next_due is None or due < self.next_due:
            self.next_due = due
            self.slots.wake.set()  # the current sleep was computed without it

    def close(self) -> None:
        super().close()
        self.slots.wake.set()  # cut a wait short

    async def run(self) -> None:
        rt, slots, settings = self.rt, self.slots, self.rt.settings
        while not self.closing.is_set():
            # Cleared before looking: whatever happens from here on (a step finishing, a
            # notification) sets it again and cuts the wait below short; nothing is missed
            # and nothing spins.
            slots.wake.clear()
            min_demand = max(1, min(settings.batch, slots.room() // 4))
            demand = slots.demand()
            claimed = 0
            if demand > 0 and (demand >= min_demand or slots.idle):
                rows = await self._claim(demand)
                claimed = rt.engine.last_claimed  # admitted or deferred by a limit
                if len(rows) < claimed:
                    self._look = True  # rows deferred by a limit: when they are due is new
                slots.buffer.extend(rows)
            slots.start_from_buffer()
            if claimed and not self.feed.sync:
                # Busy again: claims go back to synchronous commit, while the steps just
                # started run (not before them: that would add a round trip to the wake-up).
                # Let them start first: sending the SET costs ~0.2 ms of Python before the
                # feeder yields, which would delay the first line of a woken step.
                await asyncio.sleep(0)
                await self._claim_durability(wait_for_disk=True)
            if claimed and claimed == demand:
                continue  # there may be more right away
            idle = slots.idle
            timeout = await self._due_timeout(idle=idle)
            if idle:
                await self._claim_durability(wait_for_disk=False)
            # A notification matters only when the next round would claim: listen for one then.
            await self._wait(timeout, listen=idle or slots.demand() >= min_demand)

    async def _claim(self, limit: int) -> list[Claimed]:
        rt = self.rt
        try:
            conn = await self.feed.get()
            started = rt.clock()
            rows = await rt.engine.claim(conn, rt.queue, limit)
            if rt.metrics is not None:
                rt.metrics.observe("claim", rt.clock() - started)
                if rt.engine.last_claimed:
                    rt.metrics.observe("claim_rows", rt.engine.last_claimed)
            self.feed.answered()
            self.feed.failures = 0
            return rows
        except Exception as exc:  # noqa: BLE001 - a failed pick is retried on the next wake
            rt.stats.error(f"claim failed: {exc!r}")
            rt.log.warning("claim failed: %r", exc, extra={"event": "claim_failed", "queue": rt.queue})
            if not self.feed.connected:
                await self.feed.lost(exc)
            # Backing off, but a stop (SIGTERM) is not kept waiting for it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), self.feed.retry_delay())
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
            await conn.execute(self.rt.queries["session_synchronous_commit"], {"value": value}, prepare=True)
            self.feed.sync = wait_for_disk
            self.feed.answered()
        except psycopg.Error as exc:
            await self.feed.lost(exc)  # reconnected (synchronous) at the next claim

    async def _due_timeout(self, *, idle: bool) -> float:
        """How long to sleep: until the queue's earliest future row is due, at most the
        poll ceiling. Idle, or when the due time may have changed, ask the database.

        Rows due now that an idle feeder's claim did not get are held by another process
        (locked, or their concurrency key busy): pause a little rather than spin.
        """
        rt = self.rt
        ceiling = rt.cfg.runtime.poll_ceiling
        now = rt.clock()
        if self.next_due is not None and self.next_due <= now:
            # Passed: the claim just made took what it could. Only the earliest due time is
            # kept, so ask again for the one after it.
            self.next_due, self._look = None, True
        if idle or self._look or self.feed.heard != self._heard:
            self._look, self._heard = False, self.feed.heard
            try:
                async with rt.pool.connection() as conn:
                    cur = await conn.execute(
                        rt.queries["instance_next_eligible"], {"queue": rt.queue}, prepare=True
                    )
                    row = await cur.fetchone()
            except Exception:  # noqa: BLE001 - look again soon
                self._look = True
                return min(ceiling, 1.0)
            wait, future = (row[0], row[1]) if row else (None, None)
            if idle and wait is not None and float(wait) <= 0:
                return EMPTY_CLAIM_PAUSE
            # Rows due now that the claim did not get are held elsewhere: busy, a finished
            # step or a notification wakes the feeder; the next future row sets the timer.
            if future is not None:
                self.next_due = min(self.next_due or float("inf"), now + float(future))
        if self.next_due is None:
            return ceiling
        return max(0.0, min(ceiling, self.next_due - now + 0.001))

    async def _wait(self, timeout: float, *, listen: bool) -> None:
        """Until a step finished (``slots.wake``), a stop, a notification (when ``listen``)
        or ``timeout``, at most ``heartbeat`` seconds: the feeder connection answers at
        least that often (a claim, or the probe of ``tend`` while the slots are full)."""
        heard = self.feed.heard
        await self.feed.tend()
        if self.feed.heard != heard:
            return  # notifications kept meanwhile were just read: look at the queue again
        timeout = min(timeout, self.rt.cfg.runtime.heartbeat)
        waiters = [
            asyncio.ensure_future(self.slots.wake.wait()),
            asyncio.ensure_future(self.closing.wait()),
        ]
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
