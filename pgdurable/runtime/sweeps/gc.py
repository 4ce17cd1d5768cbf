"""Garbage collection of finished rows, and the repair of limit counters."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import psycopg

from pgdurable.db.queries import Queries
from pgdurable.runtime.sweeps.base import Connect, Sweep

log = logging.getLogger("pgdurable.maintenance")


def gc(
    conn: psycopg.Connection[Any],
    q: Queries,
    *,
    retention: dt.timedelta,
    batch: int = 1000,
    max_batches: int = 100,
) -> int:
    """Delete terminal rows older than ``retention``, in batches by id; returns the count.

    Terminal children of a live parent are spared. Each batch is its own short transaction:
    select ids (SKIP LOCKED, so concurrent collectors split the work), delete by id.
    """
    total = 0
    for _ in range(max_batches):
        with conn.transaction():
            ids = [
                row[0] for row in conn.execute(q["gc_select_ids"], {"retention": retention, "limit": batch})
            ]
            if ids:
                conn.execute(q["gc_delete_ids"], {"ids": ids})
        total += len(ids)
        if len(ids) < batch:
            break
    return total


def limits(conn: psycopg.Connection[Any], q: Queries) -> tuple[int, int]:
    """Repair gate counters from the executing truth and prune idle counters and buckets.

    Returns (counters repaired, rows pruned). Counters only drift when a transaction that
    should have credited a slot could not run at all; this is the safety net.
    """
    with conn.transaction():
        locked = conn.execute(q["gate_slots_lock_all"]).fetchall()
        repaired = 0
        if locked:
            rows = conn.execute(
                q["gate_slots_reconcile_many"],
                {"keys": [k for k, _ in locked], "shards": [s for _, s in locked]},
            ).fetchall()
            repaired = len(rows)
    pruned = conn.execute(q["gate_slots_prune"]).rowcount + conn.execute(q["rate_buckets_prune"]).rowcount
    return repaired, pruned


class Collector(Sweep):
    """Garbage collection of finished rows past ``retention``, then the limit counters."""

    name = "gc"

    def __init__(self, connect: Connect, q: Queries, interval: float, retention: float, batch: int):
        super().__init__(connect, interval, log)
        self.q, self.retention, self.batch = q, dt.timedelta(seconds=retention), batch

    def sweep(self, conn: psycopg.Connection[Any]) -> None:
        deleted = gc(conn, self.q, retention=self.retention, batch=self.batch, max_batches=10)
        repaired, _pruned = limits(conn, self.q)
        if deleted:
            log.info("gc deleted %d rows", deleted, extra={"event": "gc", "rows": deleted})
        if repaired:
            log.warning(
                "gc repaired %d gate counters",
                repaired,
                extra={"event": "gate_repaired", "counters": repaired},
            )
