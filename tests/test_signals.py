"""Signals, the inbox and Await: the rules, each with its own test."""

from __future__ import annotations

import asyncio
import datetime as dt

import psycopg
import pytest

from pgdurable import NoTarget
from pgdurable.contract.fsm import Registry
from pgdurable.engine import Engine
from pgdurable.runtime.sweeps.gc import gc
from pgdurable.testing import assert_done, assert_status, drain

from .coord_machines import Pack, Payment, RetryOnce, TwoPings

ALL = [Payment, Pack, RetryOnce, TwoPings]


def _inbox(db, schema, iid):
    return [
        (name, payload)
        for name, payload in db.execute(
            f'SELECT name, payload FROM "{schema}".signals WHERE target_id = %s ORDER BY id', [iid]
        )
    ]


def test_signal_by_id_wakes_parked_instance(dsn, schema, client):
    iid = client.insert(Payment)
    drain(dsn, ALL, schema=schema)
    assert_status(client, iid, "awaiting_signal")
    assert client.signal(iid, "paid", {"n": 1}) is not None
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid, {"seen": ["paid:1"], "inbox": ["paid"]})


def test_signal_by_correlation_key(dsn, schema, client):
    iid = client.insert(Payment, correlation_key="order:42")
    drain(dsn, ALL, schema=schema)
    client.signal("order:42", "paid", {"n": 7})
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid, {"seen": ["paid:7"], "inbox": ["paid"]})


def test_dedup_key_makes_redelivery_idempotent(dsn, schema, client, db):
    iid = client.insert(Payment)
    first = client.signal(iid, "other", {"n": 1}, dedup_key="evt-1")
    again = client.signal(iid, "other", {"n": 2}, dedup_key="evt-1")
    client.signal(iid, "other", {"n": 3})  # no dedup key: always stored
    client.signal(iid, "other", {"n": 4})
    assert first is not None and again is None
    assert [p["n"] for _, p in _inbox(db, schema, iid)] == [1, 3, 4]


def _remembered(db, schema, iid):
    return [
        k
        for (k,) in db.execute(
            f'SELECT dedup_key FROM "{schema}".signal_dedup WHERE target_id = %s ORDER BY 1', [iid]
        )
    ]


def test_redelivery_after_consumption_is_still_a_duplicate(dsn, schema, client, db):
    """The first ping is consumed (its row deleted) when the machine moves on; the same
    dedup key delivered again is still a duplicate: not stored, and the second await is
    not woken by it."""
    iid = client.insert(TwoPings)
    drain(dsn, ALL, schema=schema)
    assert client.signal(iid, "ping", {"n": 1}, dedup_key="evt-1") is not None
    drain(dsn, ALL, schema=schema)
    inst = assert_status(client, iid, "awaiting_signal")
    assert inst.step == "second" and _inbox(db, schema, iid) == []  # consumed

    assert client.signal(iid, "ping", {"n": 1}, dedup_key="evt-1") is None  # redelivery
    assert _inbox(db, schema, iid) == []
    assert_status(client, iid, "awaiting_signal")
    assert drain(dsn, ALL, schema=schema).steps == 0

    assert client.signal(iid, "ping", {"n": 2}, dedup_key="evt-2") is not None
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid, {"seen": [1, 2], "inbox": [2]})
    assert _remembered(db, schema, iid) == ["evt-1", "evt-2"]  # kept while the row exists


def test_duplicate_of_a_kept_signal_wakes_nothing(dsn, schema, client, db):
    """A pack re-awaits with its first item kept in the inbox; that item delivered again
    is neither stored nor a wake-up (the step would run to find nothing new)."""
    iid = client.insert(Pack, {"want": 2})
    drain(dsn, ALL, schema=schema)
    client.signal(iid, "item", {"n": 1}, dedup_key="item-1")
    assert drain(dsn, ALL, schema=schema).await_ == 1  # woken, re-awaits keeping item 1
    assert client.signal(iid, "item", {"n": 1}, dedup_key="item-1") is None
    assert_status(client, iid, "awaiting_signal")
    assert drain(dsn, ALL, schema=schema).steps == 0
    client.signal(iid, "item", {"n": 2}, dedup_key="item-2")
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid, {"wakes": 2, "left": []})


def test_gc_forgets_dedup_keys_with_the_instance(dsn, schema, client, db):
    kept = client.insert(TwoPings)
    done = client.insert(TwoPings)
    drain(dsn, ALL, schema=schema)
    for iid in (kept, done):
        client.signal(iid, "ping", {"n": 1}, dedup_key="a")
    drain(dsn, ALL, schema=schema)
    client.signal(done, "ping", {"n": 2}, dedup_key="b")
    drain(dsn, ALL, schema=schema)
    assert_done(client, done)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert gc(conn, Engine(Registry(ALL), schema=schema).q, retention=dt.timedelta(0)) == 1
    assert client.get(done) is None
    assert _remembered(db, schema, done) == []
    assert _remembered(db, schema, kept) == ["a"]  # a live instance keeps its keys


