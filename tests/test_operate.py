"""Operating instances and queues: cancel, retry, rewind, pause (docs/operating.md).

Inline tests drive the real claim / run / flush path with ``Engine`` and ``drain``; the
races hold one transaction open at the critical point; the runtime tests run real
supervisors."""

from __future__ import annotations

import asyncio
import datetime as dt
import pickle

import psycopg
import pytest

from pgdurable import FSM, DefinitionError, InstanceExecuting, OperationRefused, UnknownStep, step
from pgdurable.client import AsyncClient, NoTarget, Rewound
from pgdurable.client.common import Failed
from pgdurable.contract.fsm import Registry
from pgdurable.engine import Engine
from pgdurable.engine.admission import admit
from pgdurable.engine.claim import claim
from pgdurable.engine.commit import _plain_params
from pgdurable.runtime.config import parse_limits
from pgdurable.runtime.sweeps.reaper import reclaim
from pgdurable.testing import assert_done, assert_status, drain

from .operate_machines import ALL, CareTree, Flaky, FlakyQuiet, Order, Plain, Tree, quick
from .supervised import start, wait_until
from .test_races import Background, wait_until_blocked

LEASE = dt.timedelta(seconds=60)


def _one(db, sql: str, params=()):
    return db.execute(sql, params).fetchone()


def inbox(db, schema, iid) -> int:
    return _one(db, f'SELECT count(*) FROM "{schema}".signals WHERE target_id = %s', [iid])[0]


def children(db, schema, iid) -> list[tuple[int, str]]:
    return db.execute(
        f'SELECT id, status FROM "{schema}".instances WHERE parent_id = %s ORDER BY id', [iid]
    ).fetchall()


def claim_run(engine: Engine, conn, queue: str):
    async def go():
        rows = await engine.claim(conn, queue, 10)
        return rows, [await engine.run(r) for r in rows]

    return go()


def run_claimed(dsn, schema, queue, between, *, limits=None, machines=ALL):
    """Claim and run a queue's rows, call ``between()`` while their steps have returned
    but nothing is committed, then flush: returns (results, flush report)."""
    engine = Engine(Registry(machines), schema=schema, limits=limits)

    async def go():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await engine.register(conn)
            _rows, results = await claim_run(engine, conn, queue)
            await asyncio.to_thread(between)
            return results, await engine.flush(conn, results)

    return asyncio.run(go())


# --------------------------------------------------------------------------- cancel, at once


def test_cancel_runnable_scheduled_parked_and_held(dsn, schema, client, db):
    scheduled = client.insert(quick, {"n": 2}, schedule_in=3600)
    parked = client.insert(Plain)
    held = client.insert("op_unknown", {}, queue="op")  # no worker knows it: held when claimed
    drain(dsn, ALL, schema=schema, queues=["op"], collapse_time=False)
    assert_status(client, parked, "awaiting_signal")
    assert_status(client, held, "held")
    client.signal(parked, "other", {})  # stored, not awaited
    runnable = client.insert(quick, {"n": 1}, correlation_key="order:1")

    for iid, was in ((runnable, "runnable"), (scheduled, "runnable"), (parked, "awaiting_signal")):
        assert client.get(iid).status == was
        res = client.cancel(iid, "customer asked")
        assert (res.id, res.outcome, res.status, res.descendants) == (iid, "cancelled", "cancelled", {})
    assert client.cancel(held).outcome == "cancelled"

    inst = client.get(parked)
    assert inst.status == "cancelled" and inst.awaits is None and inst.await_deadline is None
    assert inst.cancel_reason == "customer asked" and not inst.cancel_requested
    assert inbox(db, schema, parked) == 0  # the inbox is cleared
    assert client.get(held).cancel_reason == "cancelled"  # the default reason
    assert client.wait(runnable, timeout=0) == Failed("customer asked", "cancelled")
    # nothing runs any more, nothing can be signalled, and a live-scoped key is free again
    assert drain(dsn, ALL, schema=schema).steps == 0
    with pytest.raises(NoTarget):
        client.signal(parked, "go", {})
    client.insert(quick, {"n": 3}, correlation_key="order:1")


def test_cancel_targets_and_what_it_returns(dsn, schema, client):
    iid = client.insert(quick, {}, correlation_key="k:1")
    with pytest.raises(NoTarget, match="no instance 999999"):
        client.cancel(999999)
    with pytest.raises(NoTarget, match="no live instance holds the correlation key 'k:2'"):
        client.cancel("k:2")
    with pytest.raises(TypeError):
        client.cancel(1.5)  # type: ignore[arg-type]
    assert client.cancel("k:1", "by key").id == iid
    again = client.cancel(iid)
    assert (again.outcome, again.status) == ("terminal", "cancelled")
    with pytest.raises(NoTarget):
        client.cancel("k:1")  # the key is free once it is cancelled (live scope)
    done = client.insert(quick, {})
    drain(dsn, ALL, schema=schema)
    assert client.cancel(done).outcome == "terminal"
    assert_done(client, done, {})


