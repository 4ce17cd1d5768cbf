"""``pgdurable schedule list|create|update|enable|disable|trigger|delete``: cron schedules,
through the same client (``pgdurable.client.Client``). The semantics are in
docs/schedules.md."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from pgdurable.contract.errors import NoTarget, OperationRefused, UnknownMachine
from pgdurable.ops.cli.common import (
    NOT_FOUND,
    CliError,
    clip,
    connected,
    database_options,
    decode_json,
    json_option,
    print_json,
    resolve,
    table,
    when,
)

if TYPE_CHECKING:
    from pgdurable.client import Schedule

_F = TypeVar("_F", bound=Callable[..., Any])

#: What the client raises when a schedule is not there, or refuses the request.
_REFUSED = (NoTarget, OperationRefused, UnknownMachine)


def _doc(s: Schedule) -> dict[str, Any]:
    return {
        "name": s.name,
        "machine": s.fsm,
        "cron": s.cron,
        "timezone": s.timezone,
        "state": s.state,
        "queue": s.queue,
        "priority": s.priority,
        "missed": s.missed,
        "catch_up_limit": s.catch_up_limit,
        "overlap": s.overlap,
        "enabled": s.enabled,
        "next_fire_at": s.next_fire_at,
        "last_fire_at": s.last_fire_at,
        "last_instance_id": s.last_instance_id,
        "fires": s.fires,
        "skipped": s.skipped,
        "last_error": s.last_error,
        "last_error_at": s.last_error_at,
        "source": s.source,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
    }


def _now(conn: Any, q: Any) -> dt.datetime:
    """The database's time (next fires are shown relative to it)."""
    row = conn.execute(q["schedule_now"]).fetchone()
    return row[0] if row else dt.datetime.now(dt.UTC)


def _describe(s: Schedule, now: dt.datetime) -> str:
    queue = s.queue or "(the machine's)"
    lines = [
        f"schedule {s.name}: machine {s.fsm}, cron {s.cron!r} in {s.timezone}, "
        + ("enabled" if s.enabled else "disabled"),
        f"  next fire: {when(s.next_fire_at, now) if s.enabled else '- (disabled)'}",
        f"  queue {queue}, priority {s.priority}, missed {s.missed}"
        + (f" (up to {s.catch_up_limit})" if s.missed == "catch_up" else "")
        + f", overlap {s.overlap}",
    ]
    if s.last_error:
        lines.append(f"  last error: {s.last_error}")
    return "\n".join(lines)


def _policy_options(f: _F) -> _F:
    f = click.option(
        "--overlap",
        type=click.Choice(["allow", "skip", "cancel"]),
        help="the previous run still live: fire anyway, skip, or cancel it",
    )(f)
    f = click.option(
        "--catch-up-limit", type=click.IntRange(min=1), help="with --missed catch_up: at most this many"
    )(f)
    f = click.option(
        "--missed",
        type=click.Choice(["skip", "catch_up"]),
        help="several occurrences due at once: fire the latest only, or catch up",
    )(f)
    f = click.option("--priority", type=click.IntRange(-32768, 32767), help="the instances' priority")(f)
    f = click.option("--queue", metavar="NAME", help="the instances' queue (default: the machine's)")(f)
    f = click.option("--state", "state_json", metavar="JSON", help="the state each run starts with")(f)
    f = click.option("--tz", metavar="ZONE", help="IANA time zone of the cron expression (default UTC)")(f)
    return f


@click.group("schedule", short_help="cron schedules: list, create, update, enable, disable, trigger, delete")
def schedule() -> None:
    """Cron schedules: each occurrence inserts an instance of a machine (docs/schedules.md).

    Exit 3 when the named schedule is not there (or, for create, is there already; for
    trigger, its machine is registered by no supervisor).
    """


@schedule.command("list", short_help="every schedule, with its next fire time")
@database_options()
@json_option
def list_schedules(dsn: str | None, schema: str | None, config_path: str | None, as_json: bool) -> int:
    """Every schedule, by name, with its next fire time (UTC) and its last error."""
    from pgdurable.client import Client

    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, q), Client(target.dsn, schema=target.schema) as client:
        found = client.schedules(conn=conn)
        now = _now(conn, q)
    if as_json:
        print_json([_doc(s) for s in found])
        return 0
    if not found:
        click.echo("no schedules")
        return 0
    body = [
        (
            s.name,
            s.fsm,
            s.cron,
            s.timezone,
            "yes" if s.enabled else "no",
            when(s.next_fire_at, now) if s.enabled else "-",
            s.fires,
            clip(s.last_error, 40),
        )
        for s in found
    ]
    click.echo(table(("NAME", "MACHINE", "CRON", "ZONE", "ENABLED", "NEXT FIRE", "FIRES", "ERROR"), body))
    return 0


@schedule.command("create", short_help="create a schedule")
@database_options()
@click.argument("name")
@click.argument("machine")
@click.argument("cron")
@_policy_options
@click.option("--disabled", is_flag=True, help="create it disabled")
@json_option
def create(
    dsn: str | None,
    schema: str | None,
    config_path: str | None,
    name: str,
    machine: str,
    cron: str,
    tz: str | None,
    state_json: str | None,
    queue: str | None,
    priority: int | None,
    missed: str | None,
    catch_up_limit: int | None,
    overlap: str | None,
    disabled: bool,
    as_json: bool,
) -> int:
    """Create schedule NAME: each occurrence of CRON (5 fields, e.g. '0 9 * * MON-FRI' or
    @daily; 6 with a leading seconds field) inserts an instance of MACHINE. Exit 3 when
    NAME is taken."""
    from pgdurable.client import Client

    state = decode_json(state_json, "--state")
    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, q), Client(target.dsn, schema=target.schema) as client:
        now = _now(conn, q)
        try:
            s = client.create_schedule(
                name,
                machine,
                cron,
                tz=tz or "UTC",
                state=state,
                queue=queue,
                priority=priority or 0,
                missed=missed or "skip",
                catch_up_limit=catch_up_limit or 10,
                overlap=overlap or "allow",
                enabled=not disabled,
                conn=conn,
            )
        except _REFUSED as exc:
            raise CliError(str(exc), NOT_FOUND) from exc
    if as_json:
        print_json(_doc(s))
    else:
        click.echo(_describe(s, now))
    return 0