def test_signal_to_unknown_or_finished_target_is_refused(dsn, schema, client, db):
    with pytest.raises(NoTarget):
        client.signal(999_999, "paid")
    with pytest.raises(NoTarget):
        client.signal("no-such-key", "paid")
    iid = client.insert(Payment, {"timeout": 1}, correlation_key="k")
    drain(dsn, ALL, schema=schema)  # times out (collapsed) and finishes
    assert_done(client, iid)
    with pytest.raises(NoTarget, match="unknown or already finished"):
        client.signal(iid, "paid")
    with pytest.raises(NoTarget):
        client.signal("k", "paid")
    assert _inbox(db, schema, iid) == []


def test_signal_with_other_name_does_not_wake(dsn, schema, client, db):
    iid = client.insert(Payment)
    drain(dsn, ALL, schema=schema)
    client.signal(iid, "refund", {"n": 1})
    assert_status(client, iid, "awaiting_signal")
    assert drain(dsn, ALL, schema=schema).steps == 0
    client.signal(iid, "paid", {"n": 2})
    drain(dsn, ALL, schema=schema)
    # the woken step saw only the matching signal as awaited, the whole inbox as inbox
    assert_done(client, iid, {"seen": ["paid:2"], "inbox": ["refund", "paid"]})
    assert _inbox(db, schema, iid) == []  # terminal outcome clears the inbox


def test_signal_before_park_is_seen(dsn, schema, client):
    """Delivered while the row is still runnable: stored, and the park's recheck wakes it."""
    iid = client.insert(Payment)
    client.signal(iid, "paid", {"n": 5})
    tally = drain(dsn, ALL, schema=schema)
    assert_done(client, iid, {"seen": ["paid:5"], "inbox": ["paid"]})
    assert tally.await_ == 1 and tally.done == 1


def test_await_set_of_names(dsn, schema, client):
    iid = client.insert(Payment)
    drain(dsn, ALL, schema=schema)
    client.signal(iid, "cancelled", {"n": 9})
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid, {"seen": ["cancelled:9"], "inbox": ["cancelled"]})


def test_timeout_wakes_into_then_with_nothing(dsn, schema, client):
    iid = client.insert(Payment, {"timeout": 3600})
    tally = drain(dsn, ALL, schema=schema, collapse_time=False)
    inst = assert_status(client, iid, "awaiting_signal")
    assert inst.await_deadline is not None and inst.step == "settle"
    tally = drain(dsn, ALL, schema=schema)  # collapsed: the deadline fires
    assert tally.timeouts == 1
    assert_done(client, iid, {"timed_out": True, "attempt": 0, "inbox": []})


def test_pack_accumulates_without_consuming_and_progress_consumes_exactly_handed(dsn, schema, client, db):
    iid = client.insert(Pack, {"want": 3})
    drain(dsn, ALL, schema=schema)
    for n in range(3):
        client.signal(iid, "item", {"n": n})
        tally = drain(dsn, ALL, schema=schema)
        if n < 2:
            # re-await consumed nothing and did not spin: one wake per signal
            assert tally.await_ == 1 and tally.next == 0
            assert len(_inbox(db, schema, iid)) == n + 1
    inst = client.get(iid)
    assert inst.status == "done"
    assert inst.result == {"wakes": 3, "left": []}


def test_progress_consumes_only_handed_ids_latecomers_survive(dsn, schema, client, db):
    iid = client.insert(Pack, {"want": 1})
    drain(dsn, ALL, schema=schema)
    client.signal(iid, "item", {"n": 1})

    # claim the woken row, then let a latecomer arrive before its Next is flushed
    async def go():
        engine = Engine(Registry(ALL), schema=schema)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            rows = await engine.claim(conn, "pay", 10)
            assert [r.id for r in rows] == [iid]
            client.signal(iid, "item", {"n": 2})  # arrives after the pick
            await engine.flush(conn, [await engine.run(r) for r in rows])

    asyncio.run(go())
    assert [p["n"] for _, p in _inbox(db, schema, iid)] == [2]
    assert client.get(iid).step == "finish"


def test_retry_keeps_the_awaited_inputs(dsn, schema, client):
    iid = client.insert(RetryOnce)
    drain(dsn, ALL, schema=schema)
    client.signal(iid, "go")
    tally = drain(dsn, ALL, schema=schema)
    assert tally.retry == 1
    assert_done(client, iid, {"attempt": 1, "awaited": ["go"]})
