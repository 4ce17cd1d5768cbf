"""Time limits: expiry before start (the sweep, and the claim's guard) and instance
deadlines (a parked instance failed with its descendants cancelled; an executing one failed
when its step returns), against a real database, under drain and a real supervisor."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging

import psycopg
import pytest

from pgdurable import Insert, NoTarget
from pgdurable.contract.fsm import Registry
from pgdurable.db.queries import for_schema
from pgdurable.engine import Engine
from pgdurable.runtime.sweeps.deadlines import Deadlines, fire
from pgdurable.testing import assert_done, assert_failed, assert_status, drain

from .deadline_machines import Slow, Timed, Waiter, quick
from .supervised import start, wait_until
from .test_cli import cli, ok
from .test_plans import nodes, plan, populate

ALL = [quick, Waiter, Timed, Slow]
PAST = dt.timedelta(seconds=1)


def _now(db) -> dt.datetime:
    return db.execute("SELECT now()").fetchone()[0]


def _sweep(dsn, schema):
    with psycopg.connect(dsn, autocommit=True) as conn:
        return fire(conn, for_schema(schema))


def _push_deadline(db, schema, ids) -> None:
    """Time passes: their deadline is a second ago."""
    db.execute(
        f"UPDATE \"{schema}\".instances SET deadline = now() - interval '1 second' WHERE id = ANY(%s)",
        [list(ids)],
    )


# --------------------------------------------------------------------------- inserting


def test_inserts_carry_their_time_limits(dsn, schema, client, db):
    drain(dsn, ALL, schema=schema)  # registers the machines (Timed's deadline: an hour)
    now = _now(db)
    a = client.insert(quick, {}, expires_in=60, deadline=dt.timedelta(hours=2))
    b = client.insert("dl_timed", {})  # by name: the registered machine's deadline
    c = client.insert(Timed, {}, expires_at=now + dt.timedelta(minutes=5), on_expiry="cancel")
    d = client.insert(quick, {})
    ia, ib, ic, idd = (client.get(i) for i in (a, b, c, d))
    assert dt.timedelta(seconds=59) < ia.expires_at - now < dt.timedelta(seconds=70)
    assert dt.timedelta(hours=2) <= ia.deadline - now < dt.timedelta(hours=2, seconds=10)
    assert dt.timedelta(hours=1) <= ib.deadline - now < dt.timedelta(hours=1, seconds=10)
    assert ic.expires_at == now + dt.timedelta(minutes=5)
    assert dt.timedelta(hours=1) <= ic.deadline - now < dt.timedelta(hours=1, seconds=10)
    assert (idd.expires_at, idd.deadline) == (None, None)
    row = db.execute(f'SELECT on_expiry FROM "{schema}".instances WHERE id = %s', [c]).fetchone()
    assert row == ("cancel",)

    many = client.insert_many(
        [
            Insert(quick, {}, expires_in=30),
            Insert("dl_timed", {}),  # by name, from the machines table
            Insert(Timed, {}, deadline=now + dt.timedelta(days=1)),
        ]
    )
    m0, m1, m2 = (client.get(i) for i in many)
    assert m0.expires_at is not None and m0.deadline is None
    assert dt.timedelta(hours=1) <= m1.deadline - now < dt.timedelta(hours=1, seconds=10)
    assert m2.deadline == now + dt.timedelta(days=1)

    with pytest.raises(ValueError, match="expires_at or expires_in"):
        client.insert(quick, {}, expires_in=1, expires_at=now)
    with pytest.raises(ValueError, match="timezone-aware"):
        client.insert(quick, {}, expires_at=dt.datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="on_expiry"):
        client.insert(quick, {}, on_expiry="later")
    with pytest.raises(TypeError):
        client.insert(quick, {}, deadline="soon")


def test_children_get_their_machine_deadline_and_started_rows_lose_their_expiry(dsn, schema, client, db):
    p = client.insert(Waiter, {"kids": 1}, expires_in=3600)
    drain(dsn, ALL, schema=schema, collapse_time=False)
    parent = client.get(p)
    assert parent.status == "awaiting_children" and parent.expires_at is None  # it started
    (kid,) = db.execute(f'SELECT id FROM "{schema}".instances WHERE parent_id = %s', [p]).fetchone()
    assert client.get(kid).expires_at is None


# --------------------------------------------------------------------------- expiry before start


def test_a_row_not_started_by_its_expiry_is_failed_or_cancelled_by_the_sweep(dsn, schema, client, db):
    past = _now(db) - PAST
    failed = client.insert(quick, {}, expires_at=past)
    cancelled = client.insert(quick, {}, expires_at=past, on_expiry="cancel", correlation_key="q:1")
    later = client.insert(quick, {}, expires_in=3600)
    fired = _sweep(dsn, schema)
    assert sorted(fired.expired) == sorted([failed, cancelled]) and fired.failed == []
    inst = assert_failed(client, failed, "expired: not started by ")
    assert inst.expires_at is None and inst.cancel_reason is None
    gone = assert_status(client, cancelled, "cancelled")
    assert gone.cancel_reason.startswith("expired: not started by ") and gone.last_error is None
    assert 3590 < fired.due_in <= 3600  # the next one due: `later`
    client.insert(quick, {}, correlation_key="q:1")  # the key was freed
    drain(dsn, ALL, schema=schema)
    assert_done(client, later, "ran")
    # retried, it runs: its expiry was spent
    assert client.retry(failed) == "perform"
    drain(dsn, ALL, schema=schema)
    assert_done(client, failed, "ran")


def test_the_claim_never_starts_an_expired_row_even_before_the_sweep(dsn, schema, client, db):
    """Guard: instance_claim's ``expires_at > now()`` (and ``deadline > now()``) filter."""
    past = _now(db) - PAST
    expired = client.insert(quick, {}, expires_at=past)
    overdue = client.insert(quick, {}, deadline=past)
    fresh = client.insert(quick, {}, expires_in=3600, deadline=3600)
    engine = Engine(Registry(ALL), schema=schema)

    async def claim():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return [r.id for r in await engine.claim(conn, "rt", 10)]

    assert asyncio.run(claim()) == [fresh]
    for iid in (expired, overdue):
        assert_status(client, iid, "runnable")  # left for the sweep
    _sweep(dsn, schema)
    assert_failed(client, expired, "expired: not started by")
    assert_failed(client, overdue, "deadline passed: not finished by")