@schedule.command("update", short_help="change fields of a schedule")
@database_options()
@click.argument("name")
@click.option("--machine", metavar="NAME", help="the machine each occurrence inserts")
@click.option("--cron", metavar="EXPR", help="a new cron expression (the next fire is recomputed)")
@_policy_options
@click.option("--machine-queue", is_flag=True, help="use the machine's queue again (undo --queue)")
@json_option
def update(
    dsn: str | None,
    schema: str | None,
    config_path: str | None,
    name: str,
    machine: str | None,
    cron: str | None,
    tz: str | None,
    state_json: str | None,
    queue: str | None,
    priority: int | None,
    missed: str | None,
    catch_up_limit: int | None,
    overlap: str | None,
    machine_queue: bool,
    as_json: bool,
) -> int:
    """Change the given fields of schedule NAME; the others stay. On a schedule declared in
    code, a change holds until a deploy changes that field in code. Exit 3 when there is no
    schedule NAME."""
    from pgdurable.client import Client
    from pgdurable.client.schedules import UNCHANGED

    if machine_queue and queue is not None:
        raise CliError("give --queue or --machine-queue, not both")
    changes: dict[str, Any] = {
        "fsm": machine,
        "cron": cron,
        "tz": tz,
        "state": decode_json(state_json, "--state"),
        "priority": priority,
        "missed": missed,
        "catch_up_limit": catch_up_limit,
        "overlap": overlap,
        "queue": queue,
    }
    changes = {k: (UNCHANGED if v is None else v) for k, v in changes.items()}
    if machine_queue:
        changes["queue"] = None
    if all(v is UNCHANGED for v in changes.values()):
        raise CliError("nothing to change: give at least one option (see --help)")
    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, q), Client(target.dsn, schema=target.schema) as client:
        now = _now(conn, q)
        try:
            s = client.update_schedule(name, **changes, conn=conn)
        except _REFUSED as exc:
            raise CliError(str(exc), NOT_FOUND) from exc
    if as_json:
        print_json(_doc(s))
    else:
        click.echo(_describe(s, now))
    return 0


def _switch(verb: str, on: bool) -> click.Command:
    @schedule.command(verb, short_help=f"{verb} a schedule")
    @database_options()
    @click.argument("name")
    @json_option
    def command(
        dsn: str | None, schema: str | None, config_path: str | None, name: str, as_json: bool
    ) -> int:
        from pgdurable.client import Client

        target = resolve(dsn, schema, config_path)
        with connected(target) as (conn, _q), Client(target.dsn, schema=target.schema) as client:
            try:
                changed = (client.enable_schedule if on else client.disable_schedule)(name, conn=conn)
                s = client.get_schedule(name, conn=conn)
            except _REFUSED as exc:
                raise CliError(str(exc), NOT_FOUND) from exc
        assert s is not None
        if as_json:
            print_json({**_doc(s), "changed": changed})
        elif changed:
            click.echo(
                f"schedule {name} {verb}d"
                + (f"; next fire {s.next_fire_at:%Y-%m-%d %H:%M:%S} UTC" if on and s.next_fire_at else "")
            )
        else:
            click.echo(f"schedule {name} was {verb}d already")
        return 0

    command.__doc__ = (
        "Enable schedule NAME: its next fire is computed from now (what it missed while "
        "disabled is not fired). Exit 3 when there is no schedule NAME."
        if on
        else "Disable schedule NAME: it fires nothing until enabled, across restarts too "
        "(also when declared in code). Exit 3 when there is no schedule NAME."
    )
    return command


enable = _switch("enable", True)
disable = _switch("disable", False)


@schedule.command("trigger", short_help="fire a schedule now, outside its cron")
@database_options()
@click.argument("name")
@json_option
def trigger(dsn: str | None, schema: str | None, config_path: str | None, name: str, as_json: bool) -> int:
    """Insert one run of schedule NAME now (enabled or not); its next fire is unchanged.
    Exit 3 when there is no schedule NAME, or no supervisor registered its machine."""
    from pgdurable.client import Client

    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, _q), Client(target.dsn, schema=target.schema) as client:
        try:
            iid = client.trigger_schedule(name, conn=conn)
        except _REFUSED as exc:
            raise CliError(str(exc), NOT_FOUND) from exc
    if as_json:
        print_json({"schedule": name, "id": iid})
    else:
        click.echo(f"schedule {name} triggered: instance {iid}")
    return 0


@schedule.command("delete", short_help="delete a schedule")
@database_options()
@click.argument("name")
@json_option
def delete(dsn: str | None, schema: str | None, config_path: str | None, name: str, as_json: bool) -> int:
    """Delete schedule NAME (the instances it inserted stay). One declared in code comes
    back at the next supervisor start: disable it, or remove the declaration first. Exit 3
    when there is no schedule NAME."""
    from pgdurable.client import Client

    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, _q), Client(target.dsn, schema=target.schema) as client:
        try:
            client.delete_schedule(name, conn=conn)
        except _REFUSED as exc:
            raise CliError(str(exc), NOT_FOUND) from exc
    if as_json:
        print_json({"schedule": name, "deleted": True})
    else:
        click.echo(f"schedule {name} deleted")
    return 0
