"""The ``pgdurable`` command."""

from __future__ import annotations

import argparse
import os
import sys

import psycopg

from . import migrations
from .errors import PgdurableError


def _dsn(args: argparse.Namespace) -> str:
    dsn = args.dsn or os.environ.get("PGDURABLE_DSN")
    if not dsn:
        raise SystemExit("pgdurable: no database: give --dsn or set PGDURABLE_DSN")
    return str(dsn)


def cmd_migrate(args: argparse.Namespace) -> int:
    with psycopg.connect(_dsn(args), autocommit=True) as conn:
        if args.check:
            try:
                migrations.check(conn, args.schema)
            except PgdurableError as exc:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgdurable", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    mig = sub.add_parser("migrate", help="apply pending schema migrations (or --check them)")
    mig.add_argument("--dsn", help="database (default: $PGDURABLE_DSN)")
    mig.add_argument("--schema", default="pgdurable", help="schema name (default: pgdurable)")
    mig.add_argument("--check", action="store_true", help="exit 1 if the database is behind; change nothing")
    mig.set_defaults(func=cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (PgdurableError, ValueError, psycopg.OperationalError) as exc:
        print(f"pgdurable: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
