"""Concurrency keys, gates and rate limits against a real PostgreSQL (one process)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

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


def test_claim_skips_a_key_another_claim_is_taking(dsn, schema, client, db, caplog):
    """Claimer A holds its claim of key k open; B neither waits for it nor collides on the
    arbiter index: it skips the other k row and gets every other row at once."""
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
            rows_b = await asyncio.wait_for(b.claim(conn_b, "lim", 10), 10)  # A still open
            await held.commit()
            return rows_b, await b.claim(conn_b, "lim", 10)

    with caplog.at_level(logging.INFO, logger="pgdurable.claim"):
        rows_b, after = run(go())
    assert sorted(r.id for r in rows_b) == sorted(others)  # the other k row skipped, not the batch
    assert after == []  # A's claim committed: k is busy
    assert executing(db, schema, "k") == 1
    assert not [r for r in caplog.records if getattr(r, "event", None) == "claim_collision"]


def test_key_claimed_after_the_claim_statement_began_is_seen_busy(dsn, schema, client, db):
    """The interleaving that makes racing claims collide: B's statement has its snapshot,
    then A's claim of k commits, then B's filter reaches k. A probe in B's snapshot would
    find k free (and B's UPDATE would hit the arbiter index); the filter's probe runs with
    a fresh snapshot once it holds the key's lock, and finds k busy. B is held at that
    point by a row lock A takes in its claim transaction."""
    (first, _second) = client.insert_many([Insert(work, {}, concurrency_key="k") for _ in range(2)])
    fence = client.insert(work, {}, queue="fence")
    a = engine(schema)
    t = f'"{schema}".instances'

    async def go():
        async with await psycopg.AsyncConnection.connect(dsn) as held:  # A: stays open
            rows_a = await claim(
                held, a.q, queue="lim", limit=1, worker=a.worker_id, token=1, lease=dt.timedelta(seconds=60)
            )
            assert [r.id for r in rows_a] == [first]
            await held.execute(f"SELECT 1 FROM {t} WHERE id = %s FOR UPDATE", [fence])

            def b():  # B: snapshot first, then wait for the fence, then ask about k
                with psycopg.connect(dsn, autocommit=True) as conn:
                    return conn.execute(
                        f"WITH fence AS MATERIALIZED (SELECT id FROM {t} WHERE id = %s FOR UPDATE)"
                        f' SELECT "{schema}".concurrency_key_try_claim(%s) FROM fence',
                        [fence, "k"],
                    ).fetchone()[0]

            task = asyncio.create_task(asyncio.to_thread(b))
            await asyncio.to_thread(wait_until_blocked, db, db.info.dbname)
            await held.commit()  # A's claim of k commits after B's snapshot
            return await task

    assert run(go()) is False
    assert executing(db, schema, "k") == 1


def test_only_free_looking_keys_reach_the_key_filter(dsn, schema, client, db):
    """The per-key lock is taken for a key that looks free, and for nothing else: unkeyed
    rows and a key busy in the claim's snapshot decide without it (what the claim holds
    in pg_locks before it commits)."""
    client.insert_many([Insert(work, {}) for _ in range(5)])
    client.insert_many([Insert(work, {}, concurrency_key=k) for k in ("busy:1", "busy:1", "free:1")])
    db.execute(
        f"UPDATE \"{schema}\".instances SET status = 'executing', locked_by = 'elsewhere'"
        f" WHERE id = (SELECT min(id) FROM \"{schema}\".instances WHERE concurrency_key = 'busy:1')"
    )
    eng = engine(schema)

    async def go():
        async with await psycopg.AsyncConnection.connect(dsn) as conn:  # the claim stays open
            rows = await claim(
                conn,
                eng.q,
                queue="lim",
                limit=10,
                worker=eng.worker_id,
                token=1,
                lease=dt.timedelta(seconds=60),
            )
            cur = await conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            )
            (locks,) = await cur.fetchone()
            await conn.rollback()
            return rows, locks

    rows, locks = run(go())
    assert sorted(r.concurrency_key or "-" for r in rows) == ["-"] * 5 + ["free:1"]
    assert locks == 1


def test_claimers_sharing_keys_do_not_collide(dsn, schema, client, db, caplog):
    """Eight claimers on their own connections race for rows sharing four keys: the
    candidate filter serialises them per key, so no claim hits the arbiter index (each
    collision would be a failed statement, logged by the server and retried here), K = 1
    holds at every sample, and every row finishes exactly once."""
    keys, per_key, claimers = 4, 150, 8
    for k in range(keys):
        client.insert_many([Insert(work, {}, concurrency_key=("acct", k)) for _ in range(per_key)])
    plain = client.insert_many([Insert(work, {}) for _ in range(100)])
    total = keys * per_key + len(plain)
    finished: list[int] = []
    overlaps: list[tuple[str, int]] = []

    async def claimer(eng):
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while len(finished) < total:
                rows = await eng.claim(conn, "lim", 2)
                if not rows:
                    await asyncio.sleep(0)  # others hold the keys left: let them commit
                    continue
                report = await eng.flush(conn, [await eng.run(r) for r in rows])
                finished.extend(report.committed)

    async def checker():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while len(finished) < total:
                cur = await conn.execute(
                    f'SELECT concurrency_key, count(*) FROM "{schema}".instances'
                    " WHERE status = 'executing' AND concurrency_key IS NOT NULL"
                    " GROUP BY 1 HAVING count(*) > 1"
                )
                overlaps.extend(await cur.fetchall())
                await asyncio.sleep(0)

    async def go():
        await asyncio.gather(checker(), *(claimer(engine(schema)) for _ in range(claimers)))

    with caplog.at_level(logging.INFO, logger="pgdurable.claim"):
        run(go())
    collisions = [r for r in caplog.records if getattr(r, "event", None) == "claim_collision"]
    assert collisions == [], f"{len(collisions)} collisions over {total} claims"
    assert overlaps == []
    assert sorted(finished) == sorted(set(finished)) and len(finished) == total
    assert (
        db.execute(f"SELECT count(*) FROM \"{schema}\".instances WHERE status = 'done'").fetchone()[0]
        == total
    )


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
