"""Schema migrations and the ``pgdurable migrate`` command against a real database."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq

from pgdurable import SchemaVersionError
from pgdurable.contract.spec import LIVE_STATUSES
from pgdurable.db import migrations
from pgdurable.db.queries import Queries, for_schema, quote_ident

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_schema(dsn: str) -> Iterator[str]:
    """A schema name nobody migrated yet; dropped afterwards if something created it."""
    name = f"m_{secrets.token_hex(5)}"
    try:
        yield name
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgdurable", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=env,
    )


def ledger(dsn: str, schema: str) -> list[tuple[int, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(f'SELECT version, name FROM "{schema}".migrations ORDER BY 1')
        return [(int(v), str(n)) for v, n in rows.fetchall()]


def schema_exists(dsn: str, schema: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
        return bool(row and row[0])


# --------------------------------------------------------------------------- 1. the command


def test_cli_migrate_creates_then_is_idempotent(dsn, fresh_schema):
    first = cli("migrate", "--dsn", dsn, "--schema", fresh_schema)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_initial" in first.stdout
    assert f"schema {fresh_schema!r} is at version {migrations.latest()}" in first.stdout
    assert schema_exists(dsn, fresh_schema)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT to_regclass(%s), to_regclass(%s), to_regclass(%s)",
            [f'"{fresh_schema}".{t}' for t in ("instances", "signals", "machines")],
        ).fetchone()
        assert row is not None and all(r is not None for r in row)

    again = cli("migrate", "--dsn", dsn, "--schema", fresh_schema)
    assert again.returncode == 0, again.stderr
    assert "applied" not in again.stdout
    assert f"is at version {migrations.latest()}" in again.stdout
    assert len(ledger(dsn, fresh_schema)) == migrations.latest()


def test_cli_check_up_to_date(dsn, schema):
    res = cli("migrate", "--dsn", dsn, "--schema", schema, "--check")
    assert res.returncode == 0, res.stderr
    assert "up to date" in res.stdout


def test_cli_dsn_from_environment(dsn, schema):
    env = {**os.environ, "PGDURABLE_DSN": dsn}
    res = cli("migrate", "--schema", schema, "--check", env=env)
    assert res.returncode == 0, res.stderr
    env.pop("PGDURABLE_DSN")
    res = cli("migrate", "--schema", schema, "--check", env=env)
    assert res.returncode != 0
    assert "no database" in res.stderr


def test_cli_check_behind_after_partial_ledger(dsn, schema):
    """A ledger that lacks the newest migration is reported behind, by how many."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DELETE FROM "{schema}".migrations WHERE version = %s', [migrations.latest()])
    res = cli("migrate", "--dsn", dsn, "--schema", schema, "--check")
    assert res.returncode == 1
    assert "1 migration behind" in res.stderr
    assert f"pgdurable migrate --schema {schema}" in res.stderr


def test_cli_check_fresh_schema_is_behind(dsn, fresh_schema):
    res = cli("migrate", "--dsn", dsn, "--schema", fresh_schema, "--check")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "behind" in res.stderr
    behind = migrations.latest()
    assert f"{behind} migration{'s' if behind != 1 else ''} behind" in res.stderr
    assert not schema_exists(dsn, fresh_schema)  # --check changes nothing


def test_current_is_zero_on_fresh_schema(dsn, fresh_schema):
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert migrations.current(conn, fresh_schema) == 0
        with pytest.raises(SchemaVersionError, match="behind"):
            migrations.check(conn, fresh_schema)


def test_check_api_up_to_date_and_migrate_noop(dsn, schema):
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert migrations.current(conn, schema) == migrations.latest()
        migrations.check(conn, schema)  # does not raise
        assert migrations.migrate(conn, schema) == []


# --------------------------------------------------------------------------- 2. the ledger


def test_ledger_records_version_1(dsn, fresh_schema):
    with psycopg.connect(dsn, autocommit=True) as conn:
        applied = migrations.migrate(conn, fresh_schema)
    assert [m.version for m in applied] == list(range(1, migrations.latest() + 1))
    rows = ledger(dsn, fresh_schema)
    assert rows[0] == (1, "initial")
    assert [v for v, _ in rows] == list(range(1, migrations.latest() + 1))
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            f'SELECT applied_at IS NOT NULL FROM "{fresh_schema}".migrations WHERE version = 1'
        ).fetchone()
        assert row == (True,)


# --------------------------------------------------------------------------- 3. queries


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def to_dollar(sql: str) -> str:
    """psycopg ``%(name)s`` placeholders to ``$n`` (the same name keeps its number)."""
    numbers: dict[str, int] = {}

    def sub(m: re.Match[str]) -> str:
        return f"${numbers.setdefault(m.group(1), len(numbers) + 1)}"

    return _PLACEHOLDER.sub(sub, sql)


