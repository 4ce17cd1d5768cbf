"""Transactional steps (docs/transactions.md): a step's writes on ``ctx.conn`` and its outcome
commit in one transaction, guarded by the claim's fencing token, or not at all."""

from __future__ import annotations

import asyncio
import os
import signal

import psycopg
import pytest

from pgdurable.contract.errors import DefinitionError
from pgdurable.contract.fsm import FSM, Registry, step
from pgdurable.engine import Engine
from pgdurable.testing import assert_done, assert_failed, assert_status, drain

from . import txn_machines as m
from .supervised import start, wait_until

ALL = [m.Five, m.Blocking, m.Held, m.child, m.Serial, m.Misuse, m.AsyncMisuse, m.txn_job, m.SlowSync]


@pytest.fixture
def effects(db, schema):
    db.execute(m.effects_table(schema))
    return f'"{schema}".effects'


def count(db, query: str, *args: object) -> int:
    return db.execute(query, list(args)).fetchone()[0]


def rows(db, table: str, iid: int) -> list[tuple[str, int]]:
    return db.execute(f"SELECT step, attempt FROM {table} WHERE iid = %s ORDER BY step", [iid]).fetchall()


def test_every_step_commits_its_row_with_its_outcome(dsn, schema, client, db, effects):
    iid = client.insert(m.Five, {"schema": schema})
    tally = drain(dsn, ALL, schema=schema)
    assert tally.next == 4 and tally.done == 1
    assert_done(client, iid)
    assert rows(db, effects, iid) == [("s1", 0), ("s2", 0), ("s3", 0), ("s4", 0), ("s5", 0)]
    # history rows of the five steps came with them
    assert count(db, f'SELECT count(*) FROM "{schema}".history WHERE instance_id = %s', iid) == 5


def test_a_step_that_raised_leaves_none_of_its_writes(dsn, schema, client, db, effects):
    """s3 (async) and s4 (sync) insert, then raise once: only the retried attempts' rows."""
    iid = client.insert(m.Five, {"schema": schema, "fail_once": True})
    tally = drain(dsn, ALL, schema=schema)
    assert tally.retry == 2
    assert_done(client, iid)
    assert rows(db, effects, iid) == [("s1", 0), ("s2", 0), ("s3", 1), ("s4", 1), ("s5", 0)]


def test_a_transactional_job(dsn, schema, client, db, effects):
    iid = client.insert(m.txn_job, {"schema": schema})
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid, "written")
    assert rows(db, effects, iid) == [("perform", 0)]


@pytest.mark.parametrize("how", ["commit", "rollback", "sql"])
def test_a_step_that_ends_its_transaction_gets_a_clear_error(dsn, schema, client, db, effects, how):
    iid = client.insert(m.Misuse, {"schema": schema, "how": how})
    drain(dsn, ALL, schema=schema)
    inst = assert_failed(client, iid, "TransactionMisuse")
    assert "do not commit, roll back or close ctx.conn" in inst.last_error
    # commit() and rollback() are refused before anything ends; a COMMIT sent as SQL did end it
    assert len(rows(db, effects, iid)) == (1 if how == "sql" else 0)


def test_an_async_step_that_commits_gets_a_clear_error(dsn, schema, client, db, effects):
    iid = client.insert(m.AsyncMisuse, {"schema": schema})
    drain(dsn, ALL, schema=schema)
    assert_failed(client, iid, "ctx.conn.commit()")
    assert rows(db, effects, iid) == []


def test_declarations_are_checked():
    with pytest.raises(DefinitionError, match="isolation must be one of"):

        @step(transactional=True, isolation="snapshot")
        def a(self, ctx): ...

    with pytest.raises(DefinitionError, match="need transactional=True"):

        @step(isolation="serializable")
        def b(self, ctx): ...

    class Fine(FSM, name="txn_fine"):
        @step(transactional=True, isolation="serializable")
        def go(self, ctx): ...

    sdef = Fine.__pgdurable_steps__["go"]
    assert (sdef.transactional, sdef.isolation, sdef.count_conflicts) == (True, "serializable", False)


