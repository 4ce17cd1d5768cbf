"""The light client against a real database: every test that takes ``client`` runs against
``Client`` and against ``AsyncClient`` (through the blocking facade of client_facade.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg import sql

from pgdurable import FSM, Done, DuplicateInstance, Insert, Registry, UnknownMachine, step
from pgdurable.client import AsyncClient, Busy, Failed, Instance
from pgdurable.contract.errors import NoTarget
from pgdurable.contract.spec import LIVE_STATUSES
from pgdurable.engine import Engine
from pgdurable.testing import drain

from .client_facade import AsyncSide, SyncSide
from .coord_machines import Leaf, Parent, Payment
from .machines import Boom, Counter
from .parallel_machines import ALL as PARALLEL
from .parallel_machines import Fan
from .trace import traced

REPO = Path(__file__).resolve().parent.parent

#: Instance ids in the order the Recorder machine ran them.
RUN_ORDER: list[int] = []


class Recorder(FSM, name="recorder", queue="rec"):
    @step(initial=True)
    def go(self, ctx):
        RUN_ORDER.append(ctx.id)
        return Done(ctx.id)


class QuickDone(FSM, name="quick_done"):
    @step(initial=True)
    def go(self, ctx):
        return Done("ok")


class VersionedV1(FSM, name="versioned", version=1, queue="vq1"):
    @step(initial=True)
    def first(self, ctx):
        return Done(1)


class VersionedV2(FSM, name="versioned", version=2, queue="vq2"):
    @step
    def other(self, ctx):
        return Done(0)

    @step(initial=True)
    def start(self, ctx):
        return Done(2)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["sync", "async"])
def side(request: pytest.FixtureRequest) -> Iterator[SyncSide | AsyncSide]:
    """Which client the test drives: ``Client``, or ``AsyncClient`` behind the facade."""
    chosen = SyncSide() if request.param == "sync" else AsyncSide()
    try:
        yield chosen
    finally:
        chosen.close()


@pytest.fixture
def client(side: SyncSide | AsyncSide, dsn: str, schema: str) -> Iterator[Any]:
    """This module's client: the side's, on the test's schema (conftest's is sync only)."""
    with side.make_client(dsn, schema=schema) as c:
        yield c


@pytest.fixture
def connect(side: SyncSide | AsyncSide, dsn: str) -> Callable[..., Any]:
    """Open a caller's connection of the kind the client takes for ``conn=``."""
    return lambda **kw: side.connect(dsn, **kw)


# --------------------------------------------------------------------------- helpers


def register(dsn: str, schema: str, machines: list[type[FSM]]) -> None:
    """Publish machines to the schema's machines table, as a worker does at start."""

    async def go() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await Engine(Registry(machines), schema=schema).register(conn)

    asyncio.run(go())


def count(db: psycopg.Connection[Any], schema: str) -> int:
    row = db.execute(f'SELECT count(*) FROM "{schema}".instances').fetchone()
    assert row is not None
    return int(row[0])


def must_get(client: Any, iid: int) -> Instance:
    inst = client.get(iid)
    assert inst is not None, f"instance {iid} missing"
    return inst


#: Client pointing at a port nobody listens on: any call that touches the database fails
#: (after the pool timeout), so a prompt ValueError proves validation ran first.
UNREACHABLE = "postgresql://nobody@127.0.0.1:1/nothing?connect_timeout=1"


# --------------------------------------------------------------------------- 1. insert


def test_insert_by_class_stores_machine_facts(client):
    iid = client.insert(Counter, Counter.State(n=1, limit=5))
    inst = must_get(client, iid)
    assert inst.fsm == "counter"
    assert inst.version == 1
    assert inst.step == "bump"
    assert inst.queue == "counting"
    assert inst.status == "runnable"
    assert inst.state == {"n": 1, "limit": 5}


def test_insert_by_name_resolves_registered_machine(dsn, schema, client):
    drain(dsn, [Counter], schema=schema)  # nothing to run: only registers the machine
    iid = client.insert("counter", {"n": 2})
    inst = must_get(client, iid)
    assert (inst.fsm, inst.version, inst.step, inst.queue) == ("counter", 1, "bump", "counting")
    assert inst.state == {"n": 2}


def test_insert_by_name_picks_newest_version_or_the_one_asked(dsn, schema, client):
    register(dsn, schema, [VersionedV1, VersionedV2])
    newest = must_get(client, client.insert("versioned"))
    assert (newest.version, newest.step, newest.queue) == (2, "start", "vq2")
    pinned = must_get(client, client.insert("versioned", version=1))
    assert (pinned.version, pinned.step, pinned.queue) == (1, "first", "vq1")
    # an explicit queue overrides, version and step still come from the registry
    routed = must_get(client, client.insert("versioned", queue="elsewhere"))
    assert (routed.version, routed.step, routed.queue) == (2, "start", "elsewhere")


def test_insert_by_name_with_queue_for_unregistered_machine(client):
    iid = client.insert("ghost", {"x": 1}, queue="ghostq")
    inst = must_get(client, iid)
    assert inst.fsm == "ghost"
    assert inst.queue == "ghostq"
    # left for the first worker that knows the machine to pin
    assert inst.version is None and inst.step is None
    assert inst.state == {"x": 1}