def test_every_named_query_prepares_against_migrated_schema(dsn, schema):
    q = for_schema(schema)
    names = [n for n in q.names() if n != "schema_prepare"]
    for needed in ("instance_insert_one", "instance_copy", "instance_claim"):
        assert needed in names
    failures: dict[str, str] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in names:
            if q[name].startswith(b"COPY"):  # cannot be prepared: run it on no rows
                try:
                    with conn.transaction(force_rollback=True), conn.cursor().copy(q[name]):
                        pass
                except psycopg.Error as exc:
                    failures[name] = str(exc)
                continue
            sql = to_dollar(q[name].decode())
            assert "%(" not in sql, name
            res = conn.pgconn.prepare(f"q_{name}".encode(), sql.encode())
            if res.status != pq.ExecStatus.COMMAND_OK:
                failures[name] = (res.error_message or b"").decode()
    assert failures == {}


def test_queries_fail_to_prepare_without_the_schema(dsn, fresh_schema):
    """The check above is meaningful: against a schema that lacks the tables, it fails."""
    q = for_schema(fresh_schema)
    with psycopg.connect(dsn, autocommit=True) as conn:
        res = conn.pgconn.prepare(b"q_get", to_dollar(q["instance_get"].decode()).encode())
    assert res.status == pq.ExecStatus.FATAL_ERROR
    assert b"does not exist" in (res.error_message or b"")


# --------------------------------------------------------------------------- 4. indexes


def test_partial_indexes(dsn, schema):
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
            (schema, "instances"),
        ).fetchall()
    defs: dict[str, str] = dict(rows)
    expected = {
        "instances_pick": (False, "WHERE (status = 'runnable'::text)", "(queue, priority, eligible_at)"),
        "instances_lease": (
            False,
            "WHERE ((status = 'executing'::text) AND (lease_expires_at IS NOT NULL))",
            "(lease_expires_at)",
        ),
        "instances_concurrency_active": (
            True,
            "WHERE ((status = 'executing'::text) AND (concurrency_key IS NOT NULL) "
            "AND (concurrency_shard IS NULL))",
            "(concurrency_key)",
        ),
        "instances_correlation": (
            True,
            "WHERE ((correlation_key IS NOT NULL) AND (status = ANY (correlation_scope)))",
            "(correlation_key)",
        ),
        "instances_parent": (False, "WHERE (parent_id IS NOT NULL)", "(parent_id)"),
        "instances_gc": (False, "WHERE (status = ANY (ARRAY['done'::text", "(updated_at)"),
    }
    for name, (unique, predicate, columns) in expected.items():
        assert name in defs, f"missing index {name}; have {sorted(defs)}"
        d = defs[name]
        assert d.startswith("CREATE UNIQUE INDEX" if unique else "CREATE INDEX"), d
        assert predicate in d, d
        assert f"USING btree {columns}" in d, d
    gc = defs["instances_gc"]
    assert all(f"'{s}'::text" in gc for s in ("done", "failed", "cancelled")), gc


def test_signal_dedup_and_key_claim_filter(dsn, schema):
    """0004: dedup keys live in signal_dedup (keyed by instance, then key), the signals
    table keeps its old arbiter, and the claim filter is VOLATILE (a fresh snapshot per
    probe is what makes it exact)."""
    with psycopg.connect(dsn) as conn:
        (pk,) = conn.execute(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index"
            " WHERE indrelid = to_regclass(%s) AND indisprimary",
            [f'"{schema}".signal_dedup'],
        ).fetchone()
        assert "USING btree (target_id, dedup_key)" in pk, pk
        uniques = conn.execute(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index"
            " WHERE indrelid = to_regclass(%s) AND indisunique AND NOT indisprimary",
            [f'"{schema}".signals'],
        ).fetchall()
        assert [u for (u,) in uniques if "(target_id, dedup_key)" in u], uniques
        row = conn.execute(
            "SELECT p.provolatile, l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang"
            " WHERE p.pronamespace = to_regnamespace(%s) AND p.proname = 'concurrency_key_try_claim'",
            [quote_ident(schema)],
        ).fetchone()
        assert row == ("v", "plpgsql")


def _migrate_to(conn: psycopg.Connection[Any], schema: str, version: int) -> None:
    """Apply the migrations up to ``version`` only, recorded as ``migrate`` records them."""
    q = for_schema(schema)
    with conn.transaction():
        conn.execute(q["schema_prepare"])
        for m in migrations.available()[:version]:
            conn.execute(m.sql(schema))
            conn.execute(q["schema_record"], {"version": m.version, "name": m.name})


