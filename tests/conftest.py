from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgdurable.client import Client
from pgdurable.db import migrations

from .dbserver import throwaway_server
from .supervised import Supervised


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    env = os.environ.get("PGDURABLE_TEST_DSN")
    if env:
        yield env
        return
    with throwaway_server() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def dsn(server_dsn: str) -> Iterator[str]:
    """A database of its own for this test run, dropped at the end."""
    name = f"pgdurable_test_{secrets.token_hex(4)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(server_dsn, dbname=name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def schema(dsn: str) -> Iterator[str]:
    """A freshly migrated schema per test, dropped afterwards."""
    name = f"t_{secrets.token_hex(5)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn, name)
    try:
        yield name
    finally:
        drop_schema(dsn, name)


def drop_schema(dsn: str, name: str) -> None:
    """Drop a test's schema. A process the test started may still be finishing its last
    statement on it (a supervisor's child exits after its parent): a deadlock with it is
    retried, after the others' transactions ended."""
    for attempt in range(5):
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            return
        except psycopg.errors.DeadlockDetected:
            if attempt == 4:
                raise
            time.sleep(0.5)


@pytest.fixture
def client(dsn: str, schema: str) -> Iterator[Client]:
    with Client(dsn, schema=schema) as c:
        yield c


@pytest.fixture
def db(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def runs(db, schema):
    db.execute("CREATE TABLE IF NOT EXISTS runtime_runs (tag text, what text, pid int, at timestamptz)")
    db.execute("TRUNCATE runtime_runs")
    yield
    db.execute("DROP TABLE IF EXISTS runtime_runs")


@pytest.fixture
def sups(tmp_path):
    started: list[Supervised] = []
    yield started
    for s in started:
        s.close()
