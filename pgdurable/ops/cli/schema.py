"""``pgdurable migrate``: the schema's migrations, applied or checked."""

from __future__ import annotations

import click

from pgdurable.contract.errors import SchemaVersionError
from pgdurable.db import migrations
from pgdurable.ops.cli.common import OK, PROBLEM, connect, database_options, resolve


@click.command("migrate", short_help="apply pending schema migrations (--check: the deploy gate)")
@database_options()
@click.option("--check", is_flag=True, help="change nothing; exit 1 if the schema is behind or ahead")
def migrate(dsn: str | None, schema: str | None, config_path: str | None, check: bool) -> int:
    """Apply the pending schema migrations, in one transaction under an advisory lock.

    With --check (the deploy gate), change nothing and exit 1 unless the schema is at the
    version this pgdurable needs.
    """
    target = resolve(dsn, schema, config_path)  # a bad schema name is refused before connecting
    with connect(target.dsn) as conn:
        if check:
            try:
                migrations.check(conn, target.schema)
            except SchemaVersionError as exc:
                click.echo(f"pgdurable: {exc}", err=True)
                return PROBLEM
            click.echo(f"schema {target.schema!r} is up to date (version {migrations.latest()})")
            return OK
        applied = migrations.migrate(conn, target.schema)
    for m in applied:
        click.echo(f"applied {m.version:04d}_{m.name}")
    click.echo(f"schema {target.schema!r} is at version {migrations.latest()}")
    return OK
