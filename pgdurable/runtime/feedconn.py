"""The feeder's connection: it LISTENs on the queue's channel and runs the claims.

One connection does both, so the database process that delivers a notification is the one
that runs the claim it triggers: no second server process to wake before the claim runs
(about a millisecond of wake-up latency on a small VM, see docs/performance.md), and one
connection fewer per worker process.

psycopg keeps the notifications that arrive while a claim runs until they are read. The
feeder reads them whenever it waits for work (``notified``); a feeder too busy to wait for
work reads them at least every ``probe_every`` seconds (``tend``), so they never pile up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from pgdurable.runtime.backoff import retry_delay

log = logging.getLogger("pgdurable.worker")


class FeedConnection:
    """An autocommit connection that LISTENs on ``channel``; reconnected on demand.

    ``on_connect`` runs after every (re)connection, once LISTEN is in place: whatever was
    inserted while nobody listened must be looked for. ``listening`` and ``seen`` (the
    last time the connection answered) feed the worker's health report; ``tend`` keeps
    ``seen`` fresh by a probe when nothing else used the connection for ``probe_every``
    seconds.
    """

    def __init__(
        self, dsn: str, queue: str, channel: str, *, probe_every: float, on_connect: Callable[[], None]
    ):
        self._dsn, self._queue, self._channel, self._on_connect = dsn, queue, channel, on_connect
        self._probe_every = probe_every
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._drained = 0.0  # when the notifications psycopg keeps were last read
        self.sync = True  # the session's synchronous_commit (see Worker._claim_durability)
        self.listening = False
        self.seen = 0.0
        self.failures = 0  # claims failed in a row (reset by the worker after one succeeded)
        self.heard = 0  # notifications read so far (the feeder looks again after new ones)

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def get(self) -> psycopg.AsyncConnection[Any]:
        """The connection, LISTENing; connects first when there is none (errors propagate)."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._conn, self.listening, self.sync = None, False, True
        conn = await psycopg.AsyncConnection.connect(
            self._dsn, autocommit=True, application_name=f"pgdurable feeder {self._queue}"
        )
        try:
            # LISTEN takes no parameters; the channel is quoted as an identifier.
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        except BaseException:
            await conn.close()
            raise
        self._conn, self.listening = conn, True
        self.answered()
        self._on_connect()
        return conn

    def answered(self) -> None:
        """The connection just completed a round trip."""
        self.seen = time.monotonic()

    def retry_delay(self) -> float:
        """Seconds to wait after one more failure (see ``backoff.retry_delay``)."""
        self.failures += 1
        return retry_delay(self.failures)

    async def lost(self, exc: BaseException) -> None:
        """Drop the connection after an error; the next ``get`` reconnects."""
        if self.listening:
            log.warning(
                "feeder connection lost: %r; reconnecting",
                exc,
                extra={"event": "listener_lost", "queue": self._queue},
            )
        conn, self._conn, self.listening = self._conn, None, False
        if conn is not None and not conn.closed:
            await conn.close()

    async def notified(self, timeout: float) -> None:
        """Return at the first notification (one that arrived during a claim counts), or
        after ``timeout`` seconds. Without a connection, just sleep: the next claim
        reconnects. Cancel it to stop waiting."""
        conn = self._conn
        if conn is None or conn.closed:
            await asyncio.sleep(timeout)
            return
        try:
            async for _ in conn.notifies(timeout=timeout, stop_after=1):
                self.heard += 1
                self.answered()
            self._drained = time.monotonic()  # psycopg hands over what it kept first
        except psycopg.Error as exc:
            await self.lost(exc)

    async def tend(self) -> None:
        """Every ``probe_every`` seconds at most: probe the connection with ``SELECT 1`` if
        nothing else made it answer meanwhile (for the health report), and drop the
        notifications psycopg kept since it was last read (the feeder was too busy to wait
        for them; a poll, no round trip)."""
        conn = self._conn
        if conn is None or conn.closed:
            return
        now = time.monotonic()
        try:
            if now - self.seen >= self._probe_every:
                await conn.execute("SELECT 1")
                self.answered()
            if now - self._drained >= self._probe_every:
                self._drained = now
                async for _ in conn.notifies(timeout=0):
                    self.heard += 1
        except psycopg.Error as exc:
            await self.lost(exc)

    async def close(self) -> None:
        conn, self._conn, self.listening = self._conn, None, False
        if conn is not None:
            await conn.close()
