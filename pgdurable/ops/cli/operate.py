"""``pgdurable cancel``, ``retry``, ``rewind``, ``pause``, ``resume``: acting on instances
and queues, through the same client (``pgdurable.client.Client``). The semantics are in
docs/operating.md."""

from __future__ import annotations

import datetime as dt

import click

from pgdurable.contract.errors import (
    InstanceExecuting,
    NoTarget,
    OperationRefused,
    UnknownMachine,
    UnknownStep,
)
from pgdurable.ops.cli.common import (
    NOT_FOUND,
    CliError,
    TimeOrAgo,
    When,
    connected,
    database_options,
    decode_json,
    json_option,
    print_json,
    resolve,
)

#: What the client raises when an instance is not in a state that allows the request.
_REFUSED = (NoTarget, InstanceExecuting, OperationRefused, UnknownMachine, UnknownStep)


_STATE_FROM = {
    "given": "the given state",
    "history": "its state when that step last ran",
    "stored": "its stored state (no history of that step)",
}


def _who(ident: str, by_key: bool) -> int | str:
    return int(ident) if ident.isdigit() and not by_key else ident


@click.command("cancel", short_help="cancel an instance (and its live children)")
@database_options()
@click.argument("target_ident", metavar="ID|KEY")
@click.option("--reason", metavar="TEXT", help="stored as the instance's last error")
@click.option("--no-cascade", is_flag=True, help="leave its live children running")
@click.option("--no-compensate", is_flag=True, help="skip the machine's on_cancel step")
@click.option("--by-key", is_flag=True, help="ID|KEY is a correlation key, even if it is all digits")
@json_option
def cancel(
    dsn: str | None,
    schema: str | None,
    config_path: str | None,
    target_ident: str,
    reason: str | None,
    no_cascade: bool,
    no_compensate: bool,
    by_key: bool,
    as_json: bool,
) -> int:
    """Cancel the instance ID (or the live one holding correlation key KEY).

    Not executing, it ends cancelled now (or runs its machine's on_cancel step first);
    executing, it is marked and ends cancelled when its step returns, the step's outcome
    discarded. Its live children are cancelled too unless --no-cascade. Exit 3 when there is
    no such instance.
    """
    from pgdurable.client import Client

    who = _who(target_ident, by_key)
    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, _q), Client(target.dsn, schema=target.schema) as client:
        try:
            res = client.cancel(who, reason, cascade=not no_cascade, compensate=not no_compensate, conn=conn)
        except _REFUSED as exc:
            raise CliError(str(exc), NOT_FOUND) from exc
    if as_json:
        print_json(
            {"id": res.id, "outcome": res.outcome, "status": res.status, "descendants": res.descendants}
        )
        return 0
    said = {
        "cancelled": "cancelled",
        "cancelling": "cancelling: it runs its on_cancel step, then ends cancelled",
        "marked": "marked: it ends cancelled when its running step returns",
        "terminal": f"already finished ({res.status}); nothing to do",
    }.get(res.outcome, res.outcome)
    click.echo(f"instance {res.id}: {said}")
    for outcome, n in sorted(res.descendants.items()):
        click.echo(f"  descendants {outcome}: {n}")
    return 0


