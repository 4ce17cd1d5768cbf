"""Step history: one row per finished step attempt, written by the group commit's rider;
the traceback of an instance's last error."""

from __future__ import annotations

import asyncio
import datetime as dt

import psycopg
import pytest

from pgdurable import Insert
from pgdurable.client import StepAttempt
from pgdurable.contract.fsm import Registry
from pgdurable.db.queries import for_schema
from pgdurable.engine import Engine
from pgdurable.engine.history import TRACEBACK_LIMIT
from pgdurable.runtime.sweeps.gc import gc
from pgdurable.testing import assert_done, assert_failed, drain

from . import history_machines as hm
from .supervised import start, wait_until
from .trace import traced

ALL = [
    hm.leaf,
    hm.Tour,
    hm.Twice,
    hm.Refuses,
    hm.Crashes,
    hm.shouts,
    hm.recovers,
    hm.Quiet,
    hm.quiet_job,
    hm.Mixed,
]


def count(db, schema, iid=None) -> int:
    where, params = ("WHERE instance_id = %s", [iid]) if iid is not None else ("", [])
    (n,) = db.execute(f'SELECT count(*) FROM "{schema}".history {where}', params).fetchone()
    return n


def brief(attempts: list[StepAttempt]) -> list[tuple]:
    return [(a.step, a.attempt, a.outcome, a.next_step) for a in attempts]


# --------------------------------------------------------------------------- what is recorded


def test_every_outcome_kind_leaves_one_row_per_attempt(dsn, schema, client):
    tour = client.insert(hm.Tour, {})
    drain(dsn, ALL, schema=schema)
    assert client.get(tour).status == "awaiting_signal"
    client.signal(tour, "go", {})
    drain(dsn, ALL, schema=schema)
    assert_done(client, tour, {"children": 1})

    steps = client.history(tour)
    assert brief(steps) == [
        ("begin", 0, "next", "flaky"),
        ("flaky", 0, "retry", "flaky"),
        ("flaky", 1, "await", "parked"),
        ("parked", 0, "spawn", "joined"),
        ("joined", 0, "done", None),
    ]
    raised = steps[1]
    assert raised.error == "ValueError('flaky the first time')"
    assert raised.traceback.startswith("Traceback (most recent call last):")
    assert "in flaky" in raised.traceback and raised.traceback.rstrip().endswith("flaky the first time")
    assert all(s.error is None and s.traceback is None for s in steps if s is not raised)
    for s in steps:
        assert (s.instance_id, s.fsm, s.version) == (tour, "tour", 1)
        assert s.started_at <= s.finished_at and s.duration >= 0
        assert abs((s.finished_at - s.started_at).total_seconds() - s.duration) < 0.05
        assert s.worker  # the engine's worker id
    assert [s.started_at for s in steps] == sorted(s.started_at for s in steps)
    assert client.history(tour, last=2) == steps[-2:]
    assert client.history(tour, last=0) == []

    (child,) = [c for c in _children(client, dsn, schema, tour)]
    assert brief(client.history(child)) == [("perform", 0, "done", None)]


def _children(client, dsn, schema, parent):
    with psycopg.connect(dsn) as conn:
        return [
            r[0] for r in conn.execute(f'SELECT id FROM "{schema}".instances WHERE parent_id = %s', [parent])
        ]


def test_retry_stop_raise_and_hold(dsn, schema, client):
    twice = client.insert(hm.Twice, {})
    refuses = client.insert(hm.Refuses, {})
    crashes = client.insert(hm.Crashes, {"depth": 3})
    ghost = client.insert("ghost", {}, queue="hist", version=2, step="somewhere")
    tally = drain(dsn, ALL, schema=schema)
    assert tally.hold == 1

    assert brief(client.history(twice)) == [("again", 0, "retry", "again"), ("again", 1, "done", None)]
    assert client.history(twice)[0].error == "not yet"
    assert client.history(twice)[0].traceback is None

    (stop,) = client.history(refuses)
    assert (stop.outcome, stop.next_step, stop.error, stop.traceback) == (
        "stop",
        None,
        "refused on purpose",
        None,
    )

    (fell,) = client.history(crashes)
    assert (fell.step, fell.outcome, fell.error) == ("fall", "stop", "RuntimeError('bottom of the stack')")
    assert fell.traceback.count("in _deep") == 4 and "in fall" in fell.traceback
    inst = assert_failed(client, crashes, "bottom of the stack")
    assert inst.last_traceback == fell.traceback

    (held,) = client.history(ghost)
    assert (held.fsm, held.version, held.step, held.outcome, held.next_step) == (
        "ghost",
        2,
        "somewhere",
        "hold",
        None,
    )
    assert held.error.startswith("held: unknown machine 'ghost'")
    assert client.get(ghost).last_traceback is None


