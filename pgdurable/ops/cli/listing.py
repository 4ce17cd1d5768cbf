"""``pgdurable list``: instances, newest first, filtered, a page at a time."""

from __future__ import annotations

from typing import Any

import click

from pgdurable.contract.spec import STATUSES
from pgdurable.ops.cli.common import (
    TimeOrAgo,
    When,
    age,
    clip,
    connected,
    database_options,
    json_option,
    print_json,
    resolve,
    rows,
    table,
)


@click.command("list", short_help="instances, filtered, newest first, a page at a time")
@database_options()
@click.option("--machine", metavar="NAME", help="only instances of this machine")
@click.option("--queue", metavar="NAME", help="only instances on this queue")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(STATUSES),
    help="only instances in this status (repeat for several)",
)
@click.option("--key", metavar="KEY", help="only instances with this correlation key")
@click.option(
    "--since", type=TimeOrAgo(), help="changed at or after: an ISO time, or a duration ago (1h, 30m, 2d)"
)
@click.option("--until", type=TimeOrAgo(), help="changed before: an ISO time, or a duration ago")
@click.option(
    "--time",
    "time_column",
    type=click.Choice(["updated", "inserted"]),
    default="updated",
    show_default=True,
    help="which time --since and --until compare: the last change (updated_at) or the insert",
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="rows per page")
@click.option(
    "--cursor", type=click.IntRange(min=1), help="the next page: the cursor the previous page printed"
)
@json_option
def list_(
    dsn: str | None,
    schema: str | None,
    config_path: str | None,
    machine: str | None,
    queue: str | None,
    statuses: tuple[str, ...],
    key: str | None,
    since: When | None,
    until: When | None,
    time_column: str,
    limit: int,
    cursor: int | None,
    as_json: bool,
) -> int:
    """Instances, newest id first, --limit per page.

    When more rows match, the last line gives the --cursor of the next page (keyset paging
    on the id: a page costs the same however deep it is, and rows inserted meanwhile do
    not shift it).
    """
    target = resolve(dsn, schema, config_path)
    params: dict[str, Any] = {
        "cursor": cursor,
        "machine": machine,
        "queue": queue,
        "statuses": list(statuses) or None,
        "key": key,
        "on_inserted": time_column == "inserted",
        "since_at": since.at if since else None,
        "since_ago": since.ago if since else None,
        "until_at": until.at if until else None,
        "until_ago": until.ago if until else None,
        "limit": limit + 1,  # one more than shown: is there a next page?
    }
    with connected(target) as (conn, q):
        # Never prepared: each run is planned for its own values, so the filters left NULL
        # fold away and an index can serve the rest.
        found = rows(conn.execute(q["ops_instance_list"], params, prepare=False))
    page, more = found[:limit], len(found) > limit
    next_cursor = page[-1]["id"] if more else None
    if as_json:
        print_json({"instances": page, "next_cursor": next_cursor})
        return 0
    if not page:
        click.echo("no instances match")
        return 0
    click.echo(
        table(
            ["ID", "MACHINE", "STEP", "STATUS", "QUEUE", "ATTEMPT", "KEY", "UPDATED", "LAST ERROR"],
            [
                [
                    r["id"],
                    f"{r['fsm']}@{r['version'] if r['version'] is not None else '?'}",
                    r["step"] or "-",
                    r["status"],
                    r["queue"],
                    r["attempt"] if not r["crashes"] else f"{r['attempt']} ({r['crashes']} crashes)",
                    clip(r["correlation_key"], 24),
                    age(r["updated_age"]),
                    clip(r["last_error"], 60),
                ]
                for r in page
            ],
        )
    )
    if next_cursor is not None:
        click.echo(f"next page: --cursor {next_cursor}")
    return 0
