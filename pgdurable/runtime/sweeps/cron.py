"""The cron component of the maintenance process: fires due schedules on time.

It sleeps until the earliest next fire of an enabled schedule (by the database's clock),
fires what is due (``engine.schedules.fire_due``), and sleeps again. A change of a schedule
(create, update, enable, a registration) notifies ``schedule_channel()``: the component
LISTENs on its own connection and recomputes its sleep at once, so a new, earlier fire is
not missed. While that connection is down it re-reads every ``interval`` seconds instead,
and it never sleeps longer than ``MAX_SLEEP``: a schedule changed by plain SQL, which
notifies nobody, is seen within that.

Every supervisor runs one; ``fire_due`` makes each occurrence fire once among them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg
from psycopg import sql

from pgdurable.db.queries import Queries
from pgdurable.engine.schedules import fire_due, seconds_until_due
from pgdurable.runtime.backoff import retry_delay
from pgdurable.runtime.lifecycle import Component, sleep_unless
from pgdurable.runtime.sweeps.base import Connect

log = logging.getLogger("pgdurable.cron")

#: The longest sleep between two passes (a change made by plain SQL notifies nobody).
MAX_SLEEP = 30.0
#: Woken this much after the due time, so the database's now() has passed it.
LATE = 0.002
#: The shortest sleep: a schedule still due after a pass is held by another pass (which
#: is firing it) and is looked at again this soon, not in a busy loop.
MIN_SLEEP = 0.05


class Cron(Component):
    """Fire due schedules; see the module docstring."""

    name = "cron"

    def __init__(self, connect: Connect, dsn: str, q: Queries, interval: float):
        super().__init__()
        self.connect, self.dsn, self.q, self.interval = connect, dsn, q, interval
        self.changed = asyncio.Event()
        self.listening = False
        self.runs = 0
        self.failures = 0
        self.fired = 0
        self._conn: psycopg.Connection[Any] | None = None

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen(), name="cron-listen")
        try:
            while not self.closing.is_set():
                self.changed.clear()
                try:
                    wait = await asyncio.to_thread(self._pass)
                    self.runs += 1
                except psycopg.Error as exc:
                    self.failures += 1
                    self._drop()
                    log.warning(
                        "cron failed: %r", exc, extra={"event": "maintenance_failed", "sweep": "cron"}
                    )
                    wait = self.interval
                cap = MAX_SLEEP if self.listening else self.interval
                wait = cap if wait is None else min(cap, max(MIN_SLEEP, wait + LATE))
                await self._sleep(wait)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await asyncio.to_thread(self._drop)

    async def _sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or until a schedule changed, or until closing."""
        if seconds <= 0 or self.changed.is_set() or self.closing.is_set():
            return
        waits = [asyncio.ensure_future(self.changed.wait()), asyncio.ensure_future(self.closing.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _pass(self) -> float | None:
        """Fire what is due; seconds until the next fire (None: nothing scheduled)."""
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        report = fire_due(self._conn, self.q)
        self.fired += len(report.fired)
        if report.failed:
            # A schedule that failed to fire stays due: try it again after the interval,
            # not at once.
            self.failures += 1
            return self.interval
        return seconds_until_due(self._conn, self.q)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    async def _listen(self) -> None:
        """LISTEN on the schedules' channel; set ``changed`` at each notification. Reconnects
        with backoff; while it is down, the loop above re-reads every ``interval``."""
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=10, application_name="pgdurable cron"
                ) as conn:
                    row = await (await conn.execute(self.q["schedule_channel"])).fetchone()
                    assert row is not None
                    # LISTEN takes no parameters; the channel is quoted as an identifier.
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(row[0])))
                    self.listening, failures = True, 0
                    self.changed.set()  # whatever changed while nobody listened
                    async for _ in conn.notifies():
                        self.changed.set()
            except psycopg.Error as exc:
                failures += 1
                log.warning(
                    "cron listener lost its connection: %r",
                    exc,
                    extra={"event": "cron_listen_failed", "failures": failures},
                )
            finally:
                self.listening = False
            await sleep_unless(self.closing, retry_delay(failures))
            if self.closing.is_set():
                return