def test_cancel_is_sql_a_user_can_call(dsn, schema, client, db):
    iid = client.insert(quick, {})
    rows = db.execute(
        f'SELECT instance_id, status, outcome FROM "{schema}".cancel(target_id => %s, reason => %s)',
        [iid, "from psql"],
    ).fetchall()
    assert rows == [(iid, "cancelled", "cancelled")]
    assert client.get(iid).cancel_reason == "from psql"


def test_async_client_cancels_too(dsn, schema):
    async def go():
        async with AsyncClient(dsn, schema=schema) as c:
            iid = await c.insert(quick, {})
            res = await c.cancel(iid, "async")
            return res.outcome, (await c.get(iid)).status

    assert asyncio.run(go()) == ("cancelled", "cancelled")


# --------------------------------------------------------------------------- children


def test_cancel_cascades_to_live_descendants_and_counts_in_the_join(dsn, schema, client, db):
    top = client.insert(Tree, {"values": [[1, 2], 3]})  # a child tree and a leaf
    drain(dsn, ALL, schema=schema)
    (sub, _), (leaf3, _) = children(db, schema, top)
    (leaf1, _), (leaf2, _) = children(db, schema, sub)
    client.signal(leaf1, "go", {})
    drain(dsn, ALL, schema=schema)  # leaf 1 done; the others wait
    assert client.get(sub).children_pending == 1

    res = client.cancel(sub, "cascade")
    assert (res.outcome, res.descendants) == ("cancelled", {"cancelled": 1})  # leaf 2; leaf 1 is done
    assert client.get(leaf2).status == "cancelled"
    assert client.get(leaf1).status == "done"
    top_row = client.get(top)  # the sub-tree counted in its parent's join, as any end would
    assert (top_row.status, top_row.children_pending) == ("awaiting_children", 1)

    assert client.cancel(leaf3).outcome == "cancelled"  # the last child: the parent wakes
    assert client.get(top).status == "runnable"
    drain(dsn, ALL, schema=schema)
    assert_done(client, top, ["cancelled", "cancelled"])


def test_cancel_without_cascade_leaves_children_running(dsn, schema, client, db):
    top = client.insert(Tree, {"values": [1, 2]})
    drain(dsn, ALL, schema=schema)
    res = client.cancel(top, cascade=False)
    assert (res.outcome, res.descendants) == ("cancelled", {})
    kids = children(db, schema, top)
    assert [s for _, s in kids] == ["awaiting_signal", "awaiting_signal"]
    with pytest.raises(OperationRefused, match="live children") as refused:
        client.retry(top)  # their ends would be counted against it
    assert refused.value.reason == "children"
    for kid, _ in kids:
        client.signal(kid, "go", {})
    drain(dsn, ALL, schema=schema)
    assert [s for _, s in children(db, schema, top)] == ["done", "done"]
    assert client.get(top).status == "cancelled"
    assert client.retry(top) == "collect"  # now it may


# --------------------------------------------------------------------------- on_cancel


def test_on_cancel_runs_a_last_step_then_ends_cancelled(dsn, schema, client):
    order = client.insert(Order, {"sku": "a"})
    drain(dsn, ALL, schema=schema)  # reserved, awaiting payment
    res = client.cancel(order, "out of stock")
    assert (res.outcome, res.status) == ("cancelling", "runnable")
    inst = client.get(order)
    assert (inst.step, inst.cancel_reason) == ("refund", "out of stock")
    # cancelling again leaves the compensation to finish
    assert client.cancel(order, "again").outcome == "cancelling"
    tally = drain(dsn, ALL, schema=schema)
    assert tally.done == 1  # the refund step ran once and said Done
    inst = assert_status(client, order, "cancelled")
    assert inst.result == {"refunded": True, "reason": "out of stock"}
    assert client.wait(order, timeout=0) == Failed("out of stock", "cancelled")
    # the step it was cancelled in (parked: the step it waited to run) is kept: a retry
    # resumes there, as a live instance again
    assert client.retry(order) == "ship"
    inst = client.get(order)
    assert (inst.step, inst.status, inst.cancel_reason) == ("ship", "runnable", None)
    drain(dsn, ALL, schema=schema)
    assert_done(client, order, {"shipped": True})


def test_compensate_false_skips_on_cancel_or_ends_it(dsn, schema, client):
    direct = client.insert(Order, {})
    cancelling = client.insert(Order, {})
    drain(dsn, ALL, schema=schema)  # (drain registers the machines, as a supervisor does)
    assert client.cancel(direct, compensate=False).outcome == "cancelled"
    assert client.cancel(cancelling).outcome == "cancelling"
    assert client.cancel(cancelling, "stop it", compensate=False).outcome == "cancelled"
    assert drain(dsn, ALL, schema=schema).steps == 0
    assert client.get(cancelling).cancel_reason is not None