@pytest.fixture(scope="module")
def big_schema(dsn):
    """The big table of tests/test_plans.py: 200k finished rows, 20k future, 500 due."""
    import secrets

    from pgdurable.db import migrations

    name = f"plans_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn, name)
        populate(conn, name)
        yield name
        conn.execute(f'DROP SCHEMA "{name}" CASCADE')


@pytest.fixture
def big(big_schema):
    return for_schema(big_schema)


def test_the_claim_keeps_its_plan(db, big, big_schema):
    """On the big table of tests/test_plans.py, with expired rows first in line: the claim
    still walks instances_pick (no other scan of the table), passes over the expired rows
    and claims its batch."""
    t = f'"{big_schema}".instances'
    with db.transaction(force_rollback=True):
        db.execute(
            f"INSERT INTO {t} (fsm, version, step, queue, eligible_at, expires_at)"
            " SELECT 'job', 1, 'perform', 'q', now() - interval '1 hour', now() - interval '1 second'"
            " FROM generate_series(1, 30)"
        )
        p = plan(db, big["instance_claim"], _claim_params("q", 50))
        scans = [n for n in nodes(p) if n.get("Relation Name") == "instances"]
        assert not any(n["Node Type"] == "Seq Scan" for n in scans)
        pick = [n for n in scans if n.get("Index Name") == "instances_pick"]
        assert pick and all(n["Actual Rows"] * n["Actual Loops"] <= 50 for n in pick)
        removed = sum(n.get("Rows Removed by Filter", 0) for n in pick)
        assert removed == 30 and p["Actual Rows"] == 50  # the expired ones, filtered out