def test_a_handler_that_fails_records_both_errors(dsn, schema, client):
    from pgdurable import FSM, step

    class Fragile(FSM, name="fragile", queue="hist"):
        @step(initial=True)
        def go(self, ctx):
            raise ValueError("first")

        def handle(self, exc, ctx):
            raise TypeError("then this")

    iid = client.insert(Fragile, {})
    drain(dsn, [Fragile], schema=schema)
    (a,) = client.history(iid)
    assert a.outcome == "stop" and "then handle() failed" in a.error
    assert "ValueError: first" in a.traceback and a.traceback.rstrip().endswith("TypeError: then this")
    assert client.get(iid).last_traceback == a.traceback


# --------------------------------------------------------------------------- last_traceback


def test_last_traceback_is_set_while_the_error_stands_and_cleared_by_success(dsn, schema, client):
    iid = client.insert(hm.recovers, {})
    drain(dsn, ALL, schema=schema, collapse_time=False)  # the retry waits an hour
    waiting = client.get(iid)
    assert waiting.status == "runnable" and waiting.last_error == "ConnectionError('gateway timeout')"
    assert waiting.last_traceback.rstrip().endswith("ConnectionError: gateway timeout")
    assert "in recovers" in waiting.last_traceback
    drain(dsn, ALL, schema=schema)  # time collapsed: the retry runs and succeeds
    done = assert_done(client, iid, "recovered")
    assert done.last_error is None and done.last_traceback is None
    assert [a.outcome for a in client.history(iid)] == ["retry", "done"]


def test_a_traceback_is_bounded_and_keeps_its_end(dsn, schema, client):
    iid = client.insert(hm.shouts, {"size": 100_000})
    drain(dsn, ALL, schema=schema)
    inst = assert_failed(client, iid, "gave up after 1 attempts")
    tb = inst.last_traceback
    assert len(tb) == TRACEBACK_LIMIT
    assert tb.startswith("[… ") and "characters cut]" in tb.splitlines()[0]
    assert tb.rstrip().endswith("THE END")
    (a,) = client.history(iid)
    assert a.traceback == tb and len(a.error) <= 100_200


def test_a_traceback_with_a_nul_or_a_lone_surrogate_is_stored(dsn, schema, client):
    """Text PostgreSQL cannot store is escaped, not a refused commit."""
    from pgdurable import FSM, Stop, step

    class Odd(FSM, name="odd", queue="hist"):
        @step(initial=True)
        def go(self, ctx):
            raise ValueError("a" + chr(0) + "b " + chr(0xDC80) + " c")

        def handle(self, exc, ctx):
            return Stop("odd")

    iid = client.insert(Odd, {})
    drain(dsn, [Odd], schema=schema)
    inst = assert_failed(client, iid, "odd")
    assert inst.last_traceback.rstrip().endswith("ValueError: a\\x00b \\udc80 c")
    (a,) = client.history(iid)
    assert a.traceback == inst.last_traceback and a.error == "odd"


# --------------------------------------------------------------------------- switched off


def test_machines_declared_without_history_leave_none(dsn, schema, client, db):
    quiet = client.insert(hm.Quiet, {})
    job = client.insert(hm.quiet_job, {})
    loud = client.insert(hm.Twice, {})
    drain(dsn, ALL, schema=schema)
    assert client.get(quiet).result == 1 and client.get(job).result == 2
    assert count(db, schema, quiet) == count(db, schema, job) == 0
    assert count(db, schema, loud) == 2
    assert hm.Quiet.__pgdurable__.history is False and hm.Twice.__pgdurable__.history is True