def test_insert_by_name_without_queue_for_unregistered_machine_raises(client, db, schema):
    with pytest.raises(UnknownMachine, match="ghost"):
        client.insert("ghost", {"x": 1})
    with pytest.raises(UnknownMachine, match="ghost"):
        client.insert_many([Insert("ghost"), Insert("ghost2", queue="q")])
    assert count(db, schema) == 0


# --------------------------------------------------------------------------- 2. insert_many


@pytest.mark.parametrize("n", [4, 400])
def test_insert_many_is_one_copy(connect, schema, client, db, n):
    """The statement that draws ids, the COPY, the notification: whatever the batch size."""
    specs = [Insert(Counter, Counter.State(n=i), correlation_key=f"k{n - i}") for i in range(n)]
    with connect(autocommit=True) as conn:
        client.insert_many(specs[:1], conn=conn)  # warm: type lookups of a first use
        with traced(conn) as trace:
            ids = client.insert_many(specs[1:], conn=conn)
    assert trace.statements == 3, trace.sql()
    assert trace.round_trips == 3
    assert sum("FROM STDIN" in ln for ln in trace.sql()) == 1
    assert not any("INSERT INTO" in ln for ln in trace.sql())
    assert len(ids) == n - 1 and len(set(ids)) == n - 1
    assert count(db, schema) == n


def test_insert_many_by_name_looks_machines_up_once(connect, schema, client, db):
    db.execute(
        f'INSERT INTO "{schema}".machines (name, version, initial_step, queue, steps)'
        " VALUES ('named', 1, 'a', 'q1', '{a}'), ('named', 2, 'b', 'q2', '{b}'),"
        " ('other', 1, 'x', 'q3', '{x}')"
    )
    specs = [Insert("named", {"i": 1}), Insert("named", {"i": 2}, version=1), Insert("other")]
    specs += [Insert("named", {"i": 3}, queue="elsewhere"), Insert("unknown", queue="q4")]
    with connect(autocommit=True) as conn, traced(conn) as trace:
        ids = client.insert_many(specs, conn=conn)
    assert trace.statements == 4, trace.sql()  # one lookup for all the names
    got = [must_get(client, i) for i in ids]
    assert [(g.version, g.step, g.queue) for g in got] == [
        (2, "b", "q2"),  # the newest version
        (1, "a", "q1"),  # the version asked for
        (1, "x", "q3"),
        (2, "b", "elsewhere"),  # a queue given wins
        (None, None, "q4"),  # unknown but routed: pinned by the first worker that knows it
    ]


def test_insert_many_ids_in_input_order(client):
    # keys in no particular order, with None keys in between; "B" < "a" in "C" collation but
    # not in most linguistic collations, and non-ASCII keys sort by code point
    keys = ["b", None, "a", "B", None, "é", "A", "\U0001f600", "z", None]
    specs = [Insert("batchy", {"i": i}, queue="q", correlation_key=k) for i, k in enumerate(keys)]
    ids = client.insert_many(specs)
    assert len(ids) == len(keys) and len(set(ids)) == len(keys)
    for i, iid in enumerate(ids):
        inst = must_get(client, iid)
        assert inst.state == {"i": i}
        assert inst.correlation_key == keys[i]
    # rows were inserted in key order (so the id order differs from the input order and the
    # mapping back to input positions is really exercised)
    by_id = sorted(range(len(keys)), key=lambda i: ids[i])
    expected = sorted(range(len(keys)), key=lambda i: (keys[i] is None, (keys[i] or "").encode(), i))
    assert by_id == expected
    assert by_id != list(range(len(keys)))


def test_insert_many_empty(client):
    assert client.insert_many([]) == []


def test_insert_many_by_name_resolves_registered(dsn, schema, client):
    drain(dsn, [Counter], schema=schema)
    ids = client.insert_many([Insert("counter", {"n": 1}), Insert("nobody", queue="nq")])
    first, second = must_get(client, ids[0]), must_get(client, ids[1])
    assert (first.version, first.step, first.queue) == (1, "bump", "counting")
    assert (second.version, second.step, second.queue) == (None, None, "nq")


def test_insert_many_key_occupied_by_earlier_insert(client, db, schema):
    client.insert("batchy", queue="q", correlation_key="taken")
    before = count(db, schema)
    specs = [
        Insert("batchy", queue="q", correlation_key="free-1"),
        Insert("batchy", queue="q", correlation_key="taken"),
        Insert("batchy", queue="q"),
    ]
    with pytest.raises(DuplicateInstance) as info:
        client.insert_many(specs)
    assert info.value.keys == ["taken"]
    assert "taken" in str(info.value)
    assert count(db, schema) == before
    # the free key was not taken by the refused batch
    client.insert("batchy", queue="q", correlation_key="free-1")


def test_insert_many_key_duplicated_within_batch(client, db, schema):
    specs = [
        Insert("batchy", queue="q", correlation_key="x"),
        Insert("batchy", queue="q", correlation_key="dup"),
        Insert("batchy", queue="q"),
        Insert("batchy", queue="q", correlation_key="dup"),
    ]
    with pytest.raises(DuplicateInstance) as info:
        client.insert_many(specs)
    assert info.value.key == "dup"
    assert count(db, schema) == 0


