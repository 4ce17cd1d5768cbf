"""The ``pgdurable`` command.

Exit status: 0 done (or up to date); 1 ``migrate --check`` found the schema behind or
ahead; 2 a usage or operator error (arguments, config file, modules, database address,
privileges), printed as one line on stderr. A traceback means a bug in pgdurable; the
traceback of the operator's own module that failed to import is shown only with
``supervise --log-level debug``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any

import psycopg

from pgdurable.contract.errors import ConnectError, ModuleImportError, PgdurableError, SchemaVersionError
from pgdurable.db import migrations
from pgdurable.db.queries import check_schema_name

#: Exit status of a usage or operator error (argparse uses 2 for bad arguments too).
USAGE = 2


class _Usage(Exception):
    """A mistake in the command line that argparse cannot see."""


def _one_line(exc: BaseException) -> str:
    """psycopg's messages span lines ("…failed: Connection refused\\n\\tIs the server…")."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _dsn(args: argparse.Namespace) -> str:
    dsn = args.dsn or os.environ.get("PGDURABLE_DSN")
    if not dsn:
        raise _Usage("no database: give --dsn or set PGDURABLE_DSN")
    return str(dsn)


def _connect(dsn: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, autocommit=True)
    except psycopg.ProgrammingError as exc:  # the string does not parse: nothing was sent
        raise ConnectError(
            f"the DSN is not a connection string or postgresql:// URI: {_one_line(exc)}"
        ) from exc
    except psycopg.OperationalError as exc:  # unreachable, no such database or role, refused
        raise ConnectError(_one_line(exc)) from exc


def cmd_migrate(args: argparse.Namespace) -> int:
    check_schema_name(args.schema)  # before connecting: a bad name is refused without a database
    with _connect(_dsn(args)) as conn:
        if args.check:
            try:
                migrations.check(conn, args.schema)
            except SchemaVersionError as exc:
                print(f"pgdurable: {exc}", file=sys.stderr)
                return 1
            print(f"schema {args.schema!r} is up to date (version {migrations.latest()})")
            return 0
        applied = migrations.migrate(conn, args.schema)
    if applied:
        for m in applied:
            print(f"applied {m.version:04d}_{m.name}")
    print(f"schema {args.schema!r} is at version {migrations.latest()}")
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    from pgdurable.runtime.supervisor import supervise

    return supervise(args.config, log_level=args.log_level)  # logging: runtime.logs.configure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgdurable", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mig = sub.add_parser("migrate", help="apply pending schema migrations (or --check them)")
    mig.add_argument("--dsn", help="database (default: $PGDURABLE_DSN)")
    mig.add_argument("--schema", default="pgdurable", help="schema name (default: pgdurable)")
    mig.add_argument("--check", action="store_true", help="exit 1 if the database is behind; change nothing")
    mig.set_defaults(func=cmd_migrate)
    sup = sub.add_parser("supervise", help="run the workers of a config file (one per host)")
    sup.add_argument("config", help="the TOML config file")
    sup.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="overrides [logging] level (default info); debug also prints the traceback of a module "
        "that failed to import",
    )
    sup.set_defaults(func=cmd_supervise)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; an operator's mistake is one line on stderr and exit status 2.

    Only errors pgdurable raises on purpose (PgdurableError), a database that cannot be
    reached or refuses a privilege, and a usage mistake are caught here: anything else is
    a bug and keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except _Usage as exc:
        message = str(exc)
    except PgdurableError as exc:
        if getattr(args, "log_level", None) == "debug" and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        message = _one_line(exc)
        if isinstance(exc, ModuleImportError) and not exc.not_found and args.log_level != "debug":
            message += "; --log-level debug prints its traceback"
    except psycopg.errors.InsufficientPrivilege as exc:
        message = f"the database role lacks a privilege: {_one_line(exc)}"
    except psycopg.OperationalError as exc:  # connection refused or lost, server shutting down
        message = _one_line(exc)
    except KeyboardInterrupt:
        return 130
    print(f"pgdurable: {message}", file=sys.stderr)
    return USAGE


if __name__ == "__main__":
    sys.exit(main())
