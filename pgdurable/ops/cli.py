"""The ``pgdurable`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import psycopg

from pgdurable.contract.errors import PgdurableError
from pgdurable.db import migrations


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


def cmd_supervise(args: argparse.Namespace) -> int:
    from pgdurable.runtime.supervisor import supervise

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s",
    )
    return supervise(args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgdurable", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    mig = sub.add_parser("migrate", help="apply pending schema migrations (or --check them)")
    mig.add_argument("--dsn", help="database (default: $PGDURABLE_DSN)")
    mig.add_argument("--schema", default="pgdurable", help="schema name (default: pgdurable)")
    mig.add_argument("--check", action="store_true", help="exit 1 if the database is behind; change nothing")
    mig.set_defaults(func=cmd_migrate)
    sup = sub.add_parser("supervise", help="run the workers of a config file (one per host)")
    sup.add_argument("config", help="the TOML config file")
    sup.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sup.set_defaults(func=cmd_supervise)
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