def test_on_cancel_waits_for_children_it_did_not_cancel(dsn, schema, client, db):
    """A parent with on_cancel cancelled without cascade runs its last step once its
    children ended; with cascade, it sees them cancelled."""
    alone = client.insert(CareTree, {"values": [1]})
    caring = client.insert(CareTree, {"values": [2, 3]})
    drain(dsn, ALL, schema=schema)
    assert client.cancel(alone, "no cascade", cascade=False).status == "awaiting_children"
    res = client.cancel(caring, "all of it")
    assert (res.outcome, res.status, res.descendants) == ("cancelling", "runnable", {"cancelled": 2})
    drain(dsn, ALL, schema=schema)
    assert_status(client, alone, "awaiting_children")
    assert client.get(caring).result == {"children": ["cancelled", "cancelled"], "reason": "all of it"}
    ((kid, _),) = children(db, schema, alone)
    client.signal(kid, "go", {})
    drain(dsn, ALL, schema=schema)
    inst = assert_status(client, alone, "cancelled")
    assert inst.result == {"children": ["done"], "reason": "no cascade"}


def test_on_cancel_must_name_a_step():
    with pytest.raises(DefinitionError, match="on_cancel = 'nope' names no step"):

        class Bad(FSM, name="bad_hook"):
            on_cancel = "nope"

            @step(initial=True)
            def go(self, ctx):
                return None

    assert Order.__pgdurable__.on_cancel == "refund"
    assert CareTree.__pgdurable__.on_cancel == "undo"
    assert Tree.__pgdurable__.on_cancel is None


# --------------------------------------------------------------------------- executing rows


def test_cancel_of_an_executing_step_discards_its_outcome(dsn, schema, client, db):
    iid = client.insert(Plain)
    drain(dsn, ALL, schema=schema)
    client.signal(iid, "go", {"n": 1})
    client.signal(iid, "later", {})
    marks = []

    def cancel_now():
        res = client.cancel(iid, "while running")
        inst = client.get(iid)
        marks.append((res.outcome, res.status, inst.status, inst.cancel_requested, inst.result))

    results, report = run_claimed(dsn, schema, "op", cancel_now)
    assert [r.kind for r in results] == ["done"]
    assert marks == [("marked", "executing", "executing", True, None)]
    assert report.cancelled == {iid} and report.committed == set()
    inst = assert_status(client, iid, "cancelled")
    assert (inst.result, inst.cancel_requested, inst.cancel_reason) == (None, False, "while running")
    assert inbox(db, schema, iid) == 0  # not consumed by the discarded outcome: cleared


def test_a_marked_spawn_creates_no_children_and_a_marked_park_does_not_park(dsn, schema, client, db):
    tree = client.insert(Tree, {"values": [1, 2]})
    plain = client.insert(Plain)
    _results, report = run_claimed(dsn, schema, "op", lambda: [client.cancel(i) for i in (tree, plain)])
    assert report.cancelled == {tree, plain}
    assert children(db, schema, tree) == []
    assert client.get(tree).status == "cancelled" and client.get(plain).status == "cancelled"


def test_a_marked_row_with_on_cancel_goes_there_when_its_step_returns(dsn, schema, client):
    order = client.insert(Order, {})
    run_claimed(dsn, schema, "op", lambda: client.cancel(order, "mid-step"))
    inst = assert_status(client, order, "runnable")
    assert inst.step == "refund"
    drain(dsn, ALL, schema=schema)
    # the reserve step's outcome (and its state) was discarded: nothing was reserved
    assert assert_status(client, order, "cancelled").result == {"refunded": False, "reason": "mid-step"}


def test_a_parent_cancelled_while_its_child_runs_waits_for_it(dsn, schema, client, db):
    """cascade marks an executing child; the parent's on_cancel step waits for it."""
    tree = client.insert(CareTree, {"values": [5]})
    drain(dsn, ALL, schema=schema)
    ((kid, _),) = children(db, schema, tree)
    client.signal(kid, "go", {})
    seen = []

    def cancel_tree():
        res = client.cancel(tree, "stop")
        seen.append((res.outcome, res.status, res.descendants))

    run_claimed(dsn, schema, "op_kids", cancel_tree)
    assert seen == [("cancelling", "awaiting_children", {"marked": 1})]
    assert client.get(kid).status == "cancelled"  # settled when its step returned
    assert client.get(tree).status == "runnable"  # and counted in the parent's join
    drain(dsn, ALL, schema=schema)
    assert assert_status(client, tree, "cancelled").result == {"children": ["cancelled"], "reason": "stop"}


