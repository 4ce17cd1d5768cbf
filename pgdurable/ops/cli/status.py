"""``pgdurable status``: per queue, how much work is where, how old the oldest due row is,
and whether any live worker is seen.

What the database can tell about workers, and what it cannot: a worker process holds one
feeder connection (``application_name = 'pgdurable feeder QUEUE'``), visible in
``pg_stat_activity`` while the process runs, idle or not — but that name carries no schema,
so a worker of another schema in this database with a queue of the same name counts too.
A worker that holds rows is also seen by their owner (``HOST:KEY:PID:RANDOM/queue/index/pid``)
and lease: a lease still running means its heartbeat reached the database within the
lease. A worker connected to another database, or one between two reconnections, is not
seen at all. "No live worker seen" therefore means: no feeder connection for that queue in
this database and no row of it held under a running lease.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

import click

from pgdurable.db import migrations
from pgdurable.ops.cli.common import (
    Duration,
    age,
    clip,
    connected,
    database_options,
    json_option,
    plural,
    print_json,
    resolve,
    rows,
    span,
    table,
)


@click.command("status", short_help="per queue: counts, the oldest due row, workers seen")
@database_options()
@click.option(
    "--window",
    type=Duration(),
    default="1h",
    show_default=True,
    help="count the rows that finished within this long",
)
@click.option(
    "--awaiting",
    is_flag=True,
    help="also count the rows awaiting a signal or children (one sequential scan of the table: "
    "no index holds them by queue)",
)
@json_option
def status(
    dsn: str | None,
    schema: str | None,
    config_path: str | None,
    window: dt.timedelta,
    awaiting: bool,
    as_json: bool,
) -> int:
    """Per queue: runnable rows (due now, the oldest due row's wait), executing rows and
    expired leases, held rows, rows finished within --window, and the workers seen.

    Every count but --awaiting's reads a partial index, never the whole table. A worker
    is seen by its feeder connection to this database (pg_stat_activity) or by rows it
    holds under a running lease; "no live worker seen" is printed for a queue with due
    rows, or with registered machines, that has neither.
    """
    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, q):
        queues = rows(conn.execute(q["ops_status_queues"], {"window": window}))
        owners = rows(conn.execute(q["ops_status_owners"]))
        listeners = {r["queue"]: int(r["feeders"]) for r in rows(conn.execute(q["ops_status_listeners"]))}
        waiting = {r["queue"]: r for r in rows(conn.execute(q["ops_status_awaiting"]))} if awaiting else None
        database = conn.info.dbname
        schedule_errors = rows(conn.execute(q["schedule_errors"]))
    doc = build(target.schema, database, window, queues, owners, listeners, waiting)
    # Schedules whose last occurrence did not fire (docs/schedules.md): a problem each.
    doc["schedule_errors"] = schedule_errors
    doc["problems"] += [f"schedule {r['name']}: {r['last_error']}" for r in schedule_errors]
    if as_json:
        print_json(doc)
    else:
        render(doc, window)
    return 0


def host_of(owner: str) -> str:
    """The host part of a row owner (``HOST:KEY:PID:RANDOM/queue/index/pid``)."""
    return owner.split("/", 1)[0].split(":", 1)[0]


def build(
    schema: str,
    database: str,
    window: dt.timedelta,
    queues: list[dict[str, Any]],
    owners: list[dict[str, Any]],
    listeners: dict[str, int],
    waiting: dict[str, dict[str, Any]] | None,
) -> dict[str, Any]:
    """The status document (``--json`` prints it as is; the text is rendered from it)."""
    by_queue: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for o in owners:
        by_queue[o["queue"]].append(o)
    names = sorted({r["queue"] for r in queues} | set(by_queue) | set(waiting or ()))
    info = {r["queue"]: r for r in queues}
    out: list[dict[str, Any]] = []
    problems: list[str] = []
    for name in names:
        r = info.get(name, {})
        hosts: dict[str, dict[str, int]] = defaultdict(lambda: {"workers": 0, "rows": 0})
        for o in by_queue.get(name, []):
            if o["live"]:
                hosts[host_of(o["owner"])]["workers"] += 1
                hosts[host_of(o["owner"])]["rows"] += int(o["rows"])
        feeders = listeners.get(name, 0)
        seen = feeders > 0 or bool(hosts)
        entry: dict[str, Any] = {
            "queue": name,
            "paused": bool(r.get("paused")),
            "machines": list(r.get("machines") or []),
            "runnable": int(r.get("runnable") or 0),
            "due": int(r.get("due") or 0),
            "oldest_due_age": r.get("oldest_due_age"),
            "next_due_in": r.get("next_due_in"),
            "executing": int(r.get("executing") or 0),
            "expired_leases": int(r.get("expired") or 0),
            "held": int(r.get("held") or 0),
            "finished": {k: int(r.get(k) or 0) for k in ("done", "failed", "cancelled")},
            "last_finished_age": r.get("last_finished_age"),
            "workers": {
                "listening": feeders,
                "holding": [{"host": h, **v} for h, v in sorted(hosts.items())],
                "live_worker_seen": seen,
            },
        }
        if waiting is not None:
            w = waiting.get(name, {})
            entry["awaiting_signal"] = int(w.get("awaiting_signal") or 0)
            entry["awaiting_children"] = int(w.get("awaiting_children") or 0)
        entry["problems"] = queue_problems(entry)
        problems += entry["problems"]
        out.append(entry)
    return {
        "database": database,
        "schema": schema,
        "schema_version": migrations.latest(),
        "window_seconds": window.total_seconds(),
        "queues": out,
        "problems": problems,
    }


def queue_problems(e: dict[str, Any]) -> list[str]:
    q = e["queue"]
    out = []
    if not e["workers"]["live_worker_seen"]:
        if e["due"]:
            out.append(
                f"queue {q}: {plural(e['due'], 'due row')}, the oldest waiting {age(e['oldest_due_age'])}, "
                "and no live worker seen"
            )
        elif e["machines"]:
            out.append(
                f"queue {q}: machines {', '.join(e['machines'])} are registered on it, "
                "but no live worker seen"
            )
    if e["expired_leases"]:
        out.append(
            f"queue {q}: {plural(e['expired_leases'], 'executing row')} whose lease expired "
            "(their worker is gone; a maintenance process's reaper returns them)"
        )
    if e["held"]:
        out.append(f"queue {q}: {plural(e['held'], 'held row')} (pgdurable list --status held --queue {q})")
    return out


def workers_text(w: dict[str, Any]) -> str:
    if not w["live_worker_seen"]:
        return "no live worker seen"
    parts = []
    if w["listening"]:
        parts.append(f"{w['listening']} listening")
    if w["holding"]:
        held = ", ".join(
            f"{h['host']} ({plural(h['workers'], 'worker')}, {plural(h['rows'], 'row')})"
            for h in w["holding"]
        )
        parts.append(f"holding: {held}")
    return "; ".join(parts)


def render(doc: dict[str, Any], window: dt.timedelta) -> None:
    click.echo(
        f"database {doc['database']}, schema {doc['schema']} (version {doc['schema_version']}); "
        f"finished: the last {span(window.total_seconds())}"
    )
    if not doc["queues"]:
        click.echo("no queues: no rows and no registered machines")
        for p in doc["problems"]:
            click.echo(p)
        return
    awaiting = "awaiting_signal" in doc["queues"][0]
    cancelled = any(e["finished"]["cancelled"] for e in doc["queues"])
    headers = ["QUEUE", "MACHINES", "RUNNABLE", "DUE", "OLDEST DUE", "EXECUTING", "HELD"]
    headers += ["AWAIT SIGNAL", "AWAIT CHILDREN"] if awaiting else []
    headers += ["DONE", "FAILED"] + (["CANCELLED"] if cancelled else []) + ["WORKERS"]
    body = []
    for e in doc["queues"]:
        line = [
            e["queue"] + (" (paused)" if e["paused"] else ""),
            clip(",".join(e["machines"]) or "-", 24),
            e["runnable"],
            e["due"],
            age(e["oldest_due_age"]),
            e["executing"]
            if not e["expired_leases"]
            else f"{e['executing']} ({e['expired_leases']} expired)",
            e["held"],
        ]
        line += [e["awaiting_signal"], e["awaiting_children"]] if awaiting else []
        line += [e["finished"]["done"], e["finished"]["failed"]]
        line += [e["finished"]["cancelled"]] if cancelled else []
        line.append(workers_text(e["workers"]))
        body.append(line)
    click.echo()
    click.echo(table(headers, body))
    if doc["problems"]:
        click.echo()
        for p in doc["problems"]:
            click.echo(p)
