"""Await deadlines: instances parked on a signal past their timeout wake into ``then``."""

from __future__ import annotations

from typing import Any

import psycopg

from pgdurable.db.queries import Queries
from pgdurable.runtime.sweeps.base import Connect, Sweep

BATCH = 1000


def expire_awaits(conn: psycopg.Connection[Any], q: Queries) -> int:
    """Wake every instance whose await deadline passed, in batches; returns the count."""
    total = 0
    while True:
        woke = len(conn.execute(q["instance_await_expire"], {"horizon": "0", "limit": BATCH}).fetchall())
        total += woke
        if woke < BATCH:
            return total


class AwaitDeadlines(Sweep):
    name = "await-deadlines"

    def __init__(self, connect: Connect, q: Queries, interval: float, log: Any):
        super().__init__(connect, interval, log)
        self.q = q

    def sweep(self, conn: psycopg.Connection[Any]) -> None:
        expire_awaits(conn, self.q)