def test_insert_many_refused_leaves_callers_transaction_usable(connect, schema, client, db):
    client.insert("batchy", queue="q", correlation_key="taken")
    with connect() as conn:
        mine = client.insert("batchy", queue="q", correlation_key="mine", conn=conn)
        with pytest.raises(DuplicateInstance):
            client.insert_many([Insert("batchy", queue="q", correlation_key="taken")], conn=conn)
        after = client.insert_many([Insert("batchy", queue="q", correlation_key="after")], conn=conn)
        conn.commit()
    assert must_get(client, mine).correlation_key == "mine"
    assert must_get(client, after[0]).correlation_key == "after"
    assert count(db, schema) == 3


@pytest.mark.parametrize("autocommit", [False, True], ids=["idle-txn", "autocommit"])
def test_insert_many_refused_as_first_statement_leaves_connection_usable(
    connect, schema, client, db, autocommit
):
    client.insert("batchy", queue="q", correlation_key="taken")
    with connect(autocommit=autocommit) as conn:
        with pytest.raises(DuplicateInstance):
            client.insert_many(
                [
                    Insert("batchy", queue="q", correlation_key="x"),
                    Insert("batchy", queue="q", correlation_key="taken"),
                ],
                conn=conn,
            )
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        [after] = client.insert_many([Insert("batchy", queue="q", correlation_key="x")], conn=conn)
        if not autocommit:
            conn.commit()
    assert must_get(client, after).correlation_key == "x"
    assert count(db, schema) == 2


# --------------------------------------------------------------------------- 3. duplicate


def test_insert_duplicate_key_raises(client, db, schema):
    first = client.insert("batchy", queue="q", correlation_key="order-1")
    with pytest.raises(DuplicateInstance) as info:
        client.insert("batchy", queue="q", correlation_key="order-1")
    assert info.value.key == "order-1"
    assert info.value.keys == ["order-1"]
    assert count(db, schema) == 1
    assert must_get(client, first).correlation_key == "order-1"


