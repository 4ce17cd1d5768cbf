"""Numbered SQL migrations (sql/migrations/NNNN_name.sql), applied in order, recorded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from pgdurable.contract.errors import PrivilegeError, SchemaVersionError
from pgdurable.db.queries import for_schema, quote_ident, render, sql_dir

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path

    def sql(self, schema: str) -> bytes:
        return render(self.path.read_text(), schema).encode()


def available() -> list[Migration]:
    out = []
    for path in sorted((sql_dir() / "migrations").iterdir()):
        m = _FILE.match(path.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), path))
    versions = [m.version for m in out]
    if versions != list(range(1, len(out) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return out


def latest() -> int:
    return len(available())


def current(conn: psycopg.Connection[Any], schema: str = "pgdurable") -> int:
    """The schema's applied version (0 when pgdurable was never installed there)."""
    q = for_schema(schema)
    ledger = f"{quote_ident(schema)}.migrations"
    try:
        present = conn.execute(q["schema_ledger_exists"], {"ledger": ledger}).fetchone()
        if not present or not present[0]:
            return 0
        row = conn.execute(q["schema_version"]).fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        raise _privilege_error(conn, schema, exc, migrating=False) from exc
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection[Any], schema: str = "pgdurable") -> list[Migration]:
    """Apply every pending migration in one transaction; returns what was applied.

    Concurrent migrators of the same schema are serialised by an advisory lock; the second
    finds nothing left to do.
    """
    q = for_schema(schema)
    applied: list[Migration] = []
    try:
        with conn.transaction():
            conn.execute(q["schema_lock"], {"schema": schema})
            conn.execute(q["schema_prepare"])
            have = current(conn, schema)
            todo = available()
            if have > len(todo):
                raise SchemaVersionError(
                    f"schema {schema!r} is at version {have}, newer than this pgdurable "
                    f"({len(todo)}); upgrade pgdurable"
                )
            for m in todo[have:]:
                conn.execute(m.sql(schema))
                conn.execute(q["schema_record"], {"version": m.version, "name": m.name})
                applied.append(m)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise _privilege_error(conn, schema, exc, migrating=True) from exc
    return applied


def check(conn: psycopg.Connection[Any], schema: str = "pgdurable") -> None:
    """Raise SchemaVersionError unless the schema is exactly at the version this code needs."""
    have, want = current(conn, schema), latest()
    if have < want:
        behind = want - have
        # Version 0 is most often the wrong database or schema name, not a forgotten migrate:
        # say which database was looked at.
        where = (
            f"schema {schema!r} has no pgdurable tables in database {conn.info.dbname!r} (version 0);"
            if have == 0
            else f"schema {schema!r} is at version {have},"
        )
        raise SchemaVersionError(
            f"{where} this pgdurable needs {want} "
            f"({behind} migration{'s' if behind != 1 else ''} behind); "
            f"run: pgdurable migrate --schema {schema}"
        )
    if have > want:
        raise SchemaVersionError(
            f"schema {schema!r} is at version {have}, newer than this pgdurable ({want})"
        )


def _privilege_error(
    conn: psycopg.Connection[Any], schema: str, exc: psycopg.errors.InsufficientPrivilege, *, migrating: bool
) -> PrivilegeError:
    """Say which role lacks which privilege, from the server's message and the connection.

    Runs no SQL: the transaction it is called from has failed.
    """
    role, db = conn.info.user, conn.info.dbname
    denied = exc.diag.message_primary or str(exc).strip()
    grant = f"TO {quote_ident(role)}"
    if denied.startswith("permission denied for database"):
        need = (
            f"it needs CREATE on database {db!r} to create the schema "
            f"(GRANT CREATE ON DATABASE {quote_ident(db)} {grant}), or run migrate as a role that has it"
        )
    elif denied.startswith("permission denied for schema") and migrating:
        need = (
            f"it needs USAGE and CREATE on schema {schema!r} "
            f"(GRANT USAGE, CREATE ON SCHEMA {quote_ident(schema)} {grant}), "
            "or run migrate as the schema's owner"
        )
    elif denied.startswith("permission denied for schema"):
        need = f"it needs USAGE on schema {schema!r} (GRANT USAGE ON SCHEMA {quote_ident(schema)} {grant})"
    elif migrating:
        need = "run migrate as the role that owns the schema and its tables"
    else:  # the only table read here is the ledger
        ledger = f"{quote_ident(schema)}.migrations"
        need = f"it needs SELECT on {schema}.migrations (GRANT SELECT ON {ledger} {grant})"
    what = "migrate" if migrating else "read the version of"
    return PrivilegeError(f"role {role!r} may not {what} schema {schema!r}: {denied}; {need}")