def test_the_sweep_reads_its_partial_indexes(db, big):
    p = plan(db, big["deadline_next_due"], {})
    scans = [n for n in nodes(p) if n.get("Relation Name") == "instances"]
    assert {n.get("Index Name") for n in scans} == {"instances_expiry", "instances_deadline"}
    assert sum(n["Actual Rows"] * n["Actual Loops"] for n in scans) == 0  # none due: empty indexes


def _claim_params(queue: str, limit: int) -> dict:
    return {
        "queue": queue,
        "limit": limit,
        "worker": "w",
        "token": 1,
        "lease": dt.timedelta(seconds=60),
        "horizon": dt.timedelta(0),
        "gates": [],
        "gate_limits": [],
    }


# --------------------------------------------------------------------------- deadlines


def test_a_deadline_fails_a_parked_instance_and_cancels_its_descendants(dsn, schema, client, db):
    root = client.insert(Waiter, {"kids": 2}, deadline=3600)  # two children, a grandchild each
    other = client.insert(Waiter, {}, deadline=3600)
    drain(dsn, ALL, schema=schema, collapse_time=False)
    tree = db.execute(
        f"""WITH RECURSIVE t(id) AS (SELECT %s::bigint UNION ALL
              SELECT i.id FROM "{schema}".instances AS i JOIN t ON i.parent_id = t.id)
            SELECT id FROM t WHERE id <> %s""",
        [root, root],
    ).fetchall()
    below = [r[0] for r in tree]
    assert len(below) == 4
    _push_deadline(db, schema, [root])
    fired = _sweep(dsn, schema)
    assert (fired.failed, fired.marked) == ([root], [])
    inst = assert_failed(client, root, "deadline passed: not finished by ")
    assert inst.deadline is None and inst.awaits is None
    for iid in below:
        kid = assert_status(client, iid, "cancelled")
        assert kid.cancel_reason.startswith("the deadline of instance ")
    assert_status(client, other, "awaiting_signal")  # its deadline has not passed
    with pytest.raises(NoTarget):
        client.signal(root, "go", {})
    assert drain(dsn, ALL, schema=schema, collapse_time=False).steps == 0


def test_a_child_failed_by_its_deadline_is_counted_by_its_parent(dsn, schema, client, db):
    root = client.insert(Waiter, {"kids": 1})
    drain(dsn, ALL, schema=schema, collapse_time=False)
    (kid,) = db.execute(f'SELECT id FROM "{schema}".instances WHERE parent_id = %s', [root]).fetchone()
    _push_deadline(db, schema, [kid])
    fired = _sweep(dsn, schema)
    assert fired.failed == [kid]
    assert client.get(root).status == "runnable"  # joined: its last child ended
    drain(dsn, ALL, schema=schema, collapse_time=False)
    assert client.get(root).status == "awaiting_signal"
    client.signal(root, "go", {})
    drain(dsn, ALL, schema=schema)
    assert_done(client, root, "ended")


def test_an_executing_instance_past_its_deadline_fails_when_its_step_returns(dsn, schema, client, db):
    """The sweep marks the claimed row; the step runs on; its outcome is refused and the
    row fails with the deadline as its error (as a cancel of an executing row settles)."""
    iid = client.insert(Waiter, {}, deadline=3600)
    engine = Engine(Registry(ALL), schema=schema)

    async def run():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            (row,) = await engine.claim(conn, "rt", 10)
            _push_deadline(db, schema, [iid])
            fired = _sweep(dsn, schema)
            assert fired.marked == [iid] and fired.failed == []
            assert client.get(iid).cancel_requested
            result = await engine.run(row)
            assert result.kind == "await"
            return await engine.flush(conn, [result])

    report = asyncio.run(run())
    assert report.cancelled == {iid} and iid not in report.committed
    inst = assert_failed(client, iid, "deadline passed: not finished by ")
    assert inst.awaits is None and inst.cancel_requested is False