def test_insert_duplicate_in_callers_transaction_keeps_it_usable(connect, schema, client, db):
    client.insert("batchy", queue="q", correlation_key="order-1")
    with connect() as conn:
        conn.execute(f'CREATE TABLE "{schema}".side (x int)')
        before = client.insert("batchy", queue="q", correlation_key="before", conn=conn)
        with pytest.raises(DuplicateInstance):
            client.insert("batchy", queue="q", correlation_key="order-1", conn=conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.execute(f'INSERT INTO "{schema}".side VALUES (1)')
        after = client.insert("batchy", queue="q", correlation_key="after", conn=conn)
        conn.commit()
    assert must_get(client, before).status == "runnable"
    assert must_get(client, after).status == "runnable"
    assert db.execute(f'SELECT x FROM "{schema}".side').fetchall() == [(1,)]


# --------------------------------------------------------------------------- 4. scope


def test_default_scope_frees_key_once_done(dsn, schema, client):
    first = client.insert(QuickDone, correlation_key="k")
    with pytest.raises(DuplicateInstance):
        client.insert(QuickDone, correlation_key="k")
    drain(dsn, [QuickDone], schema=schema)
    assert must_get(client, first).status == "done"
    second = client.insert(QuickDone, correlation_key="k")
    assert second != first
    # and in a batch too
    drain(dsn, [QuickDone], schema=schema)
    assert len(client.insert_many([Insert(QuickDone, correlation_key="k")])) == 1


def test_scope_with_done_keeps_key_reserved(dsn, schema, client):
    scope = [*LIVE_STATUSES, "done"]
    first = client.insert(QuickDone, correlation_key="once", correlation_scope=scope)
    drain(dsn, [QuickDone], schema=schema)
    assert must_get(client, first).status == "done"
    with pytest.raises(DuplicateInstance):
        client.insert(QuickDone, correlation_key="once")
    with pytest.raises(DuplicateInstance):
        client.insert_many([Insert(QuickDone, correlation_key="once")])


def test_empty_scope_means_no_dedup(client):
    a = client.insert("batchy", queue="q", correlation_key="same", correlation_scope=[])
    b = client.insert("batchy", queue="q", correlation_key="same", correlation_scope=[])
    c, d = client.insert_many([Insert("batchy", queue="q", correlation_key="same", correlation_scope=[])] * 2)
    assert len({a, b, c, d}) == 4
    assert all(must_get(client, i).correlation_key == "same" for i in (a, b, c, d))


def test_only_a_keyed_row_stores_a_scope(dsn, schema, client, db):
    """A keyless row stores no scope (migration 14: 101 bytes of a plain job's 240, in every
    version the job writes), through every insert path; a keyed row stores its scope, the
    live statuses by default; a keyed row without one is refused, not silently unguarded."""
    live = list(LIVE_STATUSES)
    ids = {
        "insert": client.insert(QuickDone),
        "insert keyed": client.insert(QuickDone, correlation_key="one"),
        "insert keyed, empty scope": client.insert(QuickDone, correlation_key="none", correlation_scope=[]),
    }
    plain = client.insert_many([Insert(QuickDone)] * 2)  # the short COPY: no scope column
    mixed = client.insert_many(
        [Insert(QuickDone, priority=1), Insert(QuickDone, priority=1, correlation_key="two")]
    )
    ids |= {"plain batch": plain[0], "full batch": mixed[0], "full batch keyed": mixed[1]}
    fan = client.insert(Fan, {"children": [["square", {"n": 2}]]})
    plain_fan = client.insert("parent", {"values": [1]}, queue="parents")
    drain(dsn, PARALLEL, schema=schema, queues=["par"])
    drain(dsn, [Parent, Leaf], schema=schema, queues=["parents"])

    def scope(iid: int) -> list[str] | None:
        return db.execute(
            f'SELECT correlation_scope FROM "{schema}".instances WHERE id = %s', [iid]
        ).fetchone()[0]

    def child_scope(parent: int) -> list[str] | None:
        q = f'SELECT correlation_scope FROM "{schema}".instances WHERE parent_id = %s'
        return db.execute(q, [parent]).fetchone()[0]

    got = {name: scope(iid) for name, iid in ids.items()}
    got |= {"keyed child": child_scope(fan), "child": child_scope(plain_fan)}
    assert got == {
        "insert": None,
        "insert keyed": live,
        "insert keyed, empty scope": [],
        "plain batch": None,
        "full batch": None,
        "full batch keyed": live,
        "keyed child": live,
        "child": None,
    }
    with pytest.raises(psycopg.errors.CheckViolation, match="instances_correlation_scope_check"):
        db.execute(
            f'INSERT INTO "{schema}".instances (fsm, queue, correlation_key) VALUES (%s, %s, %s)',
            ["quick_done", "q", "bare"],
        )


@pytest.mark.parametrize(
    "scope",
    [["done"], ["runnable"], ["runnable", "executing", "done"], [s for s in LIVE_STATUSES if s != "held"]],
    ids=["done-only", "runnable-only", "partial-live", "all-live-but-held"],
)
def test_scope_must_cover_every_live_status(dsn, schema, client, db, scope):
    """A scope that starts counting after the insert would let two rows share a key until
    both enter it, and that transition could then never commit (it used to wedge the
    flush with a UniqueViolation, leaving rows stuck 'executing'): refused up front."""
    with pytest.raises(ValueError, match="correlation_scope"):
        client.insert(QuickDone, correlation_key="k", correlation_scope=scope)
    with pytest.raises(ValueError, match="correlation_scope"):
        client.insert_many([Insert(QuickDone, correlation_key="k", correlation_scope=scope)])
    assert count(db, schema) == 0


def test_scope_of_live_and_terminal_statuses_flushes_cleanly(dsn, schema, client):
    """The regression behind the rule above: with a valid scope the second insert is refused
    and draining never trips over the correlation index."""
    scope = [*LIVE_STATUSES, "done"]
    first = client.insert(QuickDone, correlation_key="k", correlation_scope=scope)
    with pytest.raises(DuplicateInstance):
        client.insert(QuickDone, correlation_key="k", correlation_scope=scope)
    other = client.insert(QuickDone, correlation_key="other", correlation_scope=scope)
    tally = drain(dsn, [QuickDone], schema=schema)
    assert tally.done == 2
    assert [must_get(client, i).status for i in (first, other)] == ["done", "done"]


# --------------------------------------------------------------------------- 5. transactions


def _in_transaction(connect: Callable[..., Any], style: str, commit: bool, work: Callable[[Any], Any]) -> Any:
    """Run ``work(conn)`` inside a caller's transaction, then commit or roll it back.

    block: an explicit ``conn.transaction()`` on an autocommit connection;
    implicit: a non-autocommit connection that already ran other work;
    first: a non-autocommit connection where ``work`` is the first statement.
    """
    if style == "block":
        with connect(autocommit=True) as conn:
            out = None
            with conn.transaction():
                out = work(conn)
                if not commit:
                    raise psycopg.Rollback()
            return out
    with connect() as conn:
        if style == "implicit":
            conn.execute("SELECT 1")
        out = work(conn)
        # the caller's transaction is still the caller's to end
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.commit() if commit else conn.rollback()
        return out


STYLES = ["block", "implicit", "first"]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_transactional_insert(connect, schema, client, db, style, commit):
    iid = _in_transaction(connect, style, commit, lambda c: client.insert("batchy", queue="q", conn=c))
    assert (client.get(iid) is not None) is commit
    assert count(db, schema) == (1 if commit else 0)


@pytest.mark.parametrize("style", STYLES)
def test_transactional_insert_many_rollback(connect, schema, client, db, style):
    specs = [Insert("batchy", {"i": i}, queue="q") for i in range(3)]
    ids = _in_transaction(connect, style, False, lambda c: client.insert_many(specs, conn=c))
    assert len(ids) == 3
    assert count(db, schema) == 0
    assert all(client.get(i) is None for i in ids)


@pytest.mark.parametrize("style", STYLES)
def test_transactional_insert_many_commit(connect, schema, client, db, style):
    specs = [Insert("batchy", {"i": i}, queue="q") for i in range(3)]
    ids = _in_transaction(connect, style, True, lambda c: client.insert_many(specs, conn=c))
    assert [must_get(client, i).state for i in ids] == [{"i": 0}, {"i": 1}, {"i": 2}]


# --------------------------------------------------------------------------- 6. get


def test_get_returns_snapshot(client):
    before = dt.datetime.now(dt.UTC)
    iid = client.insert(
        Counter,
        {"n": 1},
        correlation_key="ck",
        priority=4,
        concurrency_key=("tenant", 7),
        rate_limit="api",
        weight=2.5,
    )
    inst = must_get(client, iid)
    assert isinstance(inst, Instance)
    assert inst.id == iid
    assert inst.fsm == "counter" and inst.version == 1 and inst.step == "bump"
    assert inst.status == "runnable"
    assert inst.queue == "counting"
    assert inst.priority == 4
    assert inst.attempt == 0 and inst.crashes == 0
    assert inst.state == {"n": 1, "limit": 3}  # decoded JSON, defaults filled by the State
    assert isinstance(inst.state, dict)
    assert inst.result is None and inst.last_error is None
    assert inst.awaits is None and inst.await_deadline is None
    assert inst.parent_id is None and inst.children_pending == 0
    assert inst.correlation_key == "ck"
    assert inst.concurrency_key == "tenant:7"
    assert inst.rate_limit == "api"
    assert inst.weight == 2.5
    assert inst.eligible_at.tzinfo is not None
    slack = dt.timedelta(seconds=5)
    assert before - slack <= inst.inserted_at <= dt.datetime.now(dt.UTC) + slack
    assert inst.eligible_at <= dt.datetime.now(dt.UTC) + slack


def test_get_decodes_result_after_done(dsn, schema, client):
    iid = client.insert(Counter, Counter.State(limit=2))
    drain(dsn, [Counter], schema=schema)
    inst = must_get(client, iid)
    assert inst.status == "done"
    assert inst.result == {"n": 2}
    assert inst.state == {"n": 2, "limit": 2}


def test_get_missing_is_none(client):
    assert client.get(987654321) is None


def test_get_with_conn_sees_uncommitted_insert(connect, client):
    with connect() as conn:
        iid = client.insert("batchy", queue="q", conn=conn)
        inside = client.get(iid, conn=conn)
        assert inside is not None and inside.id == iid
        assert client.get(iid) is None  # another connection does not see it yet
        conn.rollback()


# --------------------------------------------------------------------------- 7. wait


def test_wait_done(dsn, schema, client):
    iid = client.insert(Counter, Counter.State(limit=1))
    drain(dsn, [Counter], schema=schema)
    assert client.wait(iid, timeout=1) == Done({"n": 1})


def test_wait_failed(dsn, schema, client):
    iid = client.insert(Boom)
    drain(dsn, [Boom], schema=schema)
    res = client.wait(iid, timeout=1)
    assert isinstance(res, Failed)
    assert res.status == "failed"
    assert res.error is not None and "kaboom" in res.error


def test_wait_busy_after_timeout(client):
    iid = client.insert(Counter)
    start = time.monotonic()
    res = client.wait(iid, timeout=0.5)
    elapsed = time.monotonic() - start
    assert isinstance(res, Busy)
    assert res.instance.id == iid and res.instance.status == "runnable"
    assert 0.45 <= elapsed < 5


def test_wait_sees_background_completion(dsn, schema, client):
    iid = client.insert(Counter, Counter.State(limit=2))
    errors: list[BaseException] = []

    def later() -> None:
        try:
            time.sleep(0.3)
            drain(dsn, [Counter], schema=schema)
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)

    t = threading.Thread(target=later)
    start = time.monotonic()
    t.start()
    try:
        res = client.wait(iid, timeout=10)
    finally:
        t.join()
    elapsed = time.monotonic() - start
    assert not errors
    assert res == Done({"n": 2})
    assert 0.25 <= elapsed < 9


