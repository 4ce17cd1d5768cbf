"""Spawn and the join barrier."""

from __future__ import annotations

import asyncio
import datetime as dt

import psycopg

from pgdurable.contract.fsm import Registry
from pgdurable.db.queries import for_schema
from pgdurable.engine import Engine
from pgdurable.runtime.sweeps.gc import gc
from pgdurable.testing import assert_done, assert_status, drain

from .coord_machines import GrandParent, Leaf, Parent
from .trace import traced

ALL = [Parent, Leaf, GrandParent]


def test_spawn_joins_all_children_and_parent_sees_them(dsn, schema, client):
    iid = client.insert(Parent, {"values": [1, 2, 3]})
    tally = drain(dsn, ALL, schema=schema)
    assert tally.spawn == 1
    assert_done(
        client,
        iid,
        {
            "statuses": ["done", "done", "done"],
            "results": [{"double": 2}, {"double": 4}, {"double": 6}],
            "errors": [None, None, None],
        },
    )


def test_failed_child_releases_the_join(dsn, schema, client):
    iid = client.insert(Parent, {"values": [1, 2], "fail": [2]})
    drain(dsn, ALL, schema=schema)
    res = assert_done(client, iid).result
    assert res["statuses"] == ["done", "failed"]
    assert res["errors"] == [None, "leaf 2 failed"]


def test_children_by_name_and_on_their_own_queue(dsn, schema, client, db):
    iid = client.insert(Parent, {"values": [5], "by_name": True})
    drain(dsn, ALL, schema=schema, queues=["parents"])  # only the parent's queue
    assert_status(client, iid, "awaiting_children")
    (queue,) = db.execute(f'SELECT queue FROM "{schema}".instances WHERE parent_id = %s', [iid]).fetchone()
    assert queue == "kids"
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid)


def test_zero_children_proceeds_at_once(dsn, schema, client):
    iid = client.insert(Parent, {"values": []})
    tally = drain(dsn, ALL, schema=schema)
    assert tally.spawn == 1 and tally.done == 1
    assert_done(client, iid, {"statuses": [], "results": [], "errors": []})


def test_nesting(dsn, schema, client):
    iid = client.insert(GrandParent)
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid, [[{"double": 2}, {"double": 4}], [{"double": 6}]])


def test_siblings_finishing_in_one_flush_decrement_the_parent_once(dsn, schema, client, db):
    iid = client.insert(Parent, {"values": [1, 2, 3, 4]})
    drain(dsn, ALL, schema=schema, queues=["parents"])
    assert client.get(iid).children_pending == 4

    async def go():
        engine = Engine(Registry(ALL), schema=schema)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            rows = await engine.claim(conn, "kids", 10)
            results = [await engine.run(r) for r in rows]
            with traced(conn) as t:
                report = await engine.flush(conn, results)
            return rows, report, t

    rows, report, t = asyncio.run(go())
    assert len(rows) == 4 and report.woken_parents == {iid}
    joins = [ln for ln in t.sql() if "instance_join_parents" in ln or "children_pending - d.n" in ln]
    assert len(joins) == 1  # one aggregated decrement statement
    inst = client.get(iid)
    assert inst.status == "runnable" and inst.children_pending == 0


def test_gc_spares_terminal_children_of_a_live_parent(dsn, schema, client, db):
    iid = client.insert(Parent, {"values": [1, 2]})
    drain(dsn, ALL, schema=schema, queues=["parents"])  # spawn
    drain(dsn, ALL, schema=schema, queues=["kids"])  # the children finish, the parent wakes
    assert_status(client, iid, "runnable")  # joined, not yet run
    db.execute(f"UPDATE \"{schema}\".instances SET updated_at = now() - interval '2 days'")

    def collect():
        return gc(db, for_schema(schema), retention=dt.timedelta(days=1))

    assert collect() == 0  # the children wait for their live parent
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid)
    db.execute(f"UPDATE \"{schema}\".instances SET updated_at = now() - interval '2 days'")
    assert collect() == 3


def test_spawn_consumes_the_signals_its_step_was_handed(dsn, schema, client, db):
    from pgdurable import FSM, Await, Child, Done, Spawn, step

    class Starter(FSM, name="starter", queue="parents"):
        @step(initial=True)
        def wait(self, ctx):
            return Await("go", then=self.fan)

        @step
        def fan(self, ctx):
            return Spawn([Child(Leaf, {"value": len(ctx.awaited)})], then=self.end)

        @step
        def end(self, ctx):
            return Done([c.result for c in ctx.children])

    iid = client.insert(Starter)
    drain(dsn, [Starter, Leaf], schema=schema)
    client.signal(iid, "go", {})
    drain(dsn, [Starter, Leaf], schema=schema, queues=["parents"])  # spawns, consuming "go"
    assert db.execute(f'SELECT count(*) FROM "{schema}".signals').fetchone()[0] == 0
    drain(dsn, [Starter, Leaf], schema=schema)
    assert_done(client, iid, [{"double": 2}])
