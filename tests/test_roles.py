"""The least-privilege roles of docs/operations.md, run as written there on a real server.

An administrator runs the section's first SQL block in a database where PUBLIC may do
nothing; the owner migrates an older release, runs the second block, then migrates to the
newest version with the command, so the tables of the later migrations are granted by the
default privileges alone. A real supervisor then runs as the worker and a Client as the
producer; what each role must not do is refused.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import make_conninfo

from pgdurable import Insert
from pgdurable.client import Client, Done
from pgdurable.db import migrations

from .role_machines import Brood, Gate, crash_once, echo
from .supervised import ROOT, Supervised, wait_until

DOC = ROOT / "docs" / "operations.md"
HEADING = "## Least privilege: the roles and their grants"
SQL_BLOCK = re.compile(r"^```sql\n(.*?)^```", re.MULTILINE | re.DOTALL)
DOC_ROLES = ("pgdurable_owner", "pgdurable_worker", "pgdurable_producer")

LIMITS = """
[concurrency_limits]
lp = { limit = 2 }

[rate_limits]
lp = { allowed = 1000, period = "1s" }
"""


@dataclass(frozen=True)
class Roles:
    """This run's database, schema and roles, with the DSN each role connects with."""

    dsn: str  # the administrator's (the server's superuser)
    database: str
    schema: str
    names: dict[str, str]  # the docs' role name -> this run's

    def dsn_of(self, documented: str) -> str:
        return make_conninfo(self.dsn, user=self.names[documented])

    def localise(self, sql: str) -> str:
        """The docs' names (pgdurable_owner…, schema pgdurable, database app) made this run's."""
        for documented, name in self.names.items():
            sql = re.sub(rf"\b{documented}\b", name, sql)
        sql = re.sub(r"\bpgdurable\b", self.schema, sql)  # the role names are replaced already
        return re.sub(r"\bDATABASE app\b", f'DATABASE "{self.database}"', sql)


def documented_sql() -> tuple[str, str]:
    """The section's two SQL blocks: the administrator's, then the owner's."""
    text = DOC.read_text()
    assert HEADING in text, f"{DOC.name} has no section {HEADING!r}"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    blocks = SQL_BLOCK.findall(section)
    assert len(blocks) == 2, f"expected the administrator's and the owner's SQL, found {len(blocks)}"
    return blocks[0], blocks[1]


@contextlib.contextmanager
def hardened_database(server_dsn: str) -> Iterator[Roles]:
    """A database of its own where PUBLIC may do nothing, and role names unique to this run.

    Roles are cluster-wide: whatever happens, they are dropped again at the end.
    """
    token = secrets.token_hex(4)
    database = f"pgdurable_roles_{token}"
    names = {documented: f"pgd_{documented.split('_')[1]}_{token}" for documented in DOC_ROLES}
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    dsn = make_conninfo(server_dsn, dbname=database)
    try:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC')  # CONNECT, TEMP
            admin.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        yield Roles(dsn, database, f"t_{secrets.token_hex(5)}", names)
    finally:
        quoted = ", ".join(f'"{name}"' for name in names.values())
        with contextlib.suppress(psycopg.Error), psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {quoted}")  # fails only for roles never created
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            admin.execute(f"DROP ROLE IF EXISTS {quoted}")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgdurable", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def refused(dsn: str, statements: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)


def grant_as_documented(r: Roles, monkeypatch: pytest.MonkeyPatch) -> None:
    admin_sql, owner_sql = documented_sql()
    owner = r.names["pgdurable_owner"]
    with psycopg.connect(r.dsn, autocommit=True) as admin:
        admin.execute(r.localise(admin_sql))
        # Stricter than a default database: what the owner creates, PUBLIC may not execute.
        admin.execute(f'ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC')
    # A fresh install: the owner migrates, then runs its block right after.
    install = cli("migrate", "--dsn", r.dsn_of("pgdurable_owner"), "--schema", r.schema)
    assert install.returncode == 0, install.stderr
    assert f"applied {migrations.available()[-1].version:04d}_" in install.stdout
    with psycopg.connect(r.dsn_of("pgdurable_owner"), autocommit=True) as conn:
        conn.execute(r.localise(owner_sql))
        # What a later release's migration creates, as the owner: granted by the defaults.
        conn.execute(f'CREATE TABLE "{r.schema}".later_release (id bigint PRIMARY KEY)')

    with psycopg.connect(r.dsn, autocommit=True) as admin:
        owners = admin.execute(
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class WHERE relnamespace = %s::regnamespace",
            [r.schema],
        ).fetchall()
        assert owners == [(owner,)]
        # A later migration's table gets its grants from the default privileges alone.
        rights = admin.execute(
            "SELECT has_table_privilege(%(w)s, %(t)s, 'DELETE'), has_table_privilege(%(p)s, %(t)s, 'INSERT'),"
            " has_table_privilege(%(p)s, %(t)s, 'UPDATE')",
            {
                "w": r.names["pgdurable_worker"],
                "p": r.names["pgdurable_producer"],
                "t": f"{r.schema}.later_release",
            },
        ).fetchone()
        assert rights == (True, True, False)
        admin.execute(f'DROP TABLE "{r.schema}".later_release')


