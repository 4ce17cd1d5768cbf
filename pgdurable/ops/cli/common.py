"""What the verbs share: the database an operator names, one connection to it, the exit
statuses, durations and times on the command line, tables and JSON on the way out.

Kept light: click, psycopg and the database layer. The config file (the runtime layer),
the client and the machine machinery are imported by the verbs that use them, when they
run, so ``pgdurable supervise`` and ``pgdurable --help`` load none of what they do not use.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click
import msgspec
import psycopg

from pgdurable.contract.errors import ConnectError
from pgdurable.db import migrations
from pgdurable.db.queries import Queries, check_schema_name, for_schema

if TYPE_CHECKING:
    from pgdurable.runtime.config import Config

    _Param = click.ParamType[Any, Any]  # generic in the click the types are checked against
else:
    _Param = click.ParamType

#: Exit statuses (docs/operations.md, "Exit status and error messages").
OK = 0
PROBLEM = 1  # a check found what it looks for: a schema behind, a deploy that would hold rows
USAGE = 2  # an operator's mistake: arguments, config file, modules, database, privileges
NOT_FOUND = 3  # what was named is not there, or not in a state that allows the request
INTERRUPTED = 130

DEFAULT_SCHEMA = "pgdurable"
APPLICATION_NAME = "pgdurable cli"

_F = TypeVar("_F", bound=Callable[..., Any])


class CliError(Exception):
    """A mistake or a refusal reported as one line on stderr, with its exit status."""

    def __init__(self, message: str, code: int = USAGE):
        super().__init__(message)
        self.code = code


def one_line(exc: BaseException | str) -> str:
    """psycopg's messages span lines ("…failed: Connection refused\\n\\tIs the server…")."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


# --------------------------------------------------------------------------- the database


@dataclass(frozen=True, slots=True)
class Target:
    """The database and schema a verb works on, and the config file that named them."""

    dsn: str
    schema: str
    config: Config | None = None


def database_options(*, config_required: bool = False) -> Callable[[_F], _F]:
    """``--dsn``, ``--schema`` and ``--config``: where the database is."""

    def decorate(f: _F) -> _F:
        f = click.option(
            "--config",
            "config_path",
            metavar="FILE",
            required=config_required,
            help="the supervisor's TOML config, for its database.dsn and database.schema "
            "(--dsn and --schema win over it)",
        )(f)
        f = click.option(
            "--schema",
            metavar="NAME",
            help=f"schema name (default: the config's, else {DEFAULT_SCHEMA})",
        )(f)
        f = click.option(
            "--dsn",
            metavar="DSN",
            help="database connection string or postgresql:// URI "
            "(default: the config's, else $PGDURABLE_DSN)",
        )(f)
        return f

    return decorate


def json_option(f: _F) -> _F:
    return click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")(f)


def load_config(path: str) -> Config:
    """The supervisor's config file, validated (a ConfigError names the file and the key)."""
    from pgdurable.runtime.config import load

    return load(path)


def resolve(dsn: str | None, schema: str | None, config_path: str | None) -> Target:
    """The database a verb works on: ``--dsn``, else the config's ``database.dsn``, else
    ``$PGDURABLE_DSN``; the schema: ``--schema``, else the config's, else ``pgdurable``.

    An explicit option wins over the config file, and the config file (named on this
    command line) over the environment. The schema name is checked before any connection.
    """
    cfg = load_config(config_path) if config_path is not None else None
    if schema is None:
        schema = cfg.database.schema if cfg is not None else DEFAULT_SCHEMA
    check_schema_name(schema)
    if dsn is None and cfg is not None:
        dsn = cfg.dsn()
    dsn = dsn or os.environ.get("PGDURABLE_DSN")
    if not dsn:
        if cfg is not None:
            raise CliError(
                f"the config file {cfg.path} names no database.dsn (it runs the embedded server): "
                "give --dsn or set PGDURABLE_DSN"
            )
        raise CliError("no database: give --dsn, --config FILE or set PGDURABLE_DSN")
    return Target(dsn, schema, cfg)


def connect(dsn: str) -> psycopg.Connection[Any]:
    """An autocommit connection; a DSN that does not parse or a server that cannot be
    reached is a ConnectError, one line."""
    try:
        return psycopg.connect(dsn, autocommit=True, application_name=APPLICATION_NAME)
    except psycopg.ProgrammingError as exc:  # the string does not parse: nothing was sent
        raise ConnectError(
            f"the DSN is not a connection string or postgresql:// URI: {one_line(exc)}"
        ) from exc
    except psycopg.OperationalError as exc:  # unreachable, no such database or role, refused
        raise ConnectError(one_line(exc)) from exc


@contextmanager
def connected(target: Target) -> Iterator[tuple[psycopg.Connection[Any], Queries]]:
    """A connection to the target and its statements, the schema checked first: every
    verb's statements are written for this version (a SchemaVersionError says how far
    behind or ahead the database is, and what to run)."""
    with connect(target.dsn) as conn:
        migrations.check(conn, target.schema)
        yield conn, for_schema(target.schema)