def test_wait_missing_raises(client):
    with pytest.raises(NoTarget):
        client.wait(987654321, timeout=0.1)


# --------------------------------------------------------------------------- 8. AsyncClient


def test_async_client_roundtrip(dsn, schema):
    """The coroutine API as an asyncio program uses it (the other tests go through the facade)."""

    async def main() -> None:
        async with AsyncClient(dsn, schema=schema) as ac:
            one = await ac.insert(Counter, Counter.State(limit=1), correlation_key="a1")
            many = await ac.insert_many(
                [
                    Insert(Counter, {"limit": 2}, correlation_key="z"),
                    Insert(Boom),
                    Insert(Counter, {"limit": 0}, correlation_key="m"),
                ]
            )
            got = await ac.get(one)
            assert got is not None
            assert (got.fsm, got.step, got.queue, got.status) == (
                "counter",
                "bump",
                "counting",
                "runnable",
            )
            assert got.state == {"n": 0, "limit": 1}
            assert [(await ac.get(i)).state for i in many] == [  # type: ignore[union-attr]
                {"n": 0, "limit": 2},
                {},
                {"n": 0, "limit": 0},
            ]
            assert await ac.get(987654321) is None
            with pytest.raises(DuplicateInstance) as info:
                await ac.insert(Counter, correlation_key="a1")
            assert info.value.key == "a1"
            with pytest.raises(DuplicateInstance):
                await ac.insert_many([Insert(Counter, correlation_key="z")])
            with pytest.raises(UnknownMachine):
                await ac.insert("ghost")

            start = asyncio.get_running_loop().time()
            busy = await ac.wait(one, timeout=0.3)
            assert isinstance(busy, Busy) and busy.instance.id == one
            assert asyncio.get_running_loop().time() - start >= 0.25

            async def later() -> None:
                await asyncio.sleep(0.2)
                await asyncio.to_thread(drain, dsn, [Counter, Boom], schema=schema)

            task = asyncio.create_task(later())
            assert await ac.wait(one, timeout=10) == Done({"n": 1})
            await task
            assert await ac.wait(many[0], timeout=1) == Done({"n": 2})
            failed = await ac.wait(many[1], timeout=1)
            assert isinstance(failed, Failed) and "kaboom" in (failed.error or "")
            assert await ac.wait(many[2], timeout=1) == Done({"n": 0})
            with pytest.raises(NoTarget):
                await ac.wait(987654321, timeout=0.1)

    asyncio.run(main())