def test_release_reclaim_and_denial_settle_a_marked_row(dsn, schema, client, db):
    limits = parse_limits(concurrency_limits={"acct": {"limit": 1}})
    released = client.insert(quick, {})
    reclaimed = client.insert(quick, {})
    engine = Engine(Registry(ALL), schema=schema, limits=limits)

    async def release_and_reclaim():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            rows = await engine.claim(conn, "op", 10)
            assert {r.id for r in rows} == {released, reclaimed}
            client.cancel(released)
            client.cancel(reclaimed)
            await engine.release(conn, [r for r in rows if r.id == released])

    asyncio.run(release_and_reclaim())
    assert client.get(released).status == "cancelled"
    assert client.get(reclaimed).status == "executing"
    with psycopg.connect(dsn, autocommit=True) as conn:  # its worker died
        assert reclaim(conn, engine.q, engine.registry, 3, lease=LEASE, workers=[engine.worker_id]) == 1
    assert client.get(reclaimed).status == "cancelled"

    holder = client.insert(quick, {}, concurrency_key="acct:1")
    denied = client.insert(quick, {}, concurrency_key="acct:1")

    async def deny():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            (first,) = await engine.claim(conn, "op", 1)  # holds acct:1's only slot
            assert first.id == holder
            rows = await claim(
                conn,
                engine.q,
                queue="op",
                limit=10,
                worker=engine.worker_id,
                token=99,
                lease=LEASE,
                gates=limits.claim_params(),
            )
            assert [r.id for r in rows] == [denied]
            client.cancel(denied)
            verdicts = await admit(conn, engine.q, engine.worker_id, rows, limits)
            assert [r.id for r, _ in verdicts.denied] == [denied]

    asyncio.run(deny())
    assert client.get(denied).status == "cancelled"  # not runnable again with a mark


def test_a_marked_row_gives_its_gate_slot_back_when_it_settles(dsn, schema, client, db):
    limits = parse_limits(concurrency_limits={"acct": {"limit": 1}})
    first = client.insert(quick, {}, concurrency_key="acct:7")
    second = client.insert(quick, {}, concurrency_key="acct:7")
    free = f"SELECT sum(available) FROM \"{schema}\".gate_slots WHERE key = 'acct:7'"
    slots = []

    def cancel_first():
        client.cancel(first)
        slots.append(_one(db, free)[0])

    run_claimed(dsn, schema, "op", cancel_first, limits=limits)
    assert slots == [0]  # held while the step ran
    assert _one(db, free)[0] == 1  # given back by the settle
    assert client.get(first).status == "cancelled"
    assert drain(dsn, ALL, schema=schema, limits=limits).done == 1
    assert_done(client, second, {})


# --------------------------------------------------------------------------- retry


def test_retry_a_failed_instance_then_it_finishes(dsn, schema, client, tmp_path):
    flag = tmp_path / "flag"
    flag.touch()
    iid = client.insert(Flaky, {"flag": str(flag)})
    drain(dsn, ALL, schema=schema)
    failed = assert_status(client, iid, "failed")
    assert (failed.step, failed.last_error) == ("second", "RuntimeError('flag is up')")
    flag.unlink()
    assert client.retry(iid) == "second"
    inst = client.get(iid)
    assert (inst.status, inst.attempt, inst.crashes) == ("runnable", 0, 0)
    assert inst.last_error == "RuntimeError('flag is up')"  # kept until the next outcome
    drain(dsn, ALL, schema=schema)
    inst = assert_done(client, iid, {"firsts": 1, "attempt": 0, "state": {"flag": str(flag), "firsts": 1}})
    assert client.get(iid).last_error is None


def test_retry_refuses_what_it_cannot_retry(dsn, schema, client, db, tmp_path):
    live = client.insert(Plain)
    with pytest.raises(OperationRefused, match="is runnable: only a failed or cancelled") as exc:
        client.retry(live)
    assert (exc.value.status, exc.value.reason) == ("runnable", "runnable")
    assert pickle.loads(pickle.dumps(exc.value)).reason == "runnable"
    with pytest.raises(NoTarget):
        client.retry(999999)
    flag = tmp_path / "flag"
    flag.touch()
    old = client.insert(Flaky, {"flag": str(flag)}, correlation_key="run:1")
    drain(dsn, ALL, schema=schema)
    client.insert(quick, {}, correlation_key="run:1")  # the key is free: someone took it
    with pytest.raises(OperationRefused, match="correlation key") as exc:
        client.retry(old)
    assert exc.value.reason == "key"
    assert client.get(old).status == "failed"


def test_retrying_a_child_reopens_its_parents_join(dsn, schema, client, db):
    top = client.insert(Tree, {"values": [1, 2]})
    drain(dsn, ALL, schema=schema)
    (a, _), (b, _) = children(db, schema, top)
    client.cancel(a)
    assert client.get(top).children_pending == 1
    assert client.retry(a) == "end"  # the parent still waits: it waits for it again
    assert client.get(top).children_pending == 2
    client.signal(b, "go", {})
    drain(dsn, ALL, schema=schema)
    assert_done(client, top, ["done", "done"])


