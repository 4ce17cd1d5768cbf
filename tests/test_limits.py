"""Concurrency keys, gates and rate limits against a real PostgreSQL (one process)."""

from __future__ import annotations

import asyncio
import datetime as dt

import psycopg
import pytest

from pgdurable import Insert
from pgdurable.contract.fsm import Registry
from pgdurable.engine import Engine
from pgdurable.engine.claim import claim
from pgdurable.runtime.config import parse_limits
from pgdurable.runtime.sweeps import gc as maintenance
from pgdurable.testing import assert_failed, drain

from .limit_machines import Chain, work
from .test_races import wait_until_blocked
from .trace import traced

ALL = [work, Chain]
GATE = parse_limits(concurrency_limits={"stripe": {"limit": 2}})
RATE = parse_limits(rate_limits={"api": {"allowed": 5, "period": "1h", "burst": 5}})


def engine(schema, limits=None):
    return Engine(Registry(ALL), schema=schema, limits=limits)


def run(coro):
    return asyncio.run(coro)


async def claim_once(dsn, eng, n=50):
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await eng.claim(conn, "lim", n)


def executing(db, schema, key=None):
    sql = f"SELECT count(*) FROM \"{schema}\".instances WHERE status = 'executing'"
    if key is None:
        return db.execute(sql).fetchone()[0]
    return db.execute(sql + " AND concurrency_key = %s", [key]).fetchone()[0]


def slots(db, schema, key):
    return db.execute(
        f'SELECT sum(available), sum(capacity) FROM "{schema}".gate_slots WHERE key = %s', [key]
    ).fetchone()


# -- K = 1 ------------------------------------------------------------------------------


def test_unconfigured_key_runs_one_at_a_time(dsn, schema, client, db):
    client.insert_many([Insert(work, {}, concurrency_key="acct:1") for _ in range(3)])
    client.insert_many([Insert(work, {}, concurrency_key=("acct", 2)) for _ in range(2)])
    client.insert(work, {})
    eng = engine(schema)
    rows = run(claim_once(dsn, eng))
    assert sorted(r.concurrency_key or "-" for r in rows) == ["-", "acct:1", "acct:2"]
    assert run(claim_once(dsn, engine(schema))) == []  # both keys busy, nothing else left
    with pytest.raises(psycopg.errors.UniqueViolation):  # the index makes a second one uncommittable
        db.execute(
            f"UPDATE \"{schema}\".instances SET status = 'executing' WHERE concurrency_key = 'acct:1'"
            " AND status = 'runnable'"
        )


def test_racing_claimers_lose_one_row_not_the_batch(dsn, schema, client, db):
    """Claimer A holds its claim of key k open; B's claim collides on the arbiter index,
    is retried against the committed truth, and still gets every other row."""
    client.insert_many([Insert(work, {}, concurrency_key="k") for _ in range(2)])
    others = client.insert_many([Insert(work, {}) for _ in range(3)])
    a, b = engine(schema), engine(schema)

    async def go():
        async with (
            await psycopg.AsyncConnection.connect(dsn) as held,  # not autocommit: stays open
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn_b,
        ):
            rows_a = await claim(
                held,
                a.q,
                queue="lim",
                limit=1,
                worker=a.worker_id,
                token=1,
                lease=dt.timedelta(seconds=60),
                gates=a.limits.claim_params(),
            )
            assert [r.concurrency_key for r in rows_a] == ["k"]
            task = asyncio.create_task(b.claim(conn_b, "lim", 10))
            await asyncio.to_thread(wait_until_blocked, db, db.info.dbname)  # on A's index entry
            await held.commit()
            return await task

    rows_b = run(go())
    assert sorted(r.id for r in rows_b) == sorted(others)  # the other k row skipped, not the batch
    assert executing(db, schema, "k") == 1


def test_next_keeps_releases_or_switches_the_key(dsn, schema, client):
    kept = client.insert(Chain, {}, concurrency_key="c:1")
    released = client.insert(Chain, {"key": None}, concurrency_key="c:2")
    switched = client.insert(Chain, {"key": "c:9"}, concurrency_key="c:3")
    drain(dsn, ALL, schema=schema)
    assert client.get(kept).result == {"key": "c:1"}
    assert client.get(released).result == {"key": None}
    assert client.get(switched).result == {"key": "c:9"}


# -- gates ------------------------------------------------------------------------------


def test_gate_admits_at_most_limit_and_credits_on_outcome(dsn, schema, client, db):
    client.insert_many([Insert(work, {}, concurrency_key="stripe:7") for _ in range(5)])
    eng = engine(schema, GATE)

    async def go():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            rows = await eng.claim(conn, "lim", 50)
            assert len(rows) == 2 and all(r.shard == 0 for r in rows)
            assert slots(db, schema, "stripe:7") == (0, 2)
            assert await eng.claim(conn, "lim", 50) == []  # gate full
            await eng.flush(conn, [await eng.run(rows[0])])
            assert slots(db, schema, "stripe:7") == (1, 2)

    run(go())
    assert executing(db, schema, "stripe:7") == 1
    with pytest.raises(psycopg.errors.CheckViolation):  # counters cannot go below zero
        db.execute(f'UPDATE "{schema}".gate_slots SET available = available - 5')


def test_gate_shards_split_the_limit(dsn, schema, client, db):
    limits = parse_limits(concurrency_limits={"pool": {"limit": 5, "shards": 2}})
    client.insert_many([Insert(work, {}, concurrency_key="pool:a") for _ in range(8)])
    rows = run(claim_once(dsn, engine(schema, limits)))
    assert len(rows) == 5 and sorted(r.shard for r in rows) == [0, 0, 0, 1, 1]
    caps = db.execute(
        f'SELECT shard, capacity, available FROM "{schema}".gate_slots ORDER BY shard'
    ).fetchall()
    assert caps == [(0, 3, 0), (1, 2, 0)]