# --------------------------------------------------------------------------- 9. light import


def test_client_import_is_light():
    forbidden = [
        "uvloop",
        "pgdurable.contract.fsm",
        "pgdurable.engine",
        "pgdurable.runtime",
        "pgdurable.engine.pipeline",
        "pgdurable.engine.executor",
        "pgdurable.engine.outcome",
        "pgdurable.engine.commit",
        "pgdurable.engine.claim",
        "pgdurable.testing",
    ]
    code = (
        "import json, sys\n"
        "import pgdurable.client\n"
        f"print(json.dumps([m for m in {forbidden!r} if m in sys.modules]))\n"
        "print(json.dumps('pgdurable.client' in sys.modules and 'psycopg' in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded, sane = proc.stdout.splitlines()
    assert json.loads(sane) is True
    assert json.loads(loaded) == []


# --------------------------------------------------------------------------- 10. validation


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {
                "schedule_in": 5,
                "schedule_at": dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
            },
            "not both",
        ),
        ({"schedule_at": dt.datetime(2030, 1, 1)}, "timezone-aware"),
        ({"weight": 0}, "weight"),
        ({"weight": -1.5}, "weight"),
        ({"correlation_scope": ["runnable", "finished"]}, "finished"),
        ({"priority": 40000}, "smallint"),
    ],
    ids=["both-schedules", "naive-at", "zero-weight", "negative-weight", "bad-scope", "prio"],
)
def test_insert_validation_errors(side, options, message):
    with side.make_client(UNREACHABLE, schema="nowhere") as c:
        start = time.monotonic()
        with pytest.raises(ValueError, match=message):
            c.insert("batchy", queue="q", **options)
        with pytest.raises(ValueError, match=message):
            c.insert_many([Insert("batchy", queue="q"), Insert("batchy", queue="q", **options)])
        assert time.monotonic() - start < 2  # never waited for a connection
        assert c._pool is None  # and never even opened a pool


def test_state_type_validated_before_touching_db(side):
    with side.make_client(UNREACHABLE, schema="nowhere") as c:
        start = time.monotonic()
        with pytest.raises(msgspec.ValidationError):
            c.insert(Counter, {"n": "not a number"})
        with pytest.raises(msgspec.ValidationError):
            c.insert_many([Insert(Counter, {"n": 1}), Insert(Counter, {"limit": [1]})])
        with pytest.raises(TypeError):
            c.insert(42)
        assert time.monotonic() - start < 2
        assert c._pool is None


def test_state_type_validated_and_stored(client, db, schema):
    with pytest.raises(msgspec.ValidationError):
        client.insert(Counter, {"n": "not a number"})
    assert count(db, schema) == 0
    iid = client.insert(Counter, {"n": 2})
    assert must_get(client, iid).state == {"n": 2, "limit": 3}


# --------------------------------------------------------------------------- 11. scheduling


def test_schedule_and_priority_are_stored(client):
    now = dt.datetime.now(dt.UTC)
    at = (now + dt.timedelta(days=1)).replace(microsecond=123456)
    a = must_get(client, client.insert("batchy", queue="q", schedule_in=3600, priority=-5))
    b = must_get(client, client.insert("batchy", queue="q", schedule_at=at, priority=7))
    c = must_get(client, client.insert("batchy", queue="q", schedule_in=dt.timedelta(minutes=10)))
    assert a.priority == -5 and b.priority == 7 and c.priority == 0
    assert now + dt.timedelta(minutes=59) < a.eligible_at < now + dt.timedelta(minutes=61)
    assert b.eligible_at == at
    assert now + dt.timedelta(minutes=9) < c.eligible_at < now + dt.timedelta(minutes=11)
    [d] = client.insert_many([Insert("batchy", queue="q", schedule_at=at, priority=-3)])
    many = must_get(client, d)
    assert many.eligible_at == at and many.priority == -3