async def _steal(dsn: str, schema: str, iid: int) -> None:
    """What the reaper does to an expired lease, then another worker claims the row."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            f"UPDATE \"{schema}\".instances SET status = 'runnable', locked_by = NULL, lease_token = NULL"
            " WHERE id = %s",
            [iid],
        )
        thief = Engine(Registry(ALL), schema=schema)
        assert [r.id for r in await thief.claim(conn, "rt", 10)] == [iid]


def test_a_stale_worker_cannot_commit_its_writes(dsn, schema, client, db, effects):
    """The step has written its row, its spawn and the signal it consumes are ready, and its
    claim is taken before it commits: nothing of the step is visible — no row, no child, the
    signal still there — and the row belongs to the new claim. Guard: the transaction rolls
    back when the flush's fencing guard refuses the outcome (engine.transactional)."""
    iid = client.insert(m.Held, {"schema": schema})
    drain(dsn, ALL, schema=schema)  # parks for "go"
    client.signal(iid, "go", {})
    engine = Engine(Registry(ALL), schema=schema)

    async def go():
        reached, release = asyncio.Event(), asyncio.Event()
        m.HOLD[iid] = (reached, release)
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                (row,) = await engine.claim(conn, "rt", 10)
                assert engine.transactional(row)
                task = asyncio.create_task(engine.run_transactional(conn, row))
                await asyncio.wait_for(reached.wait(), 10)  # written, not committed
                await _steal(dsn, schema, iid)
                release.set()
                return await task
        finally:
            del m.HOLD[iid]

    result, report = asyncio.run(go())
    assert result.kind == "spawn"
    assert report is not None and report.stale == {iid} and not report.committed
    assert rows(db, effects, iid) == []
    t = f'"{schema}".instances'
    assert count(db, f"SELECT count(*) FROM {t} WHERE parent_id = %s", iid) == 0
    assert count(db, f'SELECT count(*) FROM "{schema}".signals WHERE target_id = %s', iid) == 1
    assert count(db, f"SELECT status, locked_by FROM {t} WHERE id = %s", iid) == "executing"
    assert count(db, f'SELECT count(*) FROM "{schema}".history WHERE instance_id = %s', iid) == 1


def test_without_interference_the_same_step_commits_everything(dsn, schema, client, db, effects):
    """The control of the test above: the same step, not disturbed, commits its row, its
    children and the consumption of its signal together."""
    iid = client.insert(m.Held, {"schema": schema})
    drain(dsn, ALL, schema=schema)
    client.signal(iid, "go", {})
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid, 2)
    assert rows(db, effects, iid) == [("work", 0)]
    assert count(db, f'SELECT count(*) FROM "{schema}".signals WHERE target_id = %s', iid) == 0


def test_a_cancel_marked_while_the_step_ran_discards_its_writes(dsn, schema, client, db, effects):
    """A cancel lands while the step runs: its writes roll back and the instance is cancelled."""
    iid = client.insert(m.Held, {"schema": schema})
    drain(dsn, ALL, schema=schema)
    client.signal(iid, "go", {})
    engine = Engine(Registry(ALL), schema=schema)

    async def go():
        reached, release = asyncio.Event(), asyncio.Event()
        m.HOLD[iid] = (reached, release)
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                (row,) = await engine.claim(conn, "rt", 10)
                task = asyncio.create_task(engine.run_transactional(conn, row))
                await asyncio.wait_for(reached.wait(), 10)
                await asyncio.to_thread(client.cancel, iid, "stop it")
                release.set()
                return await task
        finally:
            del m.HOLD[iid]

    _result, report = asyncio.run(go())
    assert report is not None and iid in report.stale
    assert_status(client, iid, "cancelled")
    assert rows(db, effects, iid) == []
    assert count(db, f'SELECT count(*) FROM "{schema}".instances WHERE parent_id = %s', iid) == 0


def test_a_serialization_failure_retries_without_counting(dsn, schema, client, db, effects):
    """Two serializable steps read the same count, then both insert: the second to commit
    fails to serialize and runs again, seeing the first's row; its attempt is not counted.
    Guard: the executor's conflict check (without it, handle() fails the instance)."""
    first = client.insert(m.Serial, {"schema": schema, "key": "k"})
    second = client.insert(m.Serial, {"schema": schema, "key": "k"})
    engine = Engine(Registry(ALL), schema=schema)

    async def go():
        reached, release = asyncio.Event(), asyncio.Event()
        m.HOLD[first] = (reached, release)
        try:
            async with (
                await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c1,
                await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c2,
            ):
                claimed = {r.id: r for r in await engine.claim(c1, "rt", 10)}
                held = asyncio.create_task(engine.run_transactional(c1, claimed[first]))
                await asyncio.wait_for(reached.wait(), 10)  # first has read the count: 0
                _, other = await engine.run_transactional(c2, claimed[second])
                assert other is not None and other.committed == {second}  # second wrote 0
                release.set()
                result, report = await held
                assert report is None  # rolled back: its retry goes to the group commit
                assert (await engine.flush(c1, [result])).committed == {first}
                return result
        finally:
            del m.HOLD[first]

    result = asyncio.run(go())
    assert result.kind == "retry" and result.attempt == 0 and "SerializationFailure" in (result.error or "")
    assert_status(client, first, "runnable")
    drain(dsn, ALL, schema=schema)  # the step again
    assert_done(client, second, 0)
    inst = assert_done(client, first, 1)
    assert inst.attempt == 0
    assert sorted(db.execute(f"SELECT attempt FROM {effects} WHERE step = 'k'").fetchall()) == [(0,), (1,)]


