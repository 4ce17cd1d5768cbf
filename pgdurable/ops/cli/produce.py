"""``pgdurable insert`` and ``pgdurable signal``: what a producer does, from a shell, through
the same client (``pgdurable.client.Client``) on one connection."""

from __future__ import annotations

import datetime as dt
from typing import Any

import click

from pgdurable.contract.errors import DuplicateInstance, NoTarget, UnknownMachine
from pgdurable.ops.cli.common import (
    NOT_FOUND,
    CliError,
    Duration,
    IsoTime,
    TimeOrDuration,
    connected,
    database_options,
    decode_json,
    json_option,
    print_json,
    resolve,
)


@click.command("insert", short_help="insert an instance of a machine, by name")
@database_options()
@click.argument("machine")
@click.argument("state_json", metavar="[STATE_JSON]", required=False)
@click.option("--queue", metavar="NAME", help="the queue (default: the one the machine registered)")
@click.option(
    "--priority", type=click.IntRange(-32768, 32767), default=0, help="lower runs first (default 0)"
)
@click.option(
    "--key", "correlation_key", metavar="KEY", help="correlation key: dedups inserts, addresses signals"
)
@click.option(
    "--concurrency-key", metavar="KEY", help="at most one executing instance per key (or its gate's limit)"
)
@click.option("--schedule-in", type=Duration(), help="runnable after this long (90, 30s, 5m, 2h)")
@click.option(
    "--schedule-at", type=IsoTime(), help="runnable at this ISO time (without an offset: local time)"
)
@click.option("--expires-in", type=Duration(), help="not started within this long: it ends instead (5m, 1h)")
@click.option("--expires-at", type=IsoTime(), help="not started by this ISO time: it ends instead")
@click.option(
    "--on-expiry",
    type=click.Choice(["fail", "cancel"]),
    default="fail",
    show_default=True,
    help="how an instance that expired ends",
)
@click.option(
    "--deadline",
    type=TimeOrDuration(),
    help="not finished by then, it fails: a duration from now (2h) or an ISO time",
)
@click.option(
    "--version",
    "machine_version",
    type=click.IntRange(min=1),
    help="the machine's version (default: the newest registered)",
)
@json_option
def insert(
    dsn: str | None,
    schema: str | None,
    config_path: str | None,
    machine: str,
    state_json: str | None,
    queue: str | None,
    priority: int,
    correlation_key: str | None,
    concurrency_key: str | None,
    schedule_in: dt.timedelta | None,
    schedule_at: dt.datetime | None,
    expires_in: dt.timedelta | None,
    expires_at: dt.datetime | None,
    on_expiry: str,
    deadline: dt.datetime | dt.timedelta | None,
    machine_version: int | None,
    as_json: bool,
) -> int:
    """Insert one instance of MACHINE (by name) with STATE_JSON (default {}; - reads stdin).

    The version, initial step and queue come from what the supervisors registered, as for
    a producer's insert by name. --expires-in/--expires-at: not started by then, it fails
    (or is cancelled: --on-expiry cancel) instead of running late; --deadline: not finished
    by then, it fails (docs/deadlines.md). Exit 3 when the correlation key is occupied or the
    machine is not registered and no --queue was given.
    """
    from pgdurable.client import Client

    state = decode_json(state_json, "STATE_JSON")
    options: dict[str, Any] = {
        "queue": queue,
        "priority": priority,
        "correlation_key": correlation_key,
        "concurrency_key": concurrency_key,
        "schedule_in": schedule_in,
        "schedule_at": schedule_at,
        "version": machine_version,
        "expires_in": expires_in,
        "expires_at": expires_at,
        "on_expiry": on_expiry,
    }
    if deadline is not None:  # else the machine's own deadline, if it declares one
        options["deadline"] = deadline
    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, _q), Client(target.dsn, schema=target.schema) as client:
        try:
            iid = client.insert(machine, {} if state is None else state, conn=conn, **options)
        except DuplicateInstance as exc:
            raise CliError(str(exc), NOT_FOUND) from exc
        except UnknownMachine as exc:
            raise CliError(
                f"machine {machine!r} is not registered in schema {target.schema!r} and no --queue was "
                "given: start a supervisor that runs it, or give --queue",
                NOT_FOUND,
            ) from exc
    if as_json:
        print_json({"id": iid})
    else:
        click.echo(f"inserted {machine} as instance {iid}")
    return 0


@click.command("signal", short_help="deliver a signal to a live instance")
@database_options()
@click.argument("target_ident", metavar="TARGET")
@click.argument("name")
@click.argument("payload_json", metavar="[PAYLOAD_JSON]", required=False)
@click.option("--dedup-key", metavar="KEY", help="deliver at most once per instance with this key")
@click.option("--by-key", is_flag=True, help="TARGET is a correlation key, even if it is all digits")
@json_option
def signal(
    dsn: str | None,
    schema: str | None,
    config_path: str | None,
    target_ident: str,
    name: str,
    payload_json: str | None,
    dedup_key: str | None,
    by_key: bool,
    as_json: bool,
) -> int:
    """Deliver signal NAME with PAYLOAD_JSON (default {}; - reads stdin) to TARGET, a live
    instance's id or correlation key; it wakes the instance if it awaits NAME.

    A duplicate --dedup-key stores nothing (exit 0, says so). Exit 3 when no live instance
    is TARGET (unknown, or already finished).
    """
    from pgdurable.client import Client

    payload = decode_json(payload_json, "PAYLOAD_JSON")
    who: int | str = int(target_ident) if target_ident.isdigit() and not by_key else target_ident
    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, _q), Client(target.dsn, schema=target.schema) as client:
        try:
            sid = client.signal(who, name, payload, dedup_key=dedup_key, conn=conn)
        except NoTarget as exc:
            raise CliError(str(exc), NOT_FOUND) from exc
    if as_json:
        print_json({"target": who, "name": name, "signal_id": sid, "duplicate": sid is None})
    elif sid is None:
        click.echo(f"duplicate: {dedup_key!r} was already delivered to {who!r}; nothing stored")
    else:
        click.echo(f"delivered {name!r} to {who!r} (signal {sid})")
    return 0