def test_documented_roles_run_pgdurable(server_dsn, tmp_path, monkeypatch):
    with hardened_database(server_dsn) as r:
        grant_as_documented(r, monkeypatch)
        worker_dsn, producer_dsn = r.dsn_of("pgdurable_worker"), r.dsn_of("pgdurable_producer")
        s = f'"{r.schema}"'

        # migrate --check only reads the ledger: the worker may run it, but not migrate.
        check = cli("migrate", "--check", "--dsn", worker_dsn, "--schema", r.schema)
        assert check.returncode == 0, check.stderr
        assert "up to date" in check.stdout
        applied = cli("migrate", "--dsn", worker_dsn, "--schema", r.schema)
        assert applied.returncode != 0
        assert "permission denied for database" in applied.stderr

        refused(
            producer_dsn,
            [
                f"DELETE FROM {s}.instances",
                f"DELETE FROM {s}.signals",
                f"UPDATE {s}.instances SET state = '{{}}'",
                f"UPDATE {s}.instances SET result = 'null', locked_by = NULL",
                f"TRUNCATE {s}.instances",
                f"INSERT INTO {s}.machines (name, version, initial_step, queue, steps)"
                " VALUES ('x', 1, 'a', 'q', '{a}')",
                f"UPDATE {s}.gate_slots SET available = 0",  # later tables: SELECT, INSERT only
                f"DELETE FROM {s}.rate_buckets",
                f"SELECT * FROM {s}.migrations",
                f"CREATE TABLE {s}.extra (id int)",
                "CREATE TEMP TABLE extra (id int)",
            ],
        )
        refused(
            worker_dsn,
            [
                f"TRUNCATE {s}.instances",
                f"TRUNCATE {s}.signals",
                f"DROP TABLE {s}.signals",
                f"ALTER TABLE {s}.instances ADD COLUMN extra int",
                f"DROP SCHEMA {s} CASCADE",
                f"INSERT INTO {s}.migrations (version, name) VALUES (99, 'forged')",
                f"DELETE FROM {s}.migrations",
                f"CREATE TABLE {s}.extra (id int)",
                "CREATE TABLE public.extra (id int)",
                "CREATE TEMP TABLE extra (id int)",
            ],
        )

        sup = Supervised(
            tmp_path,
            worker_dsn,
            r.schema,
            extra=LIMITS,
            modules='["tests.role_machines"]',
            processes=1,
            gc_interval=1,
            retention=3600,
        )
        try:
            sup.ready()
            with Client(producer_dsn, schema=r.schema) as client:
                run_as_producer(client, sup, producer_dsn, worker_dsn, r.schema, tmp_path)
                with psycopg.connect(r.dsn, autocommit=True) as admin:
                    assert admin.execute(f"SELECT status FROM {s}.instances").fetchall() == [("held",)]
                    assert admin.execute(f"SELECT count(*) FROM {s}.signals").fetchone() == (0,)
                    pruned = f"SELECT (SELECT count(*) FROM {s}.gate_slots)"
                    pruned += f" + (SELECT count(*) FROM {s}.rate_buckets)"
                    wait_until(lambda: admin.execute(pruned).fetchone() == (0,), what="limit rows pruned")
            assert sup.stop() == 0
        finally:
            sup.close()
        log = sup.log.read_text()
        assert "reclaimed" in log and "gc deleted" in log, log
        assert not re.search(r"permission denied|failed|refused", log), log