def test_retrying_a_child_whose_parent_moved_on_detaches_it(dsn, schema, client, db):
    top = client.insert(Tree, {"values": [1, 2]})
    drain(dsn, ALL, schema=schema)
    (a, _), (b, _) = children(db, schema, top)
    client.cancel(a)
    client.signal(b, "go", {})
    drain(dsn, ALL, schema=schema, queues=["op_kids"])  # b ends: the parent wakes
    assert client.get(top).status == "runnable"
    assert client.retry(a) == "end"
    assert client.get(a).parent_id is None  # its end cannot wake the parent by mistake
    assert client.get(top).children_pending == 0
    drain(dsn, ALL, schema=schema)
    assert_done(client, top, ["done"])
    assert_done(client, a, 1)


def test_retry_many_by_filter_with_a_dry_run_in_batches(dsn, schema, client, tmp_path):
    flag = tmp_path / "flag"
    flag.touch()
    ids = [client.insert(Flaky, {"flag": str(flag), "n": n}) for n in range(5)]
    other = client.insert(Flaky, {"flag": str(flag)}, queue="op_other")
    drain(dsn, ALL, schema=schema)
    assert all(client.get(i).status == "failed" for i in [*ids, other])
    flag.unlink()

    report = client.retry_many(machine=Flaky, queue="op", error_like="%flag IS up%", dry_run=True)
    assert (report.matched, report.retried, report.dry_run) == (5, 0, True)
    assert client.retry_many(error_like="%no such error%", dry_run=True).matched == 0
    assert client.retry_many(since=dt.timedelta(hours=1), dry_run=True).matched == 6
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert client.retry_many(since=later, dry_run=True).matched == 0
    assert all(client.get(i).status == "failed" for i in ids)  # a dry run changes nothing

    client.rewind(ids[0], "first")  # no longer failed: not matched by the run below
    report = client.retry_many(machine="op_flaky", queue="op", error_like="%flag%", batch=2)
    assert (report.matched, report.retried, report.skipped) == (4, 4, {})
    assert client.get(other).status == "failed"
    assert drain(dsn, ALL, schema=schema).done == 5


# --------------------------------------------------------------------------- rewind


def test_rewind_a_finished_instance_with_a_new_state(dsn, schema, client):
    iid = client.insert(Flaky, {"flag": "/nonexistent"})
    drain(dsn, ALL, schema=schema)
    assert client.get(iid).result["firsts"] == 1
    # No state given: first runs again on the state it had when it ran (from its history).
    assert client.rewind(iid, "first") == Rewound(iid, "first", 1, "history")
    assert client.get(iid).state == {"flag": "/nonexistent"}
    drain(dsn, ALL, schema=schema)
    assert client.get(iid).result["firsts"] == 1
    # The latest attempt at second ran with firsts=1: a rewind there restores it.
    assert client.rewind(iid, "second").state_from == "history"
    assert client.get(iid).state == {"flag": "/nonexistent", "firsts": 1}
    drain(dsn, ALL, schema=schema)
    assert client.get(iid).result["firsts"] == 1
    assert client.rewind(iid, "second", {"flag": "/nonexistent", "firsts": 10}).state_from == "given"
    inst = client.get(iid)
    assert (inst.status, inst.step, inst.result) == ("runnable", "second", None)
    drain(dsn, ALL, schema=schema)
    assert client.get(iid).result["firsts"] == 10


def test_rewind_without_history_runs_on_the_stored_state(dsn, schema, client):
    iid = client.insert(FlakyQuiet, {"flag": "/nonexistent"})
    drain(dsn, ALL, schema=schema)
    assert client.history(iid) == []
    assert client.rewind(iid, "first").state_from == "stored"
    drain(dsn, ALL, schema=schema)
    assert client.get(iid).result["firsts"] == 2  # first ran again on the stored state


def test_rewind_a_live_instance_and_what_it_refuses(dsn, schema, client):
    iid = client.insert(Plain)
    drain(dsn, ALL, schema=schema)
    client.signal(iid, "other", {})
    client.rewind(iid, "end")  # parked no more; its inbox is kept
    inst = client.get(iid)
    assert (inst.status, inst.awaits) == ("runnable", None)
    drain(dsn, ALL, schema=schema)
    assert_done(client, iid, ["other"])
    with pytest.raises(UnknownStep, match=r"has no step 'nope' \(steps: \['wait', 'end'\]\)"):
        client.rewind(iid, "nope")
    with pytest.raises(NoTarget):
        client.rewind(999999, "wait")
    top = client.insert(Tree, {"values": [1]})
    drain(dsn, ALL, schema=schema)
    with pytest.raises(OperationRefused, match="live children"):
        client.rewind(top, "fan_out")
    unknown = client.insert("op_gone", {}, queue="op_gone")
    from pgdurable.client import UnknownMachine

    with pytest.raises(UnknownMachine, match="not registered"):
        client.rewind(unknown, "x")


# --------------------------------------------------------------------------- pause