def test_drain_runs_the_step_once_under_a_worker_that_dies_before_commit(
    dsn, schema, client, db, effects, sups, tmp_path
):
    """The worker is killed between the step's insert and its commit: no row of that
    attempt stays, and the step runs again once, in another worker."""
    sup = start(sups, tmp_path, dsn, schema, processes=1, lease=120, modules='["tests.txn_machines"]')
    marker = tmp_path / "marker"
    iid = client.insert(m.Blocking, {"schema": schema, "marker": str(marker)})
    victim = int(wait_until(lambda: marker.exists() and marker.read_text(), what="the step to write"))
    os.kill(victim, signal.SIGKILL)
    res = client.wait(iid, timeout=60)
    assert res.result["pid"] != victim
    assert db.execute(f"SELECT pid FROM {effects} WHERE iid = %s", [iid]).fetchall() == [(res.result["pid"],)]
    assert sup.stop() == 0


def test_a_serializable_step_outlives_the_heartbeat(dsn, schema, client, db, effects, sups, tmp_path):
    """The heartbeat leaves a serializable step's row alone: extending its lease would make
    the step's own outcome fail to serialize, at every retry. Guard: Slots.held() skips it
    (without it the step retries forever and the wait times out)."""
    start(sups, tmp_path, dsn, schema, processes=1, heartbeat=1, lease=30, modules='["tests.txn_machines"]')
    iid = client.insert(m.SlowSerial, {"schema": schema})
    assert client.wait(iid, timeout=25).result == 0
    assert count(db, f"SELECT count(*) FROM {effects} WHERE iid = %s", iid) == 1
    assert (
        count(db, f'SELECT count(*) FROM "{schema}".history WHERE instance_id = %s', iid) == 1
    )  # one attempt: no conflict, no retry


def test_a_transactional_step_is_five_statements_in_four_round_trips(dsn, schema, client, effects):
    """BEGIN, the step's INSERT, the guarded outcome UPDATE and its history rider (one
    pipeline), COMMIT: the flush's own statements, with no savepoint around them."""
    from .trace import traced

    client.insert(m.Five, {"schema": schema})
    engine = Engine(Registry(ALL), schema=schema)

    async def go():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            (row,) = await engine.claim(conn, "rt", 10)
            with traced(conn) as trace:
                result, report = await engine.run_transactional(conn, row)
            return trace, result, report

    trace, result, report = asyncio.run(go())
    assert report is not None and report.committed == {result.row.id} and result.kind == "next"
    assert (trace.statements, trace.round_trips) == (5, 4), trace.sql()


def test_a_sync_step_past_its_timeout_has_its_statement_cancelled(dsn, schema, client, db, effects):
    """The deadline cancels the statement the step's thread runs; the worker waits for the
    thread, then rolls back: the step fails with StepTimeout, its row is gone, and the
    connection serves the next step."""
    late = client.insert(m.SlowSync, {"schema": schema})
    after = client.insert(m.txn_job, {"schema": schema})
    drain(dsn, ALL, schema=schema)
    assert_failed(client, late, "StepTimeout")
    assert rows(db, effects, late) == []
    assert_done(client, after, "written")


def test_a_step_whose_connection_is_killed_before_commit_retries_without_counting(
    dsn, schema, client, db, effects
):
    """The step's backend is terminated after its write, before its commit: nothing of it
    stays, and its outcome is a retry that does not count, committed on another connection.
    Guard: run_step's broken-before-COMMIT branch (without it the error escapes and the row
    waits for its lease to expire)."""
    iid = client.insert(m.Held, {"schema": schema})
    drain(dsn, ALL, schema=schema)
    client.signal(iid, "go", {})
    engine = Engine(Registry(ALL), schema=schema)

    async def go():
        reached, release = asyncio.Event(), asyncio.Event()
        m.HOLD[iid] = (reached, release)
        try:
            async with (
                await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
                await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other,
            ):
                (row,) = await engine.claim(conn, "rt", 10)
                task = asyncio.create_task(engine.run_transactional(conn, row))
                await asyncio.wait_for(reached.wait(), 10)
                await other.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
                release.set()
                result, report = await task
                assert report is None
                assert (await engine.flush(other, [result])).committed == {iid}
                return result
        finally:
            del m.HOLD[iid]

    result = asyncio.run(go())
    assert (result.kind, result.attempt) == ("retry", 0)
    assert rows(db, effects, iid) == []
    assert count(db, f'SELECT count(*) FROM "{schema}".instances WHERE parent_id = %s', iid) == 0
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid, 2)
    assert rows(db, effects, iid) == [("work", 0)]
