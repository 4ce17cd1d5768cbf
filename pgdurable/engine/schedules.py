"""Cron schedules in the database: the registration of the schedules declared in code, and
the pass that fires what is due (docs/schedules.md).

Every supervisor's maintenance process runs the pass, so each occurrence must be fired once
however many run it at the same instant. Three things make it so, each enough on its own
against a second pass (docs/findings.md, "A cron occurrence fires once"):

1. ``schedule_due_lock`` locks the due schedule rows ``FOR UPDATE SKIP LOCKED`` for the
   pass's transaction: a concurrent pass does not see them at all;
2. ``schedule_advance`` moves ``next_fire_at`` on only where it still holds the value the
   pass read: a pass that read a stale row advances nothing, and then fires nothing;
3. each occurrence is inserted under the correlation key ``schedule:NAME@TIME``, reserved
   in every status until GC: the same occurrence cannot be inserted twice.

The advance and the inserts commit together: an occurrence is fired and the schedule moved
past it, or neither.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgdurable.contract.errors import InvalidValue
from pgdurable.contract.schedule import Cron, ScheduleDecl, declared_schedules
from pgdurable.contract.spec import LIVE_STATUSES, STATUSES, encode_json
from pgdurable.db.queries import Queries

log = logging.getLogger("pgdurable.cron")

#: Schedules one transaction of the pass locks and fires.
BATCH = 100
#: The most occurrences counted as skipped when a long outage dropped many (the count is a
#: report, and walking a year of an every-second schedule is not worth it).
COUNT_CAP = 10_000


def occurrence_key(name: str, at: dt.datetime) -> str:
    """The correlation key of the occurrence of schedule ``name`` at ``at``."""
    return f"schedule:{name}@{at.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ}"


@dataclass
class FireReport:
    """What a pass did: the instances it inserted (schedule, occurrence key, id), the
    occurrences it did not fire (dropped by ``missed`` or ``overlap``), the previous runs it
    cancelled, and the schedules it could not fire (unknown machine, broken cron)."""

    fired: list[tuple[str, str, int]] = field(default_factory=list)
    skipped: int = 0
    cancelled: list[int] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    lost: int = 0  # schedules another pass had moved on (schedule_advance refused)
    failed: list[str] = field(default_factory=list)  # a database error: they stay due


def registration(decls: Iterable[ScheduleDecl]) -> dict[str, Any]:
    """The parameters of ``schedule_register_many``."""
    ds = list(decls)
    return {
        "names": [d.name for d in ds],
        "fsms": [d.fsm for d in ds],
        "crons": [d.cron for d in ds],
        "timezones": [d.tz for d in ds],
        "states": [d.state for d in ds],
        "queues": [d.queue for d in ds],
        "priorities": [d.priority for d in ds],
        "misseds": [d.missed for d in ds],
        "catch_up_limits": [d.catch_up_limit for d in ds],
        "overlaps": [d.overlap for d in ds],
        "enableds": [d.enabled for d in ds],
        "declareds": [encode_json(d.document()) for d in ds],
    }


def register(conn: psycopg.Connection[Any], q: Queries, machines: Iterable[Any]) -> list[str]:
    """Upsert the schedules declared on ``machines`` (see ``schedule_register_many`` for what
    an existing schedule keeps), then compute the next fire of those that need one. Returns
    the names created or changed."""
    decls = declared_schedules(machines)
    if not decls:
        return []
    with conn.transaction():
        changed = [row[0] for row in conn.execute(q["schedule_register_many"], registration(decls))]
    fill_next(conn, q)
    return changed


def fill_next(conn: psycopg.Connection[Any], q: Queries, *, at: dt.datetime | None = None) -> int:
    """Compute the next fire of the enabled schedules that have none (registered from code,
    or inserted by SQL), from the database's time (``at``: instead of it). A schedule whose
    cron or time zone does not parse is disabled with the reason. Returns the count."""
    with conn.transaction():
        rows = conn.execute(q["schedule_unset_lock"], {"limit": 1000}).fetchall()
        names: list[str] = []
        ats: list[dt.datetime] = []
        for name, expr, tz, now in rows:
            try:
                cron = Cron.parse(expr, tz)
            except InvalidValue as exc:
                _break(conn, q, name, str(exc))
                continue
            names.append(name)
            ats.append(cron.next_after(at or now))
        if names:
            conn.execute(q["schedule_set_next_many"], {"names": names, "ats": ats})
    return len(names)


def _break(conn: psycopg.Connection[Any], q: Queries, name: str, error: str) -> None:
    conn.execute(q["schedule_break"], {"name": name, "error": f"disabled: {error}"})
    log.error(
        "schedule %s disabled: %s",
        name,
        error,
        extra={"event": "schedule_broken", "schedule": name, "error": error},
    )


def fire_due(
    conn: psycopg.Connection[Any],
    q: Queries,
    *,
    at: dt.datetime | None = None,
    batch: int = BATCH,
    max_rounds: int = 10,
) -> FireReport:
    """Fire every schedule due now (``at``: as if it were that time), on an autocommit
    connection. Each batch is a transaction; each schedule in it a savepoint, so a database
    error while firing one leaves it due (the next pass tries again) and fires the rest."""
    report = FireReport()
    fill_next(conn, q, at=at)
    for _ in range(max_rounds):
        with conn.transaction():
            rows = conn.execute(q["schedule_due_lock"], {"at": at, "limit": batch}).fetchall()
            for row in rows:
                try:
                    with conn.transaction():
                        fire_one(conn, q, row, report)
                except psycopg.Error as exc:
                    report.errors[row[0]] = repr(exc)
                    report.failed.append(row[0])
                    log.warning(
                        "schedule %s: firing failed, it stays due: %r",
                        row[0],
                        exc,
                        extra={"event": "schedule_fire_failed", "schedule": row[0]},
                    )
        if len(rows) < batch:
            break
    return report


def fire_one(conn: psycopg.Connection[Any], q: Queries, row: Any, report: FireReport) -> None:
    """Fire one locked due schedule (a ``schedule_due_lock`` row), in the caller's
    transaction: advance it (guarded), apply its overlap policy, insert its occurrences."""
    (
        name,
        fsm,
        expr,
        tz,
        missed,
        catch_up_limit,
        overlap,
        old,
        last_id,
        last_error,
        known,
        last_status,
        now,
    ) = row
    try:
        cron = Cron.parse(expr, tz)
    except InvalidValue as exc:
        _break(conn, q, name, str(exc))
        report.errors[name] = str(exc)
        return
    upcoming = cron.next_after(now)
    want = catch_up_limit if missed == "catch_up" else 1
    due = cron.latest(now, since=old, limit=want)
    dropped = _count(cron, old, due[0]) if due else 0
    live = last_status in LIVE_STATUSES
    if not known:
        error = (
            f"machine {fsm!r} is not registered by any supervisor of this schema: its occurrences "
            "are skipped until one registers it"
        )
        if _advance(conn, q, name, old, upcoming, skipped=len(due) + dropped, error=error, report=report):
            report.errors[name] = error
            report.skipped += len(due) + dropped
            if last_error != error:  # once, not at every occurrence
                log.warning(
                    "schedule %s: %s",
                    name,
                    error,
                    extra={"event": "schedule_unknown_machine", "schedule": name, "fsm": fsm},
                )
        return
    if overlap != "allow" and len(due) > 1:
        # A run fired now would overlap the one fired with it: only the latest fires.
        dropped += len(due) - 1
        due = due[-1:]
    if overlap == "skip" and live and due:
        if _advance(conn, q, name, old, upcoming, skipped=len(due) + dropped, error=None, report=report):
            report.skipped += len(due) + dropped
            log.info(
                "schedule %s: previous run %s is %s, occurrence skipped",
                name,
                last_id,
                last_status,
                extra={"event": "schedule_overlap_skipped", "schedule": name, "instance": last_id},
            )
        return
    if not _advance(conn, q, name, old, upcoming, skipped=dropped, error=None, report=report):
        return
    report.skipped += dropped
    if dropped:
        log.warning(
            "schedule %s: %d missed occurrences not fired (missed = %s)",
            name,
            dropped,
            missed,
            extra={"event": "schedule_missed", "schedule": name, "dropped": dropped, "missed": missed},
        )
    if not due:
        return
    if overlap == "cancel" and live:
        reason = f"schedule {name}: superseded by its occurrence of {due[-1]:%Y-%m-%d %H:%M:%S} UTC"
        conn.execute(
            q["instance_cancel"],
            {"target_id": last_id, "target_key": None, "reason": reason, "cascade": True, "compensate": True},
        )
        report.cancelled.append(last_id)
        log.info(
            "schedule %s: previous run %s cancelled",
            name,
            last_id,
            extra={"event": "schedule_overlap_cancelled", "schedule": name, "instance": last_id},
        )
    keys = [occurrence_key(name, t) for t in due]
    params = {"name": name, "keys": keys, "fired_at": due[-1], "scope": list(STATUSES)}
    fired = conn.execute(q["schedule_fire"], params).fetchall()
    for iid, key, _ in fired:
        report.fired.append((name, key, iid))
        log.info(
            "schedule %s fired %s",
            name,
            key,
            extra={"event": "schedule_fired", "schedule": name, "key": key, "instance": iid},
        )


def _advance(
    conn: psycopg.Connection[Any],
    q: Queries,
    name: str,
    old: dt.datetime,
    upcoming: dt.datetime,
    *,
    skipped: int,
    error: str | None,
    report: FireReport,
) -> bool:
    params = {"name": name, "old": old, "next": upcoming, "skipped": skipped, "error": error}
    if conn.execute(q["schedule_advance"], params).fetchone() is None:
        report.lost += 1
        return False
    return True


def _count(cron: Cron, since: dt.datetime, before: dt.datetime) -> int:
    """Occurrences in [since, before), up to COUNT_CAP."""
    n, at = 0, since - dt.timedelta(microseconds=1)
    while n < COUNT_CAP:
        at = cron.next_after(at)
        if at >= before:
            break
        n += 1
    return n


def seconds_until_due(conn: psycopg.Connection[Any], q: Queries) -> float | None:
    """Seconds until the earliest fire of an enabled schedule (None: there is none)."""
    row = conn.execute(q["schedule_next_due"]).fetchone()
    return None if row is None or row[0] is None else float(row[0])