def run_as_producer(
    client: Client, sup: Supervised, producer_dsn: str, worker_dsn: str, schema: str, tmp: Path
) -> None:
    """Everything a producer does, run by the worker; operating instances and queues as the
    worker role (refused to the producer); then GC as the worker (reload)."""
    one = client.insert(echo, {"n": 0})
    by_name = client.insert_many([Insert("role_echo", {"n": n}) for n in range(1, 4)])
    limited = client.insert_many(
        [Insert(echo, {"n": n}, concurrency_key="lp:a", rate_limit="lp") for n in range(4, 8)]
    )
    with psycopg.connect(producer_dsn) as conn:  # transactional enqueue
        in_txn = client.insert(echo, {"n": 8}, conn=conn)
    signalled = client.insert(Gate, {}, correlation_key="gate:1")
    assert client.signal("gate:1", "open", {"x": 1}, dedup_key="d1") is not None
    assert client.signal("gate:1", "open", {"x": 1}, dedup_key="d1") is None
    timed_out = client.insert(Gate, {"timeout": 0.5})
    brood = client.insert(Brood, {"n": 3})
    crashed = client.insert(crash_once, {"marker": str(tmp / "crashed")})
    held = client.insert("role_unknown", {}, queue="rt")  # no worker knows it

    for n, iid in enumerate([one, *by_name]):
        assert client.wait(iid, timeout=60) == Done({"n": n, "key": None})
    for n, iid in enumerate(limited, start=4):
        assert client.wait(iid, timeout=60) == Done({"n": n, "key": "lp:a"})
    assert client.wait(in_txn, timeout=60) == Done({"n": 8, "key": None})
    assert client.wait(signalled, timeout=60) == Done({"payloads": [{"x": 1}], "timed_out": False})
    assert client.wait(timed_out, timeout=60) == Done({"payloads": [], "timed_out": True})
    assert client.wait(brood, timeout=60) == Done([0, 1, 2])
    assert client.wait(crashed, timeout=60) == Done({"attempt": 0})
    wait_until(lambda: client.get(held).status == "held", what="the unknown machine held")

    # Operating — cancel, retry, rewind, pause — writes what the producer may not: run it
    # as the worker role (docs/operations.md), from the client and the CLI.
    parked = client.insert(Gate, {})
    wait_until(lambda: client.get(parked).status == "awaiting_signal", what="the gate parked")
    with pytest.raises(errors.InsufficientPrivilege):
        client.cancel(parked)
    with pytest.raises(errors.InsufficientPrivilege):
        client.pause("rt")
    with Client(worker_dsn, schema=schema) as operator:
        assert operator.cancel(parked, "as the worker").outcome == "cancelled"
        assert operator.retry(parked) == "opened"  # where the await had sent it
        assert client.wait(parked, timeout=60) == Done({"payloads": [], "timed_out": True})
        assert operator.rewind(parked, "start").state_from == "history"
        assert operator.retry_many(machine=Gate, dry_run=True).matched == 0
        assert operator.pause("rt") is True
        assert operator.resume("rt") is True
    db = ("--dsn", worker_dsn, "--schema", schema)
    for verb in (("pause", "rt"), ("resume", "rt"), ("status",), ("list",), ("show", str(parked))):
        run = cli(*verb, *db)
        assert run.returncode == 0, (verb, run.stderr)
    # Every verb checks the schema's version first: the producer may not read the ledger,
    # and is told which grant it lacks.
    refused_status = cli("status", "--dsn", producer_dsn, "--schema", schema)
    assert refused_status.returncode == 2
    assert f'GRANT SELECT ON "{schema}".migrations TO' in refused_status.stderr
    wait_until(lambda: client.get(parked).status == "awaiting_signal", what="the gate parked again")
    assert client.signal(parked, "open", {"x": 2}) is not None
    assert client.wait(parked, timeout=60) == Done({"payloads": [{"x": 2}], "timed_out": False})

    # Garbage collection as the worker: reloaded with no retention, every finished row goes,
    # the children with their parent.
    sup.config.write_text(sup.config.read_text().replace("retention = 3600", "retention = 0"))
    sup.proc.send_signal(signal.SIGHUP)
    finished = [one, *by_name, *limited, in_txn, signalled, timed_out, brood, crashed, parked]
    wait_until(lambda: all(client.get(i) is None for i in finished), what="GC as the worker")