def test_gate_counters_repaired_from_truth(dsn, schema, client, db):
    client.insert_many([Insert(work, {}, concurrency_key="stripe:1") for _ in range(3)])
    run(claim_once(dsn, engine(schema, GATE)))  # two hold slots
    db.execute(f'UPDATE "{schema}".gate_slots SET available = 0')  # as if credits were lost
    db.execute(
        f"UPDATE \"{schema}\".instances SET status = 'runnable', concurrency_shard = NULL"
        ' WHERE id IN (SELECT id FROM "' + schema + "\".instances WHERE status = 'executing' LIMIT 1)"
    )
    from pgdurable.db.queries import for_schema

    repaired, _ = maintenance.limits(db, for_schema(schema))
    assert repaired == 1 and slots(db, schema, "stripe:1") == (1, 2)  # capacity minus the one holder


# -- rate limits ------------------------------------------------------------------------


def test_rate_limit_grants_the_burst_then_defers(dsn, schema, client, db):
    ids = client.insert_many([Insert(work, {}, rate_limit="api") for _ in range(8)])
    tally = drain(dsn, ALL, schema=schema, limits=RATE, collapse_time=False)
    assert tally.done == 5
    left = db.execute(f'SELECT available FROM "{schema}".rate_buckets WHERE key = %s', ["api"]).fetchone()[0]
    assert left == pytest.approx(0, abs=1e-3)
    waits = [
        (client.get(i).eligible_at - client.get(i).updated_at).total_seconds()
        for i in ids
        if client.get(i).status == "runnable"
    ]
    assert len(waits) == 3 and all(w >= 600 for w in waits)  # deferred until tokens exist (720 s each)


def test_rate_partitions_have_their_own_buckets(dsn, schema, client):
    client.insert_many([Insert(work, {}, rate_limit=("api", t)) for t in ("a", "b") for _ in range(7)])
    assert drain(dsn, ALL, schema=schema, limits=RATE, collapse_time=False).done == 10


def test_grants_take_the_prefix_whose_weight_fits(dsn, schema, client, db):
    client.insert_many([Insert(work, {}, rate_limit="api", weight=2) for _ in range(4)])
    assert drain(dsn, ALL, schema=schema, limits=RATE, collapse_time=False).done == 2
    left = db.execute(f'SELECT available FROM "{schema}".rate_buckets').fetchone()[0]
    assert left == pytest.approx(1.0, abs=1e-3)


def test_rate_limit_set_by_next_and_kept_on_retry(dsn, schema, client, db):
    client.insert_many([Insert(Chain, {"rate": "api"}) for _ in range(7)])
    tally = drain(dsn, ALL, schema=schema, limits=RATE, collapse_time=False)
    assert tally.next == 7 and tally.done == 5  # the second step is the limited one


def test_misconfigured_limits_are_loud(dsn, schema, client):
    unknown = client.insert(work, {}, rate_limit="nope")
    fat = client.insert(work, {}, rate_limit="api", weight=6)
    bad_next = client.insert(Chain, {"rate": "nope"})
    drain(dsn, ALL, schema=schema, limits=RATE)
    inst = client.get(unknown)
    assert inst.status == "held" and "rate limit 'nope' is not configured" in inst.last_error
    inst = client.get(fat)
    assert inst.status == "held" and "exceeds the burst 5" in inst.last_error
    assert_failed(client, bad_next, "rate limit 'nope' is not configured")


def test_buckets_correct_after_gc_pruned_them(dsn, schema, client, db):
    from pgdurable.db.queries import for_schema

    client.insert_many([Insert(work, {}, rate_limit="api") for _ in range(5)])
    drain(dsn, ALL, schema=schema, limits=RATE)
    db.execute(f"UPDATE \"{schema}\".rate_buckets SET last_refill = last_refill - interval '2 hours'")
    _, pruned = maintenance.limits(db, for_schema(schema))
    assert pruned == 1  # refilled completely: nothing to remember
    client.insert_many([Insert(work, {}, rate_limit="api") for _ in range(7)])
    assert drain(dsn, ALL, schema=schema, limits=RATE, collapse_time=False).done == 5


# -- cost -------------------------------------------------------------------------------


def test_rows_without_limits_pay_nothing(dsn, schema, client, db):
    client.insert_many([Insert(work, {}) for _ in range(11)])
    eng = engine(schema, parse_limits({"stripe": {"limit": 2}}, {"api": {"allowed": 1, "period": 1}}))

    async def go():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await eng.claim(conn, "lim", 1)  # prepare
            with traced(conn) as t:
                rows = await eng.claim(conn, "lim", 10)
            return rows, t

    rows, t = run(go())
    assert len(rows) == 10 and t.statements == 1
    plan = "\n".join(
        r[0]
        for r in db.execute(
            b"EXPLAIN " + eng.q["instance_claim"],
            {
                "queue": "lim",
                "limit": 10,
                "worker": "w",
                "token": 1,
                "lease": dt.timedelta(seconds=1),
                "horizon": dt.timedelta(0),
                **eng.limits.claim_params(),
            },
        )
    )
    assert "instances_pick" in plan and "gate_slots" not in plan and "rate_buckets" not in plan


def test_throttled_backlog_does_not_starve_other_work(dsn, schema, client):
    client.insert_many([Insert(work, {}, rate_limit="api") for _ in range(40)])
    others = client.insert_many([Insert(work, {}) for _ in range(5)])  # behind the backlog
    drain(dsn, ALL, schema=schema, limits=RATE, collapse_time=False, batch=10)
    assert all(client.get(i).status == "done" for i in others)
