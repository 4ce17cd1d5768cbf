"""``pgdurable inputs`` and ``pgdurable respond``: the pending inputs, and answering one
(docs/inputs.md), through the client on one connection."""

from __future__ import annotations

import datetime as dt

import click

from pgdurable.contract.errors import NoTarget
from pgdurable.ops.cli.common import (
    NOT_FOUND,
    CliError,
    clip,
    compact,
    connected,
    database_options,
    decode_json,
    json_option,
    print_json,
    resolve,
    table,
    when,
)


@click.command("inputs", short_help="instances waiting for input: prompt, name, schema, deadline")
@database_options()
@click.option("--machine", metavar="NAME", help="only inputs of this machine")
@click.option("--queue", metavar="NAME", help="only inputs of instances on this queue")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="rows per page")
@click.option("--cursor", type=click.IntRange(min=0), default=0, help="the next page: the cursor printed")
@json_option
def inputs(
    dsn: str | None,
    schema: str | None,
    config_path: str | None,
    machine: str | None,
    queue: str | None,
    limit: int,
    cursor: int,
    as_json: bool,
) -> int:
    """The pending inputs: instances parked on an Await that asks for input, oldest
    instance first, with the prompt, the signal NAME to answer on, the choices, the JSON
    Schema of the answer (--json) and when the await times out. Answer one with
    `pgdurable respond INSTANCE NAME VALUE_JSON`.
    """
    from pgdurable.client import Client

    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, _q), Client(target.dsn, schema=target.schema) as client:
        found = client.inputs(machine=machine, queue=queue, after=cursor, limit=limit + 1, conn=conn)
        now = dt.datetime.now(dt.UTC)
    page, more = found[:limit], len(found) > limit
    next_cursor = page[-1].instance if more else None
    if as_json:
        print_json(
            {
                "inputs": [
                    {
                        "instance": p.instance,
                        "machine": p.fsm,
                        "version": p.version,
                        "step": p.step,
                        "name": p.name,
                        "prompt": p.prompt,
                        "choices": p.choices,
                        "schema": p.schema,
                        "deadline": p.deadline,
                        "queue": p.queue,
                        "correlation_key": p.correlation_key,
                        "asked_at": p.asked_at,
                    }
                    for p in page
                ],
                "next_cursor": next_cursor,
            }
        )
        return 0
    if not page:
        click.echo("no pending inputs")
        return 0
    click.echo(
        table(
            ["INSTANCE", "MACHINE", "STEP", "NAME", "PROMPT", "CHOICES", "DEADLINE"],
            [
                [
                    _who(p.instance, p.correlation_key),
                    f"{p.fsm}@{p.version if p.version is not None else '?'}",
                    p.step,
                    p.name,
                    clip(p.prompt, 50),
                    clip(compact(p.choices), 30) if p.choices is not None else "-",
                    when(p.deadline, now),
                ]
                for p in page
            ],
        )
    )
    if next_cursor is not None:
        click.echo(f"next page: --cursor {next_cursor}")
    return 0


def _who(instance: int, key: str | None) -> str:
    return str(instance) if key is None else f"{instance} ({clip(key, 24)})"


@click.command("respond", short_help="answer a pending input (checked against its schema)")
@database_options()
@click.argument("target_ident", metavar="TARGET")
@click.argument("name")
@click.argument("value_json", metavar="VALUE_JSON")
@click.option("--by-key", is_flag=True, help="TARGET is a correlation key, even if it is all digits")
@json_option
def respond(
    dsn: str | None,
    schema: str | None,
    config_path: str | None,
    target_ident: str,
    name: str,
    value_json: str,
    by_key: bool,
    as_json: bool,
) -> int:
    """Answer input NAME of TARGET (an instance id or correlation key) with VALUE_JSON
    (- reads stdin), and wake the instance. The value is checked against the input's
    schema and choices first: a bad one is refused (exit 2, naming the field) and nothing
    is stored. Exit 3 when TARGET does not await input NAME.
    """
    from pgdurable.client import Client

    value = decode_json(value_json, "VALUE_JSON")
    who: int | str = int(target_ident) if target_ident.isdigit() and not by_key else target_ident
    target = resolve(dsn, schema, config_path)
    with connected(target) as (conn, _q), Client(target.dsn, schema=target.schema) as client:
        try:
            sid = client.respond(who, name, value, conn=conn)
        except NoTarget as exc:
            raise CliError(str(exc), NOT_FOUND) from exc
    if as_json:
        print_json({"target": who, "name": name, "signal_id": sid})
    else:
        click.echo(f"answered {name!r} of {who!r} (signal {sid})")
    return 0