def test_pause_and_resume(dsn, schema, client, db):
    assert client.paused() == {}
    assert client.pause("op") is True
    assert client.pause("op") is False  # already
    assert list(client.paused()) == ["op"]
    iid = client.insert(quick, {"n": 1})
    kid = client.insert(quick, {"n": 2}, queue="op_kids")
    tally = drain(dsn, ALL, schema=schema)
    assert tally.done == 1  # the other queue flows
    assert_done(client, kid, {"n": 2})
    assert_status(client, iid, "runnable")
    with db.cursor() as cur:  # a paused queue's idle workers see nothing due
        (wait, future) = cur.execute(
            Engine(Registry(ALL), schema=schema).q["instance_next_eligible"], {"queue": "op"}
        ).fetchone()
        assert (wait, future) == (None, None)
    with psycopg.connect(dsn, autocommit=True) as listener:
        channel = _one(db, f'SELECT "{schema}".notify_channel(%s)', ["op"])[0]
        listener.execute(f'LISTEN "{channel}"')
        assert client.resume("op") is True
        assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == [channel]
    assert client.resume("op") is False
    assert client.paused() == {}
    assert drain(dsn, ALL, schema=schema).done == 1
    assert_done(client, iid, {"n": 1})


# --------------------------------------------------------------------------- races


def _cancel_params(iid, reason="race", cascade=True):
    return {"target_id": iid, "target_key": None, "reason": reason, "cascade": cascade, "compensate": True}


def test_race_cancel_open_while_the_step_commits(dsn, schema, client, db):
    """The cancel marked the row and has not committed; the step's commit waits for the
    row, then sees the mark: its outcome is refused, and the cancel settled instead."""
    iid = client.insert(quick, {"n": 1})
    engine = Engine(Registry(ALL), schema=schema)

    async def go():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            _, results = await claim_run(engine, conn, "op")
            with psycopg.connect(dsn) as canceller:  # not autocommit: stays open
                rows = canceller.execute(engine.q["instance_cancel"], _cancel_params(iid)).fetchall()
                assert [r[3] for r in rows] == ["marked"]
                flushing = asyncio.create_task(engine.flush(conn, results))
                await asyncio.to_thread(wait_until_blocked, db, db.info.dbname)
                canceller.commit()
                return await flushing

    report = asyncio.run(go())
    assert report.cancelled == {iid} and report.committed == set()
    inst = assert_status(client, iid, "cancelled")
    assert inst.result is None  # the outcome (Done({"n": 1})) was discarded


def test_race_step_commit_open_while_the_cancel_arrives(dsn, schema, client, db):
    """The step's commit holds the row; the cancel waits for it and then finds the
    instance finished: nothing to cancel, nothing marked."""
    iid = client.insert(quick, {"n": 1})
    engine = Engine(Registry(ALL), schema=schema)

    async def go():
        async with (
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
            await psycopg.AsyncConnection.connect(dsn) as committing,  # not autocommit: stays open
        ):
            _, results = await claim_run(engine, conn, "op")
            assert (await engine.flush(committing, results)).committed == {iid}
            cancel = Background(lambda: client.cancel(iid, "late"))
            await asyncio.to_thread(wait_until_blocked, db, db.info.dbname)
            await committing.commit()
            return await asyncio.to_thread(cancel.value)

    res = asyncio.run(go())
    assert (res.outcome, res.status) == ("terminal", "done")
    inst = assert_done(client, iid, {"n": 1})
    assert (inst.cancel_reason, inst.cancel_requested) == (None, False)


def test_race_cancel_of_a_child_whose_commit_and_join_are_open(dsn, schema, client, db):
    """A child's outcome and its parent's join are written, not committed, when the child
    is cancelled: the cancel waits, finds the child done, and the parent's join is counted
    once — the parent still waits for its other child."""
    top = client.insert(Tree, {"values": [1, 2]})
    drain(dsn, ALL, schema=schema)
    (a, _), (b, _) = children(db, schema, top)
    client.signal(a, "go", {})
    engine = Engine(Registry(ALL), schema=schema)

    async def go():
        async with (
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
            await psycopg.AsyncConnection.connect(dsn) as committing,
        ):
            _, results = await claim_run(engine, conn, "op_kids")
            await committing.execute("SELECT 1")  # a transaction the flush's block nests in
            report = await engine.flush(committing, results)
            assert report.committed == {a}
            cancel = Background(lambda: client.cancel(a, "late"))
            await asyncio.to_thread(wait_until_blocked, db, db.info.dbname)
            await committing.commit()
            return await asyncio.to_thread(cancel.value)

    res = asyncio.run(go())
    inst = assert_status(client, top, "awaiting_children")  # not woken by a second count
    assert inst.children_pending == 1
    assert (res.outcome, res.status) == ("terminal", "done")
    client.signal(b, "go", {})
    drain(dsn, ALL, schema=schema)
    assert_done(client, top, ["done", "done"])