@click.command("retry", short_help="put failed (or cancelled) instances back where they ended")
@database_options()
@click.argument("iid", metavar="[ID]", type=click.IntRange(min=1), required=False)
@click.option("--machine", metavar="NAME", help="every failed instance of this machine")
@click.option("--queue", metavar="NAME", help="every failed instance in this queue")
@click.option("--error-like", metavar="PATTERN", help="whose last error matches (ILIKE, e.g. '%timeout%')")
@click.option("--since", type=TimeOrAgo(), help="that failed at or after this (ISO time, or 1h, 30m, 2d ago)")
@click.option("--dry-run", is_flag=True, help="only say how many match")
@json_option
def retry(
    dsn: str | None,
    schema: str | None,
    config_path: str | None,
    iid: int | None,
    machine: str | None,
    queue: str | None,
    error_like: str | None,
    since: When | None,
    dry_run: bool,
    as_json: bool,
) -> int:
    """Retry instance ID — or, with filters instead of an ID, every failed instance that
    matches them (the morning after an outage; --dry-run first).

    A retried instance runs the step it ended in again, now, with its stored state; attempt
    and crash counts start from zero. Exit 3 when ID is unknown or not failed or cancelled.
    """
    from pgdurable.client import Client

    filtered = any(v is not None for v in (machine, queue, error_like, since))
    if (iid is None) == (not filtered):
        raise CliError("give an instance ID, or filters (--machine, --queue, --error-like, --since)")
    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, _q), Client(target.dsn, schema=target.schema) as client:
        if iid is not None:
            if dry_run:
                raise CliError("--dry-run goes with filters, not with an ID")
            try:
                step = client.retry(iid, conn=conn)
            except _REFUSED as exc:
                raise CliError(str(exc), NOT_FOUND) from exc
            if as_json:
                print_json({"id": iid, "step": step})
            else:
                click.echo(f"instance {iid} retries step {step!r}")
            return 0
        ago: dt.datetime | dt.timedelta | None = None
        if since is not None:
            ago = since.at if since.at is not None else since.ago
        report = client.retry_many(
            machine=machine, queue=queue, error_like=error_like, since=ago, dry_run=dry_run
        )
    if as_json:
        print_json(
            {
                "matched": report.matched,
                "retried": report.retried,
                "skipped": report.skipped,
                "dry_run": report.dry_run,
            }
        )
    elif report.dry_run:
        click.echo(f"{report.matched} failed instances match; nothing changed (dry run)")
    else:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(report.skipped.items()))
        click.echo(
            f"retried {report.retried} of {report.matched} matching instances"
            + (f"; skipped: {skipped}" if skipped else "")
        )
    return 0


@click.command("rewind", short_help="move an instance back to an earlier step")
@database_options()
@click.argument("iid", metavar="ID", type=click.IntRange(min=1))
@click.argument("step")
@click.argument("state_json", metavar="[STATE_JSON]", required=False)
@json_option
def rewind(
    dsn: str | None,
    schema: str | None,
    config_path: str | None,
    iid: int,
    step: str,
    state_json: str | None,
    as_json: bool,
) -> int:
    """Move instance ID (live or finished, not executing) to STEP of its machine version,
    runnable now, with STATE_JSON (- reads stdin); without it, with the state the instance
    had when STEP last ran (its step history), else its stored state.

    Exit 3 when the instance is unknown or executing, or STEP is not one of its machine's.
    """
    from pgdurable.client import Client

    state = decode_json(state_json, "STATE_JSON")
    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, _q), Client(target.dsn, schema=target.schema) as client:
        try:
            done = client.rewind(iid, step, state, conn=conn)
        except _REFUSED as exc:
            raise CliError(str(exc), NOT_FOUND) from exc
    if as_json:
        print_json({"id": iid, "step": step, "version": done.version, "state_from": done.state_from})
    else:
        click.echo(f"instance {iid} rewound to step {step!r} with {_STATE_FROM[done.state_from]}")
    return 0


@click.command("pause", short_help="stop a queue's workers claiming, on every host")
@database_options()
@click.argument("queue")
@json_option
def pause(dsn: str | None, schema: str | None, config_path: str | None, queue: str, as_json: bool) -> int:
    """Pause QUEUE: from their next claim on, its workers on every host claim nothing;
    steps already running finish. Stored in the database: it outlives restarts."""
    from pgdurable.client import Client

    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, _q), Client(target.dsn, schema=target.schema) as client:
        changed = client.pause(queue, conn=conn)
    if as_json:
        print_json({"queue": queue, "paused": True, "changed": changed})
    else:
        click.echo(f"queue {queue} paused" if changed else f"queue {queue} was paused already")
    return 0


@click.command("resume", short_help="let a paused queue's workers claim again")
@database_options()
@click.argument("queue")
@json_option
def resume(dsn: str | None, schema: str | None, config_path: str | None, queue: str, as_json: bool) -> int:
    """Resume QUEUE and wake its workers."""
    from pgdurable.client import Client

    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, _q), Client(target.dsn, schema=target.schema) as client:
        changed = client.resume(queue, conn=conn)
    if as_json:
        print_json({"queue": queue, "paused": False, "changed": changed})
    else:
        click.echo(f"queue {queue} resumed" if changed else f"queue {queue} was not paused")
    return 0
