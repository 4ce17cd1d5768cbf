"""The examples of the README and docs/ run, in order, one namespace per file, each file
against a fresh database migrated with the default schema (so examples read naturally)."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgdurable.db import migrations

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("path", [f for f in FILES if BLOCK.search(f.read_text())], ids=lambda p: p.name)
def test_examples_run(server_dsn, path, monkeypatch):
    name = f"pgdurable_doc_{secrets.token_hex(4)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(server_dsn, dbname=name)
    monkeypatch.setenv("PGDURABLE_DSN", dsn)  # what an example that reads it from the environment finds
    namespace = {"__name__": f"doc_{path.stem}", "dsn": dsn}
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrations.migrate(conn)
        for i, block in enumerate(BLOCK.findall(path.read_text())):
            code = compile(block, f"{path.name}[block {i}]", "exec")
            exec(code, namespace)
    finally:
        for value in namespace.values():
            if hasattr(value, "close") and type(value).__name__ in ("Client",):
                value.close()
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


TOML = re.compile(r"^```toml\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("path", [f for f in FILES if TOML.search(f.read_text())], ids=lambda p: p.name)
def test_config_examples_are_valid(path):
    """Every complete config shown in the docs (one with queues) passes validation."""
    import tomllib

    from pgdurable.runtime.config import parse

    for block in TOML.findall(path.read_text()):
        data = tomllib.loads(block)
        if "queues" in data:
            parse(data, path.name)


def test_shipped_configs_are_valid():
    from pgdurable.runtime.config import load

    for cfg in [ROOT / "systemd" / "config.toml", ROOT / "examples" / "demo.toml"]:
        assert load(cfg).queues