def test_race_cascade_waits_for_a_child_commit_without_holding_its_parent(dsn, schema, client, db):
    """A flush holds a child's row and has yet to join its parent when the parent is
    cancelled with cascade: the cancel locks children before their parent, so it waits
    for the child holding nothing the flush needs; the join goes through, then the cancel
    finds the child done and cancels the rest. Locking the parent first deadlocks."""
    top = client.insert(Tree, {"values": [1, 2]})
    drain(dsn, ALL, schema=schema)
    (a, _), (b, _) = children(db, schema, top)
    client.signal(a, "go", {})
    engine = Engine(Registry(ALL), schema=schema)

    def cancel_top():
        with psycopg.connect(dsn, autocommit=True) as c:  # no retry on a deadlock
            return c.execute(engine.q["instance_cancel"], _cancel_params(top, "tree")).fetchall()

    async def go():
        async with (
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
            await psycopg.AsyncConnection.connect(dsn) as committing,
        ):
            _, results = await claim_run(engine, conn, "op_kids")
            cur = await committing.execute(
                engine.q["instance_commit_if_owned_many"],
                _plain_params(engine.worker_id, results, None, LEASE),
            )
            assert [r[0] for r in await cur.fetchall()] == [a]
            cancel = Background(cancel_top)
            await asyncio.to_thread(wait_until_blocked, db, db.info.dbname)
            await committing.execute(
                engine.q["instance_join_parents_many"], {"parents": [top], "counts": [1], "failed": [0]}
            )
            await committing.commit()
            return await asyncio.to_thread(cancel.value)

    rows = asyncio.run(go())
    assert [(r[0], r[3]) for r in rows] == [(top, "cancelled"), (a, "terminal"), (b, "cancelled")]
    assert [s for _, s in children(db, schema, top)] == ["done", "cancelled"]


def test_race_signal_wake_open_while_the_cancel_arrives(dsn, schema, client, db):
    """A delivery stored a signal and woke the instance, uncommitted: the cancel waits for
    the row, cancels the woken instance and clears the inbox it now sees."""
    iid = client.insert(Plain)
    drain(dsn, ALL, schema=schema)
    engine = Engine(Registry(ALL), schema=schema)
    with psycopg.connect(dsn) as deliverer:  # not autocommit: stays open
        (row,) = deliverer.execute(
            engine.q["signal_deliver"],
            {
                "target_id": iid,
                "target_key": None,
                "name": "go",
                "payload": "{}",
                "dedup_key": None,
                "notify": True,
                "traceparent": None,
            },
        ).fetchall()
        assert row[2] == "runnable"  # woken
        cancel = Background(lambda: client.cancel(iid, "woken"))
        wait_until_blocked(db, db.info.dbname)
        deliverer.commit()
    assert cancel.value().outcome == "cancelled"
    assert inbox(db, schema, iid) == 0
    assert drain(dsn, ALL, schema=schema).steps == 0
    assert client.get(iid).status == "cancelled"


def test_race_cancel_open_while_a_signal_arrives(dsn, schema, client, db):
    """The cancel holds the row; the delivery waits, then finds the instance finished:
    nothing is stored, the sender is told."""
    iid = client.insert(Plain)
    drain(dsn, ALL, schema=schema)
    engine = Engine(Registry(ALL), schema=schema)
    with psycopg.connect(dsn) as canceller:
        canceller.execute(engine.q["instance_cancel"], _cancel_params(iid)).fetchall()
        delivery = Background(lambda: client.signal(iid, "go", {}))
        wait_until_blocked(db, db.info.dbname)
        canceller.commit()
    with pytest.raises(NoTarget):
        delivery.value()
    assert inbox(db, schema, iid) == 0


def test_race_rewind_waits_for_a_claim_and_refuses_the_row(dsn, schema, client, db):
    """A worker's claim holds the row, uncommitted: the rewind waits, then finds it
    executing and refuses — the worker's outcome still commits."""
    iid = client.insert(quick, {"n": 1})
    engine = Engine(Registry(ALL), schema=schema)

    async def go():
        async with await psycopg.AsyncConnection.connect(dsn) as claiming:  # stays open
            await engine.register(claiming)  # the steps a rewind checks against
            await claiming.commit()
            rows = await engine.claim(claiming, "op", 10)
            assert [r.id for r in rows] == [iid]
            rewind = Background(lambda: client.rewind(iid, "perform", {"n": 2}))
            await asyncio.to_thread(wait_until_blocked, db, db.info.dbname)
            await claiming.commit()
            with pytest.raises(InstanceExecuting, match="is executing"):
                await asyncio.to_thread(rewind.value)
            await claiming.set_autocommit(True)
            return await engine.flush(claiming, [await engine.run(r) for r in rows])

    assert asyncio.run(go()).committed == {iid}
    assert_done(client, iid, {"n": 1})


# --------------------------------------------------------------------------- real supervisors

GATE = "\n[concurrency_limits]\nacct = { limit = 1 }\n"
SIDE = "\n[queues.side]\nprocesses = 1\nconcurrency = 2\nprefetch = 0\nbatch = 5\n"


def _gated(tmp_path, name):
    started, gate = tmp_path / f"{name}.started", tmp_path / f"{name}.gate"
    return {"started": str(started), "gate": str(gate)}, started, gate