def rows(cur: psycopg.Cursor[Any]) -> list[dict[str, Any]]:
    """A cursor's rows as dicts by column name."""
    names = [c.name for c in cur.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


# --------------------------------------------------------------------------- durations, times

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> dt.timedelta | None:
    """``90``, ``45s``, ``30m``, ``12h``, ``7d``, ``2w``, ``1h30m`` → a timedelta (None: not one)."""
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return dt.timedelta(seconds=float(text))
    if not text or not re.fullmatch(f"(?:{_DURATION.pattern})+", text):
        return None
    return dt.timedelta(seconds=sum(float(n) * _SECONDS[u] for n, u in _DURATION.findall(text)))


class Duration(_Param):
    """A duration: seconds, or a number with a unit (``30m``, ``12h``, ``7d``, ``1h30m``)."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dt.timedelta:
        if isinstance(value, dt.timedelta):
            return value
        parsed = parse_duration(str(value))
        if parsed is None:
            self.fail(f"{value!r} is not a duration like 90, 45s, 30m, 12h, 7d or 1h30m", param, ctx)
        return parsed


@dataclass(frozen=True, slots=True)
class When:
    """A point in time given on the command line: an absolute time, or a duration before now
    (computed by the database, with its clock)."""

    at: dt.datetime | None = None
    ago: dt.timedelta | None = None


def parse_time(text: str) -> dt.datetime | None:
    """An ISO 8601 time, aware (a time without an offset is local); None: not one."""
    try:
        at = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.astimezone()


class IsoTime(_Param):
    """An ISO 8601 time (``2026-12-01T10:00:00+00:00``; without an offset: local time)."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dt.datetime:
        if isinstance(value, dt.datetime):
            return value
        at = parse_time(str(value))
        if at is None:
            self.fail(f"{value!r} is not an ISO time like 2026-12-01T10:00:00+00:00", param, ctx)
        return at


class TimeOrDuration(_Param):
    """An ISO 8601 time (without an offset: local time), or a duration from now (``2h``)."""

    name = "time"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> dt.datetime | dt.timedelta:
        if isinstance(value, dt.datetime | dt.timedelta):
            return value
        text = str(value).strip()
        after = parse_duration(text)
        if after is not None:
            return after
        at = parse_time(text)
        if at is None:
            self.fail(
                f"{value!r} is neither a duration (90, 30m, 2h) nor an ISO time (2026-12-01T10:00:00+00:00)",
                param,
                ctx,
            )
        return at


class TimeOrAgo(_Param):
    """An ISO 8601 time (a time without an offset is local), or a duration ago (``1h``, ``2d``)."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> When:
        if isinstance(value, When):
            return value
        text = str(value).strip()
        ago = parse_duration(text)
        if ago is not None:
            return When(ago=ago)
        at = parse_time(text)
        if at is None:
            self.fail(
                f"{value!r} is neither an ISO time (2026-12-01T10:00:00+00:00) nor a duration ago (1h, 2d)",
                param,
                ctx,
            )
        return When(at=at)


# --------------------------------------------------------------------------- output


def age(seconds: float | None) -> str:
    """A short age: ``12s``, ``4m10s``, ``3h05m``, ``2d04h``; a negative one is ``in …``."""
    if seconds is None:
        return "-"
    if seconds < 0:
        return f"in {age(-seconds)}"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 row``, ``2 rows`` (``words``: the plural when it is not ``word + "s"``)."""
    return f"{n} {word if n == 1 else words or word + 's'}"


def span(seconds: float) -> str:
    """A duration as the options take it: ``45s``, ``30m``, ``1h30m``, ``7d``."""
    s, out = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            out.append(f"{s // size}{unit}")
            s %= size
    return "".join(out) or "0s"


def when(ts: dt.datetime | None, now: dt.datetime) -> str:
    """A time in UTC with its age: ``2026-12-01 10:00:00 UTC (3m10s ago)``."""
    if ts is None:
        return "-"
    delta = (now - ts).total_seconds()
    rel = f"{age(delta)} ago" if delta >= 0 else age(delta)
    return f"{ts.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC ({rel})"


def clip(text: str | None, width: int) -> str:
    """One line of at most ``width`` characters (``…`` marks a cut)."""
    if text is None:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(0, width - 1)] + "…"


def table(headers: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    """Columns aligned on the widest cell; the last column is not padded."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in body]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        padded = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def print_json(doc: Any) -> None:
    """One JSON document on stdout, indented (times as RFC 3339, in UTC)."""
    click.echo(msgspec.json.format(msgspec.json.encode(doc), indent=2).decode())


def decode_json(text: str | None, what: str) -> Any:
    """A JSON argument (``-``: read it from stdin); invalid JSON is a usage error naming it."""
    if text is None:
        return None
    if text == "-":
        text = sys.stdin.read()
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise CliError(f"{what} is not valid JSON: {exc}") from None


def stored_json(raw: str | None) -> Any:
    """A jsonb column read as text, decoded for display (None stays None)."""
    return None if raw is None else msgspec.json.decode(raw)


def compact(value: Any) -> str:
    """A JSON value on one line."""
    return msgspec.json.encode(value).decode()


def pretty(value: Any, indent: str = "  ") -> str:
    """A JSON value, indented, each line prefixed with ``indent``."""
    text = msgspec.json.format(msgspec.json.encode(value), indent=2).decode()
    return "\n".join(indent + line for line in text.splitlines())
