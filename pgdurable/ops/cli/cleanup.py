"""``pgdurable cleanup``: delete finished instances older than a given age, now, in batches.

The maintenance process's GC does the same on its own every ``gc_interval`` with the
config's ``retention``; this is the operator's one-off (a shorter retention for once, one
status only, a backlog after GC was off). Same rules as GC: only ``done``, ``failed`` and
``cancelled`` rows, never a finished child whose parent is still live, each batch its own
transaction with ``SKIP LOCKED`` (GC running meanwhile takes other rows), deleted by
``gc_delete_ids`` (their signals and remembered dedup keys go with them).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import click
import psycopg

from pgdurable.contract.spec import TERMINAL_STATUSES
from pgdurable.db.queries import Queries
from pgdurable.ops.cli.common import (
    INTERRUPTED,
    Duration,
    connected,
    database_options,
    json_option,
    plural,
    print_json,
    resolve,
    span,
)


@click.command("cleanup", short_help="delete finished instances older than a given age")
@database_options()
@click.option(
    "--older-than",
    "older",
    type=Duration(),
    required=True,
    help="delete what finished longer ago than this (7d, 12h, 30m)",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(TERMINAL_STATUSES),
    help="only this finished status (repeat for several; default: all three)",
)
@click.option("--dry-run", is_flag=True, help="delete nothing; say how many rows would go")
@click.option(
    "--batch", type=click.IntRange(1, 100_000), default=1000, show_default=True, help="rows per transaction"
)
@json_option
def cleanup(
    dsn: str | None,
    schema: str | None,
    config_path: str | None,
    older: dt.timedelta,
    statuses: tuple[str, ...],
    dry_run: bool,
    batch: int,
    as_json: bool,
) -> int:
    """Delete finished instances (done, failed, cancelled) not updated for --older-than,
    oldest first, in transactions of --batch rows, and say how many went (per status).

    Live rows are never touched, nor a finished child whose parent is still live (the
    parent reads it). Ctrl-C stops after the batch in progress: what was deleted stays
    deleted, and the count is printed.
    """
    chosen = list(statuses) or list(TERMINAL_STATUSES)
    target = resolve(dsn, schema, config_path)
    params = {"statuses": chosen, "older": older}
    counts: dict[str, int] = {}
    interrupted = False
    with connected(target) as (conn, q):
        if dry_run:
            for status, n in conn.execute(q["ops_cleanup_count"], params).fetchall():
                counts[status] = int(n)
        else:
            interrupted = delete(conn, q, params, batch, counts)
    total = sum(counts.values())
    if as_json:
        print_json(
            {
                "dry_run": dry_run,
                "older_than_seconds": older.total_seconds(),
                "statuses": chosen,
                "would_delete" if dry_run else "deleted": total,
                "by_status": counts,
                "interrupted": interrupted,
            }
        )
    else:
        what = "/".join(chosen)
        per = ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))
        detail = f" ({per})" if per else ""
        rows = plural(total, f"{what} row")
        verb = "would delete" if dry_run else "deleted"
        click.echo(f"{verb} {rows} finished over {span(older.total_seconds())} ago{detail}")
        if interrupted:
            click.echo("pgdurable: interrupted: the rows above are deleted, the rest were left", err=True)
    return INTERRUPTED if interrupted else 0


def delete(
    conn: psycopg.Connection[Any], q: Queries, params: dict[str, Any], batch: int, counts: dict[str, int]
) -> bool:
    """Delete in batches until one comes back short; ``counts`` grows per status as each
    batch commits. Returns True when interrupted (Ctrl-C) between or during batches."""
    try:
        while True:
            with conn.transaction():
                found = conn.execute(q["ops_cleanup_select_ids"], {**params, "limit": batch}).fetchall()
                if found:
                    conn.execute(q["gc_delete_ids"], {"ids": [r[0] for r in found]})
            for _id, status in found:  # committed: the rows are gone
                counts[status] = counts.get(status, 0) + 1
            if len(found) < batch:
                return False
    except KeyboardInterrupt:
        return True