def test_cancel_of_an_executing_step_under_a_supervisor(dsn, schema, client, db, sups, tmp_path):
    """The step runs on: its row keeps its key (one at a time) and its gate slot until the
    step returns; then it ends cancelled, its outcome discarded, and the next row of each
    key runs."""
    start(sups, tmp_path, dsn, schema, extra=GATE)
    solo_args, solo_started, solo_gate = _gated(tmp_path, "solo")
    acct_args, acct_started, acct_gate = _gated(tmp_path, "acct")
    solo = client.insert("gated", solo_args, concurrency_key="solo:1")  # unconfigured: K = 1
    solo_next = client.insert("stamp", {}, concurrency_key="solo:1")
    acct = client.insert("gated", acct_args, concurrency_key="acct:1")  # a gate of one slot
    acct_next = client.insert("stamp", {}, concurrency_key="acct:1")
    wait_until(lambda: solo_started.exists() and acct_started.exists(), what="both steps to start")

    assert client.cancel(solo, "stop solo").outcome == "marked"
    assert client.cancel(acct, "stop acct").outcome == "marked"
    for iid in (solo, acct):
        inst = client.get(iid)
        assert (inst.status, inst.cancel_requested) == ("executing", True)
    # the key and the slot are still held: a claim of the queue gets neither next row
    free = f"SELECT available FROM \"{schema}\".gate_slots WHERE key = 'acct:1'"
    assert _one(db, free) == (0,)
    engine = Engine(
        Registry([]), schema=schema, limits=parse_limits(concurrency_limits={"acct": {"limit": 1}})
    )

    async def probe():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            return await engine.claim(conn, "rt", 10)

    assert asyncio.run(probe()) == []
    assert client.get(solo_next).status == "runnable"

    solo_gate.touch()
    acct_gate.touch()
    for iid in (solo_next, acct_next):
        assert type(client.wait(iid, timeout=30)).__name__ == "Done"
    for iid, reason in ((solo, "stop solo"), (acct, "stop acct")):
        inst = client.get(iid)
        assert (inst.status, inst.result, inst.cancel_reason) == ("cancelled", None, reason)
    assert _one(db, free) == (1,)  # the slot came back (and acct_next's after it)
    assert sups[0].stop() == 0


def test_pause_holds_a_queue_on_two_supervisors_while_another_flows(dsn, schema, client, sups, tmp_path):
    start(sups, tmp_path, dsn, schema, extra=SIDE)
    start(sups, tmp_path, dsn, schema, extra=SIDE)
    args, started, gate = _gated(tmp_path, "running")
    running = client.insert("gated", args)
    wait_until(started.exists, what="the step to start")

    assert client.pause("rt") is True
    held = [client.insert("stamp", {}) for _ in range(6)]
    flowing = [client.insert("stamp", {}, queue="side") for _ in range(6)]
    for iid in flowing:  # every worker of both was woken by these inserts meanwhile
        assert type(client.wait(iid, timeout=30)).__name__ == "Done"
    gate.touch()  # the step that was running when the pause came finishes
    assert type(client.wait(running, timeout=30)).__name__ == "Done"
    assert [client.get(i).status for i in held] == ["runnable"] * 6

    assert client.resume("rt") is True  # notifies: the idle workers claim at once
    for iid in held:
        assert type(client.wait(iid, timeout=30)).__name__ == "Done"
    assert [s.stop() for s in sups] == [0, 0]


def test_the_claim_checks_the_pause_once_and_reads_nothing_of_a_paused_queue(dsn, schema, client, db):
    from pgdurable import Insert
    from pgdurable.db.queries import for_schema

    from .test_plans import nodes, plan

    client.insert_many([Insert(quick, {}) for _ in range(20)])
    db.execute(f'ANALYZE "{schema}".instances')
    params = {
        "queue": "op",
        "limit": 5,
        "worker": "w",
        "token": 1,
        "lease": LEASE,
        "horizon": dt.timedelta(0),
        "gates": [],
        "gate_limits": [],
    }
    claim_sql = for_schema(schema)["instance_claim"]

    def probes_and_picks():
        p = plan(db, claim_sql, params)
        probes = [n for n in nodes(p) if n.get("Relation Name") == "queues"]
        (pick,) = [n for n in nodes(p) if n.get("Subplan Name") == "CTE candidates"]
        scans = [n for n in nodes(pick) if n.get("Relation Name") == "instances"]
        read = sum(n["Actual Rows"] * n["Actual Loops"] for n in scans)
        return [(n["Parent Relationship"], n["Actual Loops"]) for n in probes], read, p["Actual Rows"]

    # one probe per claim, evaluated once before the pick (an InitPlan, a one-time filter)
    probes, read, claimed = probes_and_picks()
    assert (probes, claimed) == ([("InitPlan", 1)], 5) and read >= 5
    client.pause("op")
    probes, read, claimed = probes_and_picks()
    assert (probes, read, claimed) == ([("InitPlan", 1)], 0, 0)  # the pick never ran
