"""Time limits: rows not started by their ``expires_at`` end instead of running late, and
instances not finished by their ``deadline`` fail, their live children cancelled
(docs/deadlines.md). The work is in the functions of migration 10; this sweep runs them
and then sleeps until the next one falls due, not for a fixed tick."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import psycopg

from pgdurable.db.queries import Queries
from pgdurable.runtime.lifecycle import sleep_unless
from pgdurable.runtime.sweeps.base import Connect, Sweep

log = logging.getLogger("pgdurable.deadlines")

BATCH = 1000
#: The shortest sleep between passes: a row due "now" that another host's pass holds
#: locked is not spun on.
MIN_SLEEP = 0.01
#: The most instance ids a log line lists (its ``rows`` counts them all).
LOGGED_IDS = 100


@dataclass(slots=True)
class Fired:
    """What one pass did."""

    expired: list[int]  # ended: not started by their expires_at (failed or cancelled)
    failed: list[int]  # failed: past their deadline
    marked: list[int]  # executing past their deadline: fail when their step returns
    due_in: float | None  # seconds until the next expiry or deadline (None: none)


def fire(conn: psycopg.Connection[Any], q: Queries) -> Fired:
    """End every row whose expiry or deadline passed, in batches (each its own
    transaction: the functions lock what they change); then read when the next is due."""
    out = Fired([], [], [], None)
    while True:
        rows = conn.execute(q["deadline_expire"], {"limit": BATCH}).fetchall()
        out.expired += [r[0] for r in rows]
        if len(rows) < BATCH:
            break
    while True:
        rows = conn.execute(q["deadline_fail"], {"limit": BATCH}).fetchall()
        out.failed += [r[0] for r in rows if r[3] == "failed"]
        out.marked += [r[0] for r in rows if r[3] == "marked"]
        if len(rows) < BATCH:
            break
    row = conn.execute(q["deadline_next_due"]).fetchone()
    out.due_in = None if row is None or row[0] is None else float(row[0])
    for ids, event, what in (
        (out.expired, "expired", "expired before they started"),
        (out.failed, "deadline_failed", "failed at their deadline"),
        (out.marked, "deadline_marked", "past their deadline while their step runs: fail when it returns"),
    ):
        if ids:
            log.info(
                "%d instances %s",
                len(ids),
                what,
                extra={"event": event, "rows": len(ids), "instances": ids[:LOGGED_IDS]},
            )
    return out


class Deadlines(Sweep):
    """Expiry before start and instance deadlines. After each pass it sleeps until the next
    one falls due, at most ``interval`` seconds (rows inserted meanwhile with an earlier due
    time are seen at the next pass; the claim never starts an expired row in any case)."""

    name = "deadlines"

    def __init__(self, connect: Connect, q: Queries, interval: float, logger: Any = log):
        super().__init__(connect, interval, logger)
        self.q = q
        self.due_in: float | None = None

    def sweep(self, conn: psycopg.Connection[Any]) -> None:
        self.due_in = fire(conn, self.q).due_in

    async def run(self) -> None:
        while not self.closing.is_set():
            try:
                await asyncio.to_thread(self._once)
                self.runs += 1
            except psycopg.Error as exc:
                self.failures += 1
                self.due_in = None
                self.log.warning(
                    "%s failed: %r", self.name, exc, extra={"event": "maintenance_failed", "sweep": self.name}
                )
            wait = self.interval if self.due_in is None else min(self.interval, max(MIN_SLEEP, self.due_in))
            if await sleep_unless(self.closing, wait):
                return