def test_a_queue_without_history_leaves_none(dsn, schema, client, db):
    iid = client.insert(hm.Twice, {})
    drain(dsn, ALL, schema=schema, history_off=["hist"])
    assert_done(client, iid, "ok")
    assert count(db, schema) == 0


def test_history_must_be_a_bool():
    from pgdurable import FSM, DefinitionError, step

    with pytest.raises(DefinitionError, match="history must be True or False"):

        class Bad(FSM, name="bad", history="no"):  # type: ignore[arg-type]
            @step
            def go(self, ctx): ...


def _flush_traced(dsn, schema, machines, queue, n, history_off=()):
    """Claim n rows, run them, and trace their flush (prepared statements warmed first)."""

    async def go():
        engine = Engine(Registry(machines), schema=schema, history_off=history_off)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            first = await engine.claim(conn, queue, 1)
            await engine.flush(conn, [await engine.run(r) for r in first])
            rows = await engine.claim(conn, queue, n)
            results = [await engine.run(r) for r in rows]
            with traced(conn) as t:
                report = await engine.flush(conn, results)
            return results, report, t

    return asyncio.run(go())


@pytest.mark.parametrize("how", ["machine", "queue"])
def test_without_history_the_rider_is_not_sent(dsn, schema, client, db, how):
    machine, off = (hm.quiet_job, ()) if how == "machine" else (hm.Twice, ("hist",))
    client.insert_many([Insert(machine, {}) for _ in range(6)])
    results, report, t = _flush_traced(dsn, schema, [machine], "hist", 5, history_off=off)
    assert len(report.committed) == 5
    assert t.statements == 1 and t.round_trips == 1, t.sql()
    assert count(db, schema) == 0


def test_a_flush_of_rows_with_and_without_history_writes_only_theirs(dsn, schema, client, db):
    loud = client.insert_many([Insert(hm.Twice, {}) for _ in range(3)])
    quiet = client.insert_many([Insert(hm.Quiet, {}) for _ in range(3)])
    results, report, t = _flush_traced(dsn, schema, [hm.Twice, hm.Quiet], "hist", 5)
    assert t.statements == 2 and t.round_trips == 1
    flushed = {r.row.id for r in results}
    assert count(db, schema) == 1 + len(flushed & set(loud))  # the warm-up row is loud
    assert all(count(db, schema, q) == 0 for q in quiet)


# --------------------------------------------------------------------------- fixed size


@pytest.mark.parametrize("n", [3, 50])
def test_a_mixed_flush_is_a_fixed_transaction_with_one_history_rider(dsn, schema, client, db, n):
    """Nexts, parks and raised errors (the transaction path): the same statements for 3
    outcomes as for 50, the history rider one of them, one row per outcome."""
    kinds = ["next", "await", "raise", "done"]
    client.insert_many([Insert(hm.Mixed, {"kind": kinds[i % 4]}) for i in range(n + 1)])
    results, report, t = _flush_traced(dsn, schema, [hm.Mixed], "mixed", n)
    assert len(report.committed) == n
    # BEGIN, the commit with its riders, park, park recheck, history, COMMIT
    assert t.statements == 6, t.sql()
    assert count(db, schema) == n + 1
    raised = db.execute(
        f'SELECT count(*) FROM "{schema}".history WHERE traceback LIKE %s', ["%ValueError: instance%"]
    ).fetchone()[0]
    assert raised == sum(1 for r in results if r.raised)


# --------------------------------------------------------------------------- guards and GC