def test_0004_remembers_the_dedup_keys_of_stored_signals(dsn, fresh_schema):
    """Upgrading a schema whose inboxes hold signals with dedup keys: the keys are
    remembered, so they stay duplicates once consumed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        _migrate_to(conn, fresh_schema, 3)
        t = f'"{fresh_schema}"'
        (iid,) = conn.execute(
            f"INSERT INTO {t}.instances (fsm, step) VALUES ('m', 's') RETURNING id"
        ).fetchone()
        conn.execute(
            f"INSERT INTO {t}.signals (target_id, name, dedup_key)"
            " VALUES (%s, 'a', 'k1'), (%s, 'a', NULL), (%s, 'b', 'k2')",
            [iid, iid, iid],
        )
        applied = [m.version for m in migrations.migrate(conn, fresh_schema)]
        assert applied == list(range(4, migrations.latest() + 1))
        rows = conn.execute(f"SELECT target_id, dedup_key FROM {t}.signal_dedup ORDER BY 2").fetchall()
    assert rows == [(iid, "k1"), (iid, "k2")]


def test_0015_keeps_the_keys_held_across_the_upgrade(dsn, fresh_schema):
    """Upgrading a schema whose rows hold keys (through the generated column
    correlation_guard until version 15): the partial unique index that replaces it holds
    the same keys, so the live key still refuses a second row and a finished one's key is
    free."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        _migrate_to(conn, fresh_schema, 14)
        t = f'"{fresh_schema}".instances'
        conn.execute(
            f"INSERT INTO {t} (fsm, step, correlation_key, correlation_scope, status)"
            " VALUES ('m', 's', 'live', %(live)s, 'runnable'), ('m', 's', 'gone', %(live)s, 'done')",
            {"live": list(LIVE_STATUSES)},
        )
        assert [m.version for m in migrations.migrate(conn, fresh_schema)] == list(
            range(15, migrations.latest() + 1)
        )
        cols = {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'instances'",
            [fresh_schema],
        )}  # fmt: skip
        assert not cols & {"correlation_guard", "concurrency_name"}
        again = f"INSERT INTO {t} (fsm, step, correlation_key, correlation_scope) VALUES ('m', 's', %s, %s)"
        with pytest.raises(psycopg.errors.UniqueViolation, match="instances_correlation"):
            conn.execute(again, ["live", list(LIVE_STATUSES)])
        conn.execute(again, ["gone", list(LIVE_STATUSES)])
        (held,) = conn.execute(f"SELECT count(*) FROM {t} WHERE correlation_key = 'gone'").fetchone()
    assert held == 2


def test_pick_index_excludes_terminal_rows(dsn, schema, db):
    """Real rows: a terminal row is not in the pick index, a runnable one is."""
    db.execute(
        f"""INSERT INTO "{schema}".instances (fsm, step, queue, status)
            VALUES ('m', 's', 'q', 'runnable'), ('m', 's', 'q', 'done')"""
    )
    db.execute(f'ANALYZE "{schema}".instances')
    with psycopg.connect(dsn) as conn:
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_bitmapscan = off")
        q = f"SELECT status FROM \"{schema}\".instances WHERE status = 'runnable' AND queue = 'q'"
        plan = "\n".join(r[0] for r in conn.execute(f"EXPLAIN {q}").fetchall())
        assert "instances_pick" in plan
        assert conn.execute(q).fetchall() == [("runnable",)]


# --------------------------------------------------------------------------- 5. concurrency


def test_concurrent_migrate_is_serialised(dsn, fresh_schema):
    n = 4
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                barrier.wait(timeout=30)
                results[i] = [m.version for m in migrations.migrate(conn, fresh_schema)]
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    everything = list(range(1, migrations.latest() + 1))
    # exactly one migrator applied everything, the others found nothing to do
    assert sorted(results, key=len) == [[]] * (n - 1) + [everything]
    with psycopg.connect(dsn) as conn:
        counts = conn.execute(
            f'SELECT version, count(*) FROM "{fresh_schema}".migrations GROUP BY 1 ORDER BY 1'
        ).fetchall()
    assert counts == [(v, 1) for v in everything]


# --------------------------------------------------------------------------- 6. names


@pytest.mark.parametrize("bad", ["bad;name", 'x"y', "1abc", "", "has space", "a" * 64, "drop table x"])
def test_schema_name_validation(bad):
    with pytest.raises(ValueError, match="plain identifier"):
        Queries(bad)


def test_schema_name_validation_accepts_identifiers():
    assert Queries("Good_Name_1").schema == "Good_Name_1"
    assert b'"Good_Name_1".instances' in Queries("Good_Name_1")["instance_get"]


def test_cli_rejects_bad_schema_name(dsn):
    res = cli("migrate", "--dsn", dsn, "--schema", "bad;name")
    assert res.returncode != 0
    assert "plain identifier" in res.stderr


# --------------------------------------------------------------------------- 7. ahead


def test_schema_ahead_of_code(dsn, schema):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO \"{schema}\".migrations (version, name) VALUES (999, 'future')")
    res = cli("migrate", "--dsn", dsn, "--schema", schema, "--check")
    assert res.returncode == 1
    assert "newer" in res.stderr and "999" in res.stderr

    res = cli("migrate", "--dsn", dsn, "--schema", schema)
    assert res.returncode != 0
    assert "newer" in res.stderr
    assert "Traceback" not in res.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(SchemaVersionError, match="newer"):
            migrations.migrate(conn, schema)
        with pytest.raises(SchemaVersionError, match="newer"):
            migrations.check(conn, schema)
    assert [v for v, _ in ledger(dsn, schema)] == [*range(1, migrations.latest() + 1), 999]