def test_future_work_waits_unless_time_collapses(dsn, schema, client):
    later = client.insert(QuickDone, schedule_in=3600)
    at = client.insert(QuickDone, schedule_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    now = client.insert(QuickDone)
    tally = drain(dsn, [QuickDone], schema=schema, collapse_time=False)
    assert tally.done == 1
    assert must_get(client, now).status == "done"
    assert must_get(client, later).status == "runnable"
    assert must_get(client, at).status == "runnable"
    tally = drain(dsn, [QuickDone], schema=schema)
    assert tally.done == 2
    assert must_get(client, later).status == "done"
    assert must_get(client, at).status == "done"


def test_lower_priority_value_runs_first(dsn, schema, client):
    RUN_ORDER.clear()
    priorities = [3, -2, 7, 0, -9, 5]
    ids = [client.insert(Recorder, priority=p) for p in priorities]
    ids += client.insert_many([Insert(Recorder, priority=p) for p in (1, -4)])
    priorities += [1, -4]
    drain(dsn, [Recorder], schema=schema, batch=1)
    expected = [iid for _, iid in sorted(zip(priorities, ids, strict=True))]
    assert expected == RUN_ORDER
    assert ids != RUN_ORDER


def test_equal_priority_runs_in_eligible_order(dsn, schema, client):
    RUN_ORDER.clear()
    base = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    offsets = [5, 1, 9, 3]
    ids = [client.insert(Recorder, schedule_at=base + dt.timedelta(seconds=o)) for o in offsets]
    drain(dsn, [Recorder], schema=schema, batch=1, collapse_time=False)
    assert [iid for _, iid in sorted(zip(offsets, ids, strict=True))] == RUN_ORDER


def test_insert_many_rows_equal_single_inserts(client, db, schema):
    """The COPY stream carries every option and any text exactly as ``insert`` stores it."""
    nasty = 'tab\there, newline\nthere, cr\r, back\\slash, \\N, quote", é, \U0001f600'
    at = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
    variants: list[dict[str, Any]] = [
        {},
        {"priority": -7, "schedule_in": 12.5},
        {"schedule_at": at, "weight": 0.25},
        {"correlation_key": "key " + nasty, "correlation_scope": []},
        {"correlation_key": "\\N", "correlation_scope": [*LIVE_STATUSES, "done"]},
        {"concurrency_key": ("tenant", nasty), "rate_limit": ("api", 3)},
        {"queue": "q " + nasty, "version": 4, "step": "s\t1"},
    ]
    state = {"text": nasty, "nested": {"list": [1, 2.5, None, True]}, "esc": "\\u0041\\"}
    one = [client.insert("copied", state, **{"queue": "q", **v}) for v in variants]
    # free the keys (cancelled is in neither scope) so the batch can take them again
    db.execute(f'UPDATE "{schema}".instances SET status = %s', ["cancelled"])
    before = db.execute("SELECT now()").fetchone()[0]
    many = client.insert_many([Insert("copied", state, **{"queue": "q", **v}) for v in variants])
    cols = (
        "fsm, version, step, state, queue, priority, correlation_key, correlation_scope, "
        "concurrency_key, split_part(concurrency_key, ':', 1), rate_limit, weight, "
        "eligible_at - inserted_at, "
        "CASE WHEN status = ANY (correlation_scope) THEN correlation_key END, status, eligible_at"
    )

    def row(iid: int) -> tuple[Any, ...]:
        got = db.execute(f'SELECT {cols} FROM "{schema}".instances WHERE id = %s', [iid]).fetchone()
        assert got is not None
        return got

    for k, (a, b) in enumerate(zip(one, many, strict=True)):
        ra, rb = row(a), row(b)
        same = 12 if "schedule_at" in variants[k] else 13  # else eligible_at - inserted_at too
        assert ra[:same] == rb[:same], (k, ra, rb)
        scoped = variants[k].get("correlation_scope") != []
        assert rb[13] == (variants[k].get("correlation_key") if scoped else None)
        assert rb[14] == "runnable"
    assert row(many[2])[15] == at
    assert row(many[0])[15] >= before
    assert row(many[3])[3] == state
    # a batch of rows at the defaults goes as the short stream: the same rows again
    db.execute(f'UPDATE "{schema}".instances SET status = %s', ["cancelled"])
    plain = client.insert_many([Insert("copied", state, queue="q")] * 2)
    assert row(plain[0])[:13] == row(one[0])[:13] == row(plain[1])[:13]


def test_insert_many_plain_batch_uses_the_short_stream(connect, client):
    with connect(autocommit=True) as conn, traced(conn) as trace:
        client.insert_many([Insert("copied", {"i": i}, queue="q") for i in range(3)], conn=conn)
        client.insert_many([Insert("copied", {"i": 3}, queue="q", priority=1)], conn=conn)
    copies = [ln for ln in trace.sql() if "FROM STDIN" in ln]
    assert len(copies) == 2
    assert "(id, fsm, version, step, state, queue) FROM STDIN" in copies[0]
    assert "weight" in copies[1]


def test_insert_many_takes_an_indented_raw_state(client):
    raw = msgspec.Raw(b'{\n\t"a": "x\\\\y\\n",\r\n\t"b": [1,\n 2]\n}')
    [iid] = client.insert_many([Insert("copied", raw, queue="q")])
    assert must_get(client, iid).state == {"a": "x\\y\n", "b": [1, 2]}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"correlation_key": 7}, "correlation_key must be a string"),
        ({"priority": True}, "priority must be an int"),
    ],
)
def test_insert_and_insert_many_refuse_mistyped_options(client, db, schema, bad, match):
    with pytest.raises(TypeError, match=match):
        client.insert("copied", {}, queue="q", **bad)
    # the second row carries the mistake: its shape was already seen, its key was not
    specs = [Insert("copied", {}, queue="q"), Insert("copied", {}, queue="q", **bad)]
    with pytest.raises(TypeError, match=match):
        client.insert_many(specs)
    assert count(db, schema) == 0


