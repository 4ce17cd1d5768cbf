"""Named SQL: every statement pgdurable runs lives in sql/queries/*.sql under a name.

The schema is a marker in the text, rendered once per schema with a quoted identifier, so
statements never depend on the caller's search_path (inserts may run on a user connection).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from pgdurable.contract.errors import SchemaNameError

_NAME = re.compile(r"^-- name: ([a-z0-9_]+)\s*$", re.MULTILINE)
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def sql_dir() -> Path:
    """The sql/ directory: shipped inside the wheel, or the source tree's in a checkout."""
    packaged = resources.files("pgdurable") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "sql"


def check_schema_name(schema: str) -> str:
    """Return the name, or raise SchemaNameError (a ValueError) unless it is a plain identifier.

    ``fullmatch``, not ``match`` with ``$``: ``$`` also matches before a final newline, and
    "jobs\\n" would reach the SQL text.
    """
    if not _SCHEMA_NAME.fullmatch(schema):
        raise SchemaNameError(
            f"schema name {schema!r} must be a plain identifier "
            "(letters, digits, underscore; not starting with a digit; at most 63 characters)"
        )
    return schema


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def render(text: str, schema: str) -> str:
    """Replace the schema markers of a SQL text."""
    check_schema_name(schema)
    return text.replace("{schema}", quote_ident(schema)).replace("{schema_literal}", quote_literal(schema))


def parse(text: str) -> dict[str, str]:
    """Split a queries file into {name: statement}."""
    parts = _NAME.split(text)
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in out:
            raise ValueError(f"query {name!r} defined twice")
        out[name] = body.strip()
    return out


@functools.cache
def _raw() -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted((sql_dir() / "queries").glob("*.sql")):
        for name, body in parse(path.read_text()).items():
            if name in out:
                raise ValueError(f"query {name!r} defined twice ({path.name})")
            out[name] = body
    return out


class Queries:
    """The named statements rendered for one schema, as bytes ready for psycopg."""

    __slots__ = ("schema", "_sql")

    def __init__(self, schema: str = "pgdurable"):
        self.schema = check_schema_name(schema)
        self._sql = {name: render(body, schema).encode() for name, body in _raw().items()}

    def __getitem__(self, name: str) -> bytes:
        return self._sql[name]

    def names(self) -> list[str]:
        return sorted(self._sql)


@functools.cache
def for_schema(schema: str) -> Queries:
    return Queries(schema)


def int_array(values: Iterable[int]) -> str:
    """An integer array parameter as its text literal (cast in the statement: ``::bigint[]``).

    psycopg adapts a Python list element by element in Python, about 10 µs per array
    parameter; the hot statements pass their arrays this way instead.
    """
    return "{" + ",".join(str(int(v)) for v in values) + "}"
