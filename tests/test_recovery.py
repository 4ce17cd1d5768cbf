"""Database faults are not charged to steps: a flush whose connection died is committed again
on a new one, and the reaper does not count a crash for leases that expired while the
database was down."""

from __future__ import annotations

import asyncio
import datetime as dt

import psycopg

from pgdurable.contract.fsm import Registry
from pgdurable.db.queries import for_schema
from pgdurable.engine import Engine
from pgdurable.runtime.sweeps.reaper import reclaim

from .machines import Counter
from .supervised import start, wait_until


def test_a_flush_whose_connection_was_killed_is_committed_on_a_new_one(
    dsn, schema, client, db, sups, tmp_path
):
    """Every connection of the worker is terminated while its step runs: the outcome still
    commits at once (not after the 60 s lease), and no crash is counted."""
    start(sups, tmp_path, dsn, schema, processes=1, lease=60, heartbeat=20)
    started, gate = tmp_path / "started", tmp_path / "gate"
    iid = client.insert("gated", {"started": str(started), "gate": str(gate)})
    wait_until(started.exists, what="the step to start")
    killed = db.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name ~ '^pgdurable (worker|feeder) ' AND datname = current_database()"
    ).fetchone()[0]
    assert killed >= 1
    gate.write_text("go")
    inst = wait_until(lambda: (i := client.get(iid)).status == "done" and i, timeout=15, what="the commit")
    assert inst.crashes == 0


def test_expired_leases_renewed_before_the_server_started_are_not_crashes(dsn, schema, client, db):
    """A lease last renewed before the database (re)started expired because its owner could
    not renew it: reclaimed without a crash. A lease that expired while the server was up
    counts one (the owner stopped renewing: frozen, or its host is gone)."""
    q = for_schema(schema)
    outage, frozen = client.insert(Counter, {"n": 0}), client.insert(Counter, {"n": 0})
    engine = Engine(Registry([Counter]), schema=schema, worker_id="host:1:x/q/0/1")

    async def claim() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            rows = await engine.claim(conn, Counter.__pgdurable__.queue, 10)
            assert {r.id for r in rows} == {outage, frozen}

    asyncio.run(claim())
    db.execute(
        f'UPDATE "{schema}".instances SET lease_expires_at = CASE id '
        "WHEN %s THEN pg_postmaster_start_time() - interval '1 second' "
        "ELSE now() - interval '1 second' END WHERE id IN (%s, %s)",
        [outage, outage, frozen],
    )
    assert reclaim(db, q, Registry([Counter]), 3, lease=dt.timedelta(seconds=1), expired=True) == 2
    assert client.get(outage).crashes == 0 and client.get(outage).status == "runnable"
    assert client.get(frozen).crashes == 1 and client.get(frozen).status == "runnable"


def test_only_failures_that_a_retry_can_mend_are_retried():
    """A flush is committed again after a lost connection, a server going away or a lost
    race; never after the server refused the statement for what it is (a size limit, a
    statement timeout): that would retry forever."""
    from psycopg import errors

    from pgdurable.runtime.flusher import transient

    assert transient(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert transient(errors.AdminShutdown())
    assert transient(errors.CannotConnectNow())
    assert transient(errors.SerializationFailure())
    assert transient(errors.DeadlockDetected())
    assert not transient(errors.ProgramLimitExceeded())
    assert not transient(errors.QueryCanceled())