def test_the_sweep_sleeps_until_the_next_deadline(dsn, schema, client):
    """With an interval of an hour, the sweep still fails the row when its deadline comes:
    it sleeps until the next due time, not for its interval."""
    iid = client.insert(Waiter, {}, deadline=1.5)
    drain(dsn, ALL, schema=schema, collapse_time=False)
    assert_status(client, iid, "awaiting_signal")

    def connect():
        return psycopg.connect(dsn, autocommit=True)

    async def main():
        sweep = Deadlines(connect, for_schema(schema), 3600.0, logging.getLogger("t"))
        sweep.start()
        try:
            while client.get(iid).status != "failed":
                assert sweep.failed() is None
                await asyncio.sleep(0.05)
        finally:
            await sweep.stop(5.0)
        return sweep.runs

    runs = asyncio.run(asyncio.wait_for(main(), 30))
    assert runs >= 2  # the first pass found nothing due, the second came at the deadline
    assert_failed(client, iid, "deadline passed")


def test_cli_insert_takes_the_time_limits(dsn, schema, client):
    db_opts = ["--dsn", dsn, "--schema", schema]
    drain(dsn, ALL, schema=schema)
    out = json.loads(
        ok(cli("insert", "dl_quick", "--expires-in", "5m", "--deadline", "2h", "--json", *db_opts))
    )
    inst = client.get(out["id"])
    assert inst.expires_at is not None and inst.deadline is not None
    assert dt.timedelta(minutes=4) < inst.deadline - inst.expires_at < dt.timedelta(hours=2)
    at = "2030-01-02T03:04:05+00:00"
    out = json.loads(
        ok(
            cli(
                "insert",
                "dl_timed",
                "--expires-at",
                at,
                "--on-expiry",
                "cancel",
                "--deadline",
                at,
                "--json",
                *db_opts,
            )
        )
    )
    inst = client.get(out["id"])
    assert inst.expires_at == inst.deadline == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    default = json.loads(ok(cli("insert", "dl_timed", "--json", *db_opts)))
    assert client.get(default["id"]).deadline is not None  # the machine's hour
    bad = cli("insert", "dl_quick", "--deadline", "someday", *db_opts)
    assert bad.returncode == 2 and "neither a duration" in bad.stderr


# --------------------------------------------------------------------------- a real supervisor


def test_a_deadline_hits_an_executing_step_under_a_supervisor(dsn, schema, client, sups, tmp_path):
    start(sups, tmp_path, dsn, schema, modules='["tests.deadline_machines"]')
    started, gate = tmp_path / "slow.started", tmp_path / "slow.gate"
    iid = client.insert("dl_slow", {"started": str(started), "gate": str(gate)}, deadline=2)
    expired = client.insert("dl_quick", {}, expires_at=dt.datetime.now(dt.UTC) - PAST)
    wait_until(started.exists, what="the step to start")
    wait_until(lambda: client.get(iid).cancel_requested, what="the sweep to mark it")
    inst = client.get(iid)
    assert inst.status == "executing" and "deadline passed" in inst.last_error
    gate.touch()
    wait_until(lambda: client.get(iid).status == "failed", what="the step to return")
    inst = assert_failed(client, iid, "deadline passed: not finished by ")
    assert inst.step == "work" and inst.result is None  # `after` never ran
    assert client.history(iid) == []  # its outcome was discarded: no attempt committed
    wait_until(lambda: client.get(expired).status == "failed", what="the expired row to end")
    assert_failed(client, expired, "expired: not started by")
    assert client.history(expired) == []  # it never ran
    assert sups[0].stop() == 0
