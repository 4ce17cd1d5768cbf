"""Interleavings at the critical points: one side holds its transaction open while the
other runs, then the invariant is checked. Each fails if its guard is removed."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psycopg

from pgdurable.contract.fsm import Registry
from pgdurable.engine import Engine
from pgdurable.engine.commit import _park_params, _spawn_params
from pgdurable.testing import assert_done, assert_status, drain

from .coord_machines import Leaf, Pack, Parent, Payment, TwoPings

ALL = [Payment, Pack, Parent, Leaf, TwoPings]


def wait_until_blocked(db, dbname: str, timeout: float = 10.0) -> None:
    """Wait until some backend of the test database waits on a lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            [dbname],
        ).fetchone()
        if row[0]:
            return
        time.sleep(0.01)
    raise AssertionError("the other side never blocked on the row lock")


class Background(threading.Thread):
    """Run a callable in a thread and keep its result or exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc

    def value(self, timeout=15.0):
        self.join(timeout)
        assert not self.is_alive(), "background side did not finish"
        if self.error:
            raise self.error
        return self.result


def _dbname(db) -> str:
    return db.info.dbname


async def _claim_run(engine: Engine, conn, queue: str):
    rows = await engine.claim(conn, queue, 10)
    return rows, [await engine.run(r) for r in rows]


def test_signal_committed_between_step_start_and_park(dsn, schema, client):
    iid = client.insert(Payment)

    async def go():
        engine = Engine(Registry(ALL), schema=schema)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            rows = await engine.claim(conn, "pay", 10)
            client.signal(iid, "paid", {"n": 1})  # commits while the step runs
            return await engine.flush(conn, [await engine.run(r) for r in rows])

    report = asyncio.run(go())
    assert report.rechecked == {iid}
    assert_status(client, iid, "runnable")  # the recheck woke it at once
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid, {"seen": ["paid:1"], "inbox": ["paid"]})


def test_signal_delivered_while_park_transaction_is_open(dsn, schema, client, db):
    """The parker holds the row; the delivery waits for it and then wakes the parked row."""
    iid = client.insert(Payment)
    engine = Engine(Registry(ALL), schema=schema)

    async def go():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            _, results = await _claim_run(engine, conn, "pay")
            async with conn.transaction():
                await conn.execute(
                    engine.q["instance_park_await_if_owned_many"], _park_params(engine.worker_id, results)
                )
                delivery = Background(lambda: client.signal(iid, "paid", {"n": 2}))
                await asyncio.to_thread(wait_until_blocked, db, _dbname(db))
                cur = await conn.execute(
                    engine.q["instance_await_recheck_many"], {"ids": [iid], "presented": []}
                )
                assert await cur.fetchall() == []  # not inserted yet: the delivery waits for us
            return await asyncio.to_thread(delivery.value)

    assert asyncio.run(go()) is not None
    assert_status(client, iid, "runnable")  # woken by the delivery after the park committed
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid, {"seen": ["paid:2"], "inbox": ["paid"]})


def test_park_while_delivery_transaction_is_open(dsn, schema, client, db):
    """The delivery holds the row; the park waits, and its recheck sees the signal."""
    iid = client.insert(Payment)
    engine = Engine(Registry(ALL), schema=schema)

    async def go():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            _, results = await _claim_run(engine, conn, "pay")
            with psycopg.connect(dsn) as deliverer:  # not autocommit: stays open
                deliverer.execute(
                    engine.q["signal_deliver"],
                    {
                        "target_id": iid,
                        "target_key": None,
                        "name": "paid",
                        "payload": '{"n": 3}',
                        "dedup_key": None,
                        "notify": True,
                        "traceparent": None,
                    },
                )

                async def flush_in_other_conn():
                    return await engine.flush(conn, results)

                task = asyncio.create_task(flush_in_other_conn())
                await asyncio.to_thread(wait_until_blocked, db, _dbname(db))
                deliverer.commit()
                return await task

    report = asyncio.run(go())
    assert report.rechecked == {iid}
    assert_status(client, iid, "runnable")
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid, {"seen": ["paid:3"], "inbox": ["paid"]})


def test_redelivery_while_the_consuming_commit_is_open(dsn, schema, client, db):
    """The step that consumes evt-1 is committing (its signal row deleted, not yet
    committed) when evt-1 is delivered again: the delivery waits for the row, then finds
    the key remembered. It is neither stored nor a wake-up of the next await."""
    iid = client.insert(TwoPings)
    drain(dsn, ALL, schema=schema)
    client.signal(iid, "ping", {"n": 1}, dedup_key="evt-1")
    engine = Engine(Registry(ALL), schema=schema)

    async def go():
        async with (
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
            await psycopg.AsyncConnection.connect(dsn) as committing,  # not autocommit: stays open
        ):
            _, results = await _claim_run(engine, conn, "pay")
            assert [r.consume for r in results] != [[]]  # it takes the ping
            report = await engine.flush(committing, results)
            assert report.committed == {iid}
            delivery = Background(lambda: client.signal(iid, "ping", {"n": 1}, dedup_key="evt-1"))
            await asyncio.to_thread(wait_until_blocked, db, _dbname(db))
            await committing.commit()
            return await asyncio.to_thread(delivery.value)

    assert asyncio.run(go()) is None
    assert (
        db.execute(f'SELECT count(*) FROM "{schema}".signals WHERE target_id = %s', [iid]).fetchone()[0] == 0
    )
    drain(dsn, ALL, schema=schema)  # runs `again`, which parks: nothing wakes it
    inst = assert_status(client, iid, "awaiting_signal")
    assert inst.step == "second"


def test_children_invisible_until_spawn_commits(dsn, schema, client):
    iid = client.insert(Parent, {"values": [1, 2]})
    engine = Engine(Registry(ALL), schema=schema)
    other = Engine(Registry(ALL), schema=schema)

    async def go():
        async with (
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn2,
        ):
            rows, results = await _claim_run(engine, conn, "parents")
            params: dict[str, Any]
            async with conn.transaction():
                cur = await conn.execute(
                    engine.q["instance_lock_owned_many"],
                    {"worker": engine.worker_id, "ids": [iid], "tokens": [rows[0].token]},
                )
                locked = [r[0] for r in await cur.fetchall()]
                params = _spawn_params(results, locked)
                await conn.execute(engine.q["instance_spawn_children_many"], params)
                # children exist in this transaction only: no worker can run one yet
                assert await other.claim(conn2, "kids", 10) == []
            kids = await other.claim(conn2, "kids", 10)
            assert len(kids) == 2
            await other.flush(conn2, [await other.run(k) for k in kids])

    asyncio.run(go())
    inst = assert_status(client, iid, "runnable")
    assert inst.children_pending == 0
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid)


def test_timeout_fires_while_signal_arrives(dsn, schema, client, db):
    """Expiry holds the row; the delivery waits, stores the signal, and the one wake sees it."""
    iid = client.insert(Payment, {"timeout": 3600})
    drain(dsn, ALL, schema=schema, collapse_time=False)
    engine = Engine(Registry(ALL), schema=schema)
    with psycopg.connect(dsn) as expirer:
        fired = expirer.execute(
            engine.q["instance_await_expire"], {"horizon": "1000 days", "limit": 10}
        ).fetchall()
        assert [r[0] for r in fired] == [iid]
        delivery = Background(lambda: client.signal(iid, "paid", {"n": 4}))
        wait_until_blocked(db, _dbname(db))
        expirer.commit()
    assert delivery.value() is not None
    tally = drain(dsn, ALL, schema=schema, collapse_time=False)
    assert tally.done == 1 and tally.steps == 1  # woken once
    assert_done(client, iid, {"seen": ["paid:4"], "inbox": ["paid"]})


def test_signal_holds_row_while_timeout_sweeps(dsn, schema, client):
    """Delivery holds the row; the expiry skips it (SKIP LOCKED) and nothing wakes twice."""
    iid = client.insert(Payment, {"timeout": 3600})
    drain(dsn, ALL, schema=schema, collapse_time=False)
    engine = Engine(Registry(ALL), schema=schema)
    with psycopg.connect(dsn) as deliverer, psycopg.connect(dsn, autocommit=True) as expirer:
        deliverer.execute(
            engine.q["signal_deliver"],
            {
                "target_id": iid,
                "target_key": None,
                "name": "paid",
                "payload": '{"n": 5}',
                "dedup_key": None,
                "notify": True,
                "traceparent": None,
            },
        )
        assert (
            expirer.execute(
                engine.q["instance_await_expire"], {"horizon": "1000 days", "limit": 10}
            ).fetchall()
            == []
        )
        deliverer.commit()
    tally = drain(dsn, ALL, schema=schema, collapse_time=False)
    assert tally.steps == 1 and tally.timeouts == 0
    assert_done(client, iid, {"seen": ["paid:5"], "inbox": ["paid"]})


def test_stale_outcome_after_reclaim_changes_nothing(dsn, schema, client, db):
    """A worker whose rows were reclaimed (and claimed again, even by itself) cannot commit
    its late outcomes: no signal consumed, no parent decremented, no child inserted."""
    pack = client.insert(Pack, {"want": 1})
    parent = client.insert(Parent, {"values": [1]})
    drain(dsn, ALL, schema=schema, queues=["pay", "parents"])  # pack parks, parent spawns
    client.signal(pack, "item", {"n": 1})
    spawner = client.insert(Parent, {"values": [7, 8]})
    engine = Engine(Registry(ALL), schema=schema)
    t = f'"{schema}".instances'

    async def go():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            _, stale_pay = await _claim_run(engine, conn, "pay")  # pack: Next, consumes item
            _, stale_kids = await _claim_run(engine, conn, "kids")  # leaf: Done, joins parent
            _, stale_spawn = await _claim_run(engine, conn, "parents")  # spawner: Spawn
            # what the reaper does to an expired lease
            db.execute(
                f"UPDATE {t} SET status = 'runnable', locked_by = NULL, lease_token = NULL"
                " WHERE status = 'executing'"
            )
            # the same worker claims them again: new fencing tokens
            for q in ("pay", "kids", "parents"):
                assert await engine.claim(conn, q, 10)
            return await engine.flush(conn, stale_pay + stale_kids + stale_spawn)

    report = asyncio.run(go())
    assert report.committed == set() and len(report.stale) == 3
    assert (
        db.execute(f'SELECT count(*) FROM "{schema}".signals WHERE target_id = %s', [pack]).fetchone()[0] == 1
    )
    assert client.get(parent).children_pending == 1
    assert db.execute(f"SELECT count(*) FROM {t} WHERE parent_id = %s", [spawner]).fetchone()[0] == 0
    assert db.execute(f"SELECT count(*) FROM {t} WHERE status = 'executing'").fetchone()[0] == 3
