"""Reclaims: executing rows go back to runnable when their worker is gone.

Three callers, fastest first: the supervisor when one of its workers dies (its rows, at
once); a starting supervisor for the rows its dead previous incarnations on this host held;
and the ``Reaper`` sweep for rows whose lease expired (the floor for a dead host). Each
reclaim counts toward the step's ``max_crashes`` — only for steps that had started.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

import psycopg

from pgdurable.contract.fsm import Registry
from pgdurable.db.queries import Queries
from pgdurable.runtime.sweeps.base import Connect, Sweep

log = logging.getLogger("pgdurable.reaper")

#: The most instance ids a ``reclaimed`` line lists (its ``rows`` counts them all).
LOGGED_IDS = 100


def reclaim(
    conn: psycopg.Connection[Any],
    q: Queries,
    registry: Registry,
    default_max_crashes: int,
    *,
    lease: dt.timedelta,
    workers: Sequence[str] = (),
    nodes: Sequence[str] = (),
    expired: bool = False,
    crashed: Sequence[int] | None = None,
    cause: str = "lease_expired",
) -> int:
    """Return rows of dead owners to runnable, in one transaction; returns the count.

    ``crashed``: the ids whose step had started (a crash counts only for them); None counts
    a crash for every reclaimed row — except rows taken for an expired lease that was last
    renewed before the database server started (``lease``: the lease length), whose owner
    could not renew it during the outage. A row that reaches ``max_crashes`` fails, and its
    parent's join counts it. ``cause`` names the recovery layer in the log line
    (``worker_died``, ``dead_incarnation``, ``lease_expired``).
    """
    own = [m for m in registry.machines() if m.max_crashes is not None]
    params = {
        "workers": list(workers),
        "nodes": list(nodes),
        "expired": expired,
        "count_all": crashed is None,
        "crashed": list(crashed or ()),
        "fsms": [m.__pgdurable__.name for m in own],
        "versions": [m.__pgdurable__.version for m in own],
        "max_crashes": [m.max_crashes for m in own],
        "default_max": default_max_crashes,
        "lease": lease,
    }
    with conn.transaction():
        rows = conn.execute(q["instance_reclaim"], params).fetchall()
        ended = [(parent_id, status) for _rid, status, parent_id, *_ in rows]
        marked = [rid for rid, status, *_ in rows if status == "marked"]
        if marked:  # a cancel waited for their step: cancelled now (or sent to on_cancel)
            settled = conn.execute(q["instance_cancel_settle_many"], {"ids": marked}).fetchall()
            ended += [(parent_id, status) for _rid, parent_id, status, _queue in settled]
        parents: dict[int, int] = {}
        failures: dict[int, int] = {}
        for parent_id, status in ended:
            if status in ("failed", "cancelled") and parent_id is not None:
                parents[parent_id] = parents.get(parent_id, 0) + 1
                failures[parent_id] = failures.get(parent_id, 0) + (status == "failed")
        if parents:
            ids = sorted(parents)
            conn.execute(
                q["instance_join_parents_many"],
                {"parents": ids, "counts": [parents[p] for p in ids], "failed": [failures[p] for p in ids]},
            )
    if rows:
        failed = [rid for rid, status, *_ in rows if status == "failed"]
        log.info(
            "reclaimed %d rows (%s)",
            len(rows),
            cause,
            extra={
                "event": "reclaimed",
                "cause": cause,
                "rows": len(rows),
                "instances": [r[0] for r in rows[:LOGGED_IDS]],
                **({"crashed": sorted(crashed)} if crashed is not None else {}),  # else: every row
                **({"failed": failed[:LOGGED_IDS]} if failed else {}),
            },
        )
        for rid in failed:
            log.error(
                "instance %d failed: the worker running its step died max_crashes times in a row",
                rid,
                extra={"event": "crash_limit", "instance": rid, "cause": cause},
            )
    return len(rows)


class Reaper(Sweep):
    """Rows whose lease expired (their worker's host is gone, or it stopped heartbeating)."""

    name = "reaper"

    def __init__(
        self,
        connect: Connect,
        q: Queries,
        registry: Registry,
        max_crashes: int,
        interval: float,
        lease: float,
    ):
        super().__init__(connect, interval, log)
        self.q, self.registry, self.max_crashes = q, registry, max_crashes
        self.lease = dt.timedelta(seconds=lease)

    def sweep(self, conn: psycopg.Connection[Any]) -> None:
        reclaim(conn, self.q, self.registry, self.max_crashes, lease=self.lease, expired=True)