@pytest.mark.parametrize("machine", [hm.Twice, hm.Mixed], ids=["plain", "park"])
def test_a_stale_outcome_writes_no_history(dsn, schema, client, db, machine):
    """The claim was taken away before the flush: nothing of the outcome lands, history
    neither (the plain path's pipeline and the transaction path alike)."""
    iid = client.insert(machine, {"kind": "await"})
    queue = machine.__pgdurable__.queue

    async def go():
        engine = Engine(Registry([machine]), schema=schema)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            (row,) = await engine.claim(conn, queue, 1)
            result = await engine.run(row)
            await conn.execute(
                f'UPDATE "{schema}".instances SET lease_token = lease_token + 1 WHERE id = %s', [iid]
            )
            return await engine.flush(conn, [result])

    report = asyncio.run(go())
    assert report.stale == {iid} and not report.committed
    assert count(db, schema) == 0


def test_gc_deletes_history_with_its_instance(dsn, schema, client, db):
    old = client.insert(hm.Twice, {})
    live = client.insert(hm.Tour, {})
    drain(dsn, ALL, schema=schema)
    assert count(db, schema, old) == 2 and count(db, schema, live) == 3
    db.execute(
        f"UPDATE \"{schema}\".instances SET updated_at = now() - interval '2 days' WHERE id = %s", [old]
    )
    deleted = gc(db, for_schema(schema), retention=dt.timedelta(days=1))
    assert deleted == 1 and client.get(old) is None
    assert count(db, schema, old) == 0 and count(db, schema, live) == 3


def test_unknown_instance_has_no_history(client):
    assert client.history(123_456_789) == []
    with pytest.raises(ValueError, match="last must be"):
        client.history(1, last=-1)


# --------------------------------------------------------------------------- a real worker

QUIET_QUEUE = """
[queues.hquiet]
processes = 1
concurrency = 2
history = false
"""


def test_a_supervised_worker_records_history_and_a_quiet_queue_does_not(dsn, schema, client, sups, tmp_path):
    sup = start(
        sups,
        tmp_path,
        dsn,
        schema,
        processes=1,
        modules='["tests.history_machines"]',
        extra=QUIET_QUEUE,
    )
    ok = client.insert("noted", {"n": 1})
    bad = client.insert("noted_failure", {})
    quiet = client.insert("unnoted", {"n": 2})
    assert client.wait(ok, timeout=30).result == {"n": 1}
    assert client.wait(bad, timeout=30).status == "failed"
    assert client.wait(quiet, timeout=30).result == {"n": 2}
    (a,) = client.history(ok)
    assert (a.fsm, a.step, a.outcome) == ("noted", "perform", "done")
    assert "/rt/0" in a.worker  # <supervisor incarnation>/<queue>/<index>
    (f,) = client.history(bad)
    assert f.outcome == "stop" and f.traceback.rstrip().endswith("KeyError: 'missing in a worker'")
    assert client.get(bad).last_traceback == f.traceback
    assert wait_until(lambda: client.get(quiet).status == "done") and client.history(quiet) == []
    assert sup.stop() == 0


def test_without_pipelines_the_rider_shares_an_explicit_transaction(dsn, schema, client, db, monkeypatch):
    """With a libpq older than 14 (no pipeline mode) the commit and its rider run between
    BEGIN and COMMIT instead: four statements, the same rows."""
    from pgdurable.engine import commit

    monkeypatch.setattr(commit, "_PIPELINES", False)
    client.insert_many([Insert(hm.Twice, {}) for _ in range(4)])
    results, report, t = _flush_traced(dsn, schema, [hm.Twice], "hist", 3)
    assert len(report.committed) == 3
    assert t.statements == 4, t.sql()
    assert count(db, schema) == 4


def test_reading_history_is_one_statement_in_either_client(dsn, schema, client):
    from pgdurable.client import AsyncClient

    iid = client.insert(hm.Twice, {})
    drain(dsn, ALL, schema=schema)
    with psycopg.connect(dsn, autocommit=True) as conn, traced(conn) as t:
        steps = client.history(iid, conn=conn)
    assert t.statements == 1 and len(steps) == 2

    async def read():
        async with AsyncClient(dsn, schema=schema) as ac:
            return await ac.history(iid), await ac.history(iid, last=1)

    assert asyncio.run(read()) == (steps, steps[-1:])
