"""The hot path's cost is asserted by what the connection really sends (libpq trace)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import msgspec
import psycopg
import pytest

from pgdurable import Insert
from pgdurable.contract.fsm import Registry
from pgdurable.engine import Engine
from pgdurable.engine.commit import _plain_params

from .machines import Counter, EmailArgs, send_email
from .trace import traced


def _claim_and_flush(dsn, schema, machines, queue, n, warm=False, history_off=()):
    """Claim and flush a batch, tracing both. ``warm``: first claim and flush one row, so
    the traced batch runs on already-prepared statements (one round trip each)."""

    async def go():
        engine = Engine(Registry(machines), schema=schema, history_off=history_off)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            if warm:
                first = await engine.claim(conn, queue, 1)
                await engine.flush(conn, [await engine.run(r) for r in first])
            with traced(conn) as pick:
                rows = await engine.claim(conn, queue, n)
            results = [await engine.run(r) for r in rows]
            with traced(conn) as fl:
                report = await engine.flush(conn, results)
            return rows, report, pick, fl

    return asyncio.run(go())


@pytest.mark.parametrize("n", [3, 30])
@pytest.mark.parametrize("history", [True, False], ids=["history", "no-history"])
def test_pick_and_flush_statements_do_not_grow_with_batch(dsn, schema, client, db, n, history):
    client.insert_many([Insert(send_email, EmailArgs(to=f"u{i}")) for i in range(n + 1)])
    off = () if history else ("email",)
    rows, report, pick, fl = _claim_and_flush(
        dsn, schema, [send_email], "email", n, warm=True, history_off=off
    )
    assert len(rows) == n and len(report.committed) == n
    assert pick.statements == 1, pick.sql()  # the claim, nothing else
    assert pick.round_trips == 1
    # one guarded UPDATE with its riders, atomic alone; with history, its rider follows in
    # the same pipeline (one implicit transaction): still one round trip
    assert fl.statements == (2 if history else 1), fl.sql()
    assert fl.round_trips == 1 and fl.exchanges == 1
    (kept,) = db.execute(f'SELECT count(*) FROM "{schema}".history').fetchone()
    assert kept == (n + 1 if history else 0)  # the warm-up row too


@pytest.mark.parametrize("n", [3, 30])
def test_enriched_pick_is_three_statements(dsn, schema, client, db, n):
    """Rows with inboxes and children cost two batched reads more, whatever N."""
    ids = client.insert_many([Insert(Counter, Counter.State()) for _ in range(n)])
    for iid in ids:
        client.signal(iid, "hello", {"i": iid})
        client.insert("counter", {"n": 0}, queue="elsewhere", version=1)
    db.execute(
        f'UPDATE "{schema}".instances SET parent_id = %s WHERE queue = %s AND id = %s',
        [ids[0], "elsewhere", ids[-1] + 1],
    )
    rows, report, pick, _ = _claim_and_flush(dsn, schema, [Counter], "counting", n)
    assert len(rows) == n
    assert pick.statements == 3, pick.sql()
    by_id = {r.id: r for r in rows}
    assert [s.name for s in by_id[ids[0]].inbox] == ["hello"]
    assert [c.id for c in by_id[ids[0]].children] == [ids[-1] + 1]
    assert all(len(by_id[i].inbox) == 1 for i in ids)


def test_empty_pick_is_one_statement(dsn, schema):
    async def go():
        engine = Engine(Registry([send_email]), schema=schema)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            with traced(conn) as t:
                rows = await engine.claim(conn, "email", 10)
            return rows, t

    rows, t = asyncio.run(go())
    assert rows == [] and t.statements == 1


def test_insert_is_one_statement(dsn, schema, client):
    with psycopg.connect(dsn, autocommit=True) as conn, traced(conn) as t:
        client.insert(send_email, {"to": "x"}, conn=conn)
    assert t.statements == 1 and t.round_trips == 1


def test_signal_is_one_statement_stored_or_duplicate(dsn, schema, client):
    """Delivery with a dedup key remembers the key in the same statement; a duplicate is
    the same single statement."""
    iid = client.insert(send_email, {"to": "x"})
    with psycopg.connect(dsn, autocommit=True) as conn:
        with traced(conn) as first:
            assert client.signal(iid, "bounce", {}, dedup_key="evt-1", conn=conn) is not None
        with traced(conn) as again:
            assert client.signal(iid, "bounce", {}, dedup_key="evt-1", conn=conn) is None
    for t in (first, again):
        assert t.statements == 1 and t.round_trips == 1, t.sql()


@pytest.mark.parametrize("n", [3, 30])
def test_flush_with_joins_is_a_fixed_transaction(dsn, schema, client, n):
    """Children finishing: their commit and their parents' join share one transaction."""
    from .coord_machines import Leaf, Parent

    parents = [client.insert(Parent, {"values": [1]}) for _ in range(n)]

    async def go():
        engine = Engine(Registry([Parent, Leaf]), schema=schema)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            spawned = await engine.claim(conn, "parents", n)
            await engine.flush(conn, [await engine.run(r) for r in spawned])
            kids = await engine.claim(conn, "kids", n)
            results = [await engine.run(r) for r in kids]
            with traced(conn) as t:
                report = await engine.flush(conn, results)
            return kids, report, t

    kids, report, t = asyncio.run(go())
    assert len(kids) == n and len(report.committed) == n and len(report.woken_parents) == n
    # BEGIN, commit with riders, the history rider, one aggregated join, COMMIT — for 3 or
    # 30 parents alike
    assert t.statements == 5, t.sql()
    assert all(client.get(p).status == "runnable" for p in parents)


