"""A sweep: a component that runs one short database job, then sleeps.

The job is synchronous (plain psycopg on a short-lived connection with a statement timeout)
and runs in a thread, so the process's loop stays free to report and to stop.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import psycopg

from pgdurable.runtime.lifecycle import Component, sleep_unless

Connect = Callable[[], psycopg.Connection[Any]]


class Sweep(Component):
    """Run ``sweep`` every ``interval`` seconds until stopped; a failed run is logged and
    retried at the next interval (the database may be restarting)."""

    def __init__(self, connect: Connect, interval: float, log: Any):
        super().__init__()
        self.connect, self.interval, self.log = connect, interval, log
        self.runs = 0
        self.failures = 0

    async def run(self) -> None:
        while not self.closing.is_set():
            try:
                await asyncio.to_thread(self._once)
                self.runs += 1
            except psycopg.Error as exc:
                self.failures += 1
                self.log.warning(
                    "%s failed: %r", self.name, exc, extra={"event": "maintenance_failed", "sweep": self.name}
                )
            if await sleep_unless(self.closing, self.interval):
                return

    def _once(self) -> None:
        with self.connect() as conn:
            self.sweep(conn)

    @abstractmethod
    def sweep(self, conn: psycopg.Connection[Any]) -> None:
        """One pass, on an autocommit connection."""