# --------------------------------------------------------------------------- 12. signal


def _inbox(db: psycopg.Connection[Any], schema: str, iid: int) -> list[tuple[str, Any]]:
    rows = db.execute(f'SELECT name, payload FROM "{schema}".signals WHERE target_id = %s ORDER BY id', [iid])
    return [(name, payload) for name, payload in rows]


def test_signal_by_id_or_key_and_dedup(client, db, schema):
    iid = client.insert("sig", queue="q", correlation_key="order:1")
    by_id = client.signal(iid, "paid", {"n": 1})
    by_key = client.signal("order:1", "paid")
    first = client.signal(iid, "note", {"n": 2}, dedup_key="evt-1")
    again = client.signal("order:1", "note", {"n": 3}, dedup_key="evt-1")
    assert None not in (by_id, by_key, first) and len({by_id, by_key, first}) == 3
    assert again is None
    assert _inbox(db, schema, iid) == [("paid", {"n": 1}), ("paid", {}), ("note", {"n": 2})]


def test_signal_wakes_a_parked_instance(dsn, schema, client):
    iid = client.insert(Payment)
    drain(dsn, [Payment], schema=schema)
    assert must_get(client, iid).status == "awaiting_signal"
    assert client.signal(iid, "other") is not None  # not awaited: stored, the row stays parked
    assert must_get(client, iid).status == "awaiting_signal"
    assert client.signal(iid, "paid", {"n": 5}) is not None
    assert must_get(client, iid).status == "runnable"
    drain(dsn, [Payment], schema=schema)
    assert client.wait(iid, timeout=1) == Done({"seen": ["paid:5"], "inbox": ["other", "paid"]})


def test_signal_to_unknown_or_finished_target_is_refused(client, db, schema):
    with pytest.raises(NoTarget):
        client.signal(987654321, "paid")
    with pytest.raises(NoTarget):
        client.signal("no-such-key", "paid")
    iid = client.insert("sig", queue="q", correlation_key="gone")
    db.execute(f'UPDATE "{schema}".instances SET status = %s WHERE id = %s', ["done", iid])
    with pytest.raises(NoTarget):
        client.signal(iid, "paid")
    with pytest.raises(NoTarget):
        client.signal("gone", "paid")
    assert _inbox(db, schema, iid) == []


def test_signal_validated_before_touching_db(side):
    with side.make_client(UNREACHABLE, schema="nowhere") as c:
        start = time.monotonic()
        for target in (True, 1.5, None, b"key"):
            with pytest.raises(TypeError, match="signal target"):
                c.signal(target, "paid")
        with pytest.raises(ValueError, match="name"):
            c.signal(1, "")
        assert time.monotonic() - start < 2
        assert c._pool is None


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_transactional_signal(connect, schema, client, db, style, commit):
    iid = client.insert("sig", queue="q")
    sid = _in_transaction(connect, style, commit, lambda c: client.signal(iid, "paid", {"n": 1}, conn=c))
    assert sid is not None
    assert _inbox(db, schema, iid) == ([("paid", {"n": 1})] if commit else [])


# --------------------------------------------------------------------------- 13. notifications


def test_every_queue_written_is_notified(dsn, schema, client):
    """A write alone notifies its queue itself; writes in flight together leave it to the
    client's emitter (a thread, or a task), which must still notify every queue."""
    queues = [f"nq{i}" for i in range(5)]
    with psycopg.connect(dsn, autocommit=True) as listener:
        channels = {}
        for q in queues:
            row = listener.execute(f'SELECT "{schema}".notify_channel(%s)', [q]).fetchone()
            assert row is not None
            channels[row[0]] = q
            listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(row[0])))
        client.insert("n", queue=queues[0])
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client.insert, "n", queue=q) for q in queues[1:] * 4]
            futures += [
                pool.submit(client.insert_many, [Insert("n", queue=queues[-1])] * 3) for _ in range(4)
            ]
            for f in futures:
                f.result()
        seen: set[str] = set()
        deadline = time.monotonic() + 10
        while seen != set(queues) and time.monotonic() < deadline:
            for note in listener.notifies(timeout=max(0.0, deadline - time.monotonic()), stop_after=1):
                seen.add(channels[note.channel])
    assert seen == set(queues)