def test_inline_run_ahead_skips_the_re_pick(dsn, schema, client):
    """Next(inline=True) commits each step and runs the next on the claim it holds: a
    5-step machine costs one claim and five one-statement flushes."""
    from pgdurable import FSM, Done, Next, step

    class Steps(FSM, name="steps5", queue="inline"):
        @step(initial=True)
        def s1(self, ctx):
            return Next(self.s2, {"n": ctx.state["n"] + 1}, inline=True)

        @step
        def s2(self, ctx):
            return Next(self.s3, {"n": ctx.state["n"] + 1}, inline=True)

        @step
        def s3(self, ctx):
            return Next(self.s4, {"n": ctx.state["n"] + 1}, inline=True)

        @step
        def s4(self, ctx):
            return Next(self.s5, {"n": ctx.state["n"] + 1}, inline=True)

        @step
        def s5(self, ctx):
            return Done(ctx.state["n"])

    iid = client.insert(Steps, {"n": 0})

    async def go():
        engine = Engine(Registry([Steps]), schema=schema)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            from pgdurable.engine.commit import continued

            with traced(conn) as t:
                rows = await engine.claim(conn, "inline", 10)
                while rows:
                    results = [await engine.run(r) for r in rows]
                    report = await engine.flush(conn, results)
                    rows = [continued(r.row, r) for r in results if r.inline and r.row.id in report.committed]
            return t

    t = asyncio.run(go())
    assert client.get(iid).result == 4
    # no second claim; each flush is its commit and its history rider
    assert t.statements == 1 + 5 * 2, t.sql()


def test_inline_continue_hands_the_next_step_the_state_as_a_claim_reads_it(dsn, schema, client, db):
    """A claim carries the stored state as JSON text; the claim an inline continue hands
    to the next step must carry it the same way (text, not the encoder's bytes), holding
    what the previous step returned and what was committed."""
    from pgdurable import FSM, Done, Next, step
    from pgdurable.engine.commit import continued

    class Carry(FSM, name="carry", queue="carry"):
        @step(initial=True)
        def first(self, ctx):
            return Next(self.second, {"n": ctx.state["n"] + 1, "who": "zoë"}, inline=True)

        @step
        def second(self, ctx):
            return Done(ctx.state)

    iid = client.insert(Carry, {"n": 0})

    async def go():
        engine = Engine(Registry([Carry]), schema=schema)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            (row,) = await engine.claim(conn, "carry", 10)
            result = await engine.run(row)
            report = await engine.flush(conn, [result])
            assert result.inline and report.committed == {iid}
            nxt = continued(row, result)
            cur = await conn.execute(f'SELECT state::text FROM "{schema}".instances WHERE id = %s', [iid])
            (stored,) = await cur.fetchone()
            done = await engine.run(nxt)
            await engine.flush(conn, [done])
            return row, nxt, stored

    row, nxt, stored = asyncio.run(go())
    assert type(row.state) is str and type(nxt.state) is str
    assert msgspec.json.decode(nxt.state) == msgspec.json.decode(stored) == {"n": 1, "who": "zoë"}
    assert (nxt.step, nxt.depth) == ("second", 1)
    assert client.get(iid).result == {"n": 1, "who": "zoë"}


def test_default_scope_in_sql_matches_the_live_statuses():
    """The statements spell the default correlation scope out; it must be LIVE_STATUSES."""
    import re

    from pgdurable.contract.spec import LIVE_STATUSES
    from pgdurable.db.queries import _raw

    literals = {m for body in _raw().values() for m in re.findall(r"'\{(runnable,[a-z_,]+)\}'", body)}
    assert literals == {",".join(LIVE_STATUSES)}


def test_the_table_stores_no_scope_by_default(db, schema):
    """A plain batch (COPY without the scope column) stores what a keyless insert does: no
    scope (tests/test_client.py follows every insert path)."""
    got = db.execute(
        "SELECT column_default, is_nullable FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = 'instances' AND column_name = 'correlation_scope'",
        [schema],
    ).fetchone()
    assert got == (None, "YES")


def test_an_outcome_sends_only_what_differs_from_the_defaults(dsn, schema, client, db):
    """The flush's document leaves out every key at its default (the statement reads an
    absent key as the default): a job's ``Done`` sends its result and six keys, a retry its
    attempt, its error and the flags it sets; the rows land with the defaults they left out."""
    ok, failing = client.insert_many(
        [Insert(send_email, EmailArgs(to="a")), Insert(send_email, EmailArgs(to="b", fail=1))]
    )

    async def go():
        engine = Engine(Registry([send_email]), schema=schema)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            rows = await engine.claim(conn, "email", 2)
            results = [await engine.run(r) for r in rows]
            doc = json.loads(_plain_params("w", results, None, dt.timedelta(seconds=30))["rows"])
            await engine.flush(conn, results)
            return doc

    doc = asyncio.run(go())
    base = {"token", "status", "version", "step", "delay", "weight"}
    assert set(doc[str(ok)]) == base | {"result"}
    # a retry keeps what the row waits on and its rate limit: those flags are true
    assert set(doc[str(failing)]) == base | {"attempt", "error", "traceback", "keep_awaits", "keep_rate"}
    got = db.execute(
        "SELECT id, status, attempt, weight, eligible_at > now(), result, last_error"
        f' FROM "{schema}".instances ORDER BY id'
    ).fetchall()
    assert got[0] == (ok, "done", 0, 1.0, False, {"sent_to": "a", "attempt": 0}, None)
    assert got[1][:5] == (failing, "runnable", 1, 1.0, True) and "smtp down (0)" in got[1][6]
