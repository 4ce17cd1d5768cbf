"""Parallel results (docs/coordination.md#parallel-results): ordered, typed, failures
included; fail_fast wakes the parent at the first failure and cancels the siblings."""

from __future__ import annotations

import pytest

from pgdurable import ChildrenFailed, ChildResult, Results
from pgdurable.testing import drain

from .parallel_machines import ALL, Fan, Twice
from .supervised import start, wait_until


def test_results_come_in_spawn_order_typed(dsn, schema, client):
    iid = client.insert(Fan, {"children": [["square", {"n": n}] for n in range(5)], "strict": True})
    drain(dsn, ALL, schema=schema)
    assert client.get(iid).result == [0, 1, 4, 9, 16]
    # The insert took the children in key order, the reverse of the Spawn's: ids descend.
    kids = sorted((c for c in _children(client, iid)), key=lambda c: c[1])
    assert [c[0] for c in kids] == sorted((c[0] for c in kids), reverse=True)


def _children(client, iid):
    import psycopg

    with psycopg.connect(client._dsn) as conn:
        return conn.execute(
            f'SELECT id, spawn_index FROM "{client.q.schema}".instances WHERE parent_id = %s', [iid]
        ).fetchall()


def test_failures_are_included_and_values_refuses_them(dsn, schema, client):
    kids = [["square", {"n": 1}], ["square", {"n": 2, "fail": True}], ["square", {"n": 3}]]
    lenient = client.insert(Fan, {"children": kids})
    strict = client.insert(Fan, {"children": kids, "strict": True})
    drain(dsn, ALL, schema=schema)
    assert client.get(lenient).result == [
        [0, "done", 1, None],
        [1, "failed", None, "gave up after 1 attempts: ValueError('no square for 2')"],
        [2, "done", 9, None],
    ]
    inst = client.get(strict)
    assert inst.status == "failed"
    assert inst.last_error.startswith("ChildrenFailed: 1 of 3 children did not finish: child ")
    assert "(par_square #1) failed: gave up after 1 attempts" in inst.last_error


def test_each_fan_out_sees_its_own_children(dsn, schema, client):
    iid = client.insert(Twice, {})
    drain(dsn, ALL, schema=schema)
    assert client.get(iid).result == {"first": [4, 9], "second": [100], "all": 3}


def test_fail_fast_wakes_at_the_first_failure_and_cancels_the_siblings(dsn, schema, client):
    kids = [["waiter", {}], ["square", {"n": 2, "fail": True}], ["waiter", {}]]
    fast = client.insert(Fan, {"children": kids, "fail_fast": True})
    slow = client.insert(Fan, {"children": kids})
    drain(dsn, ALL, schema=schema)
    assert client.get(fast).result == [
        [0, "cancelled", None, None],
        [1, "failed", None, "gave up after 1 attempts: ValueError('no square for 2')"],
        [2, "cancelled", None, None],
    ]
    # Without fail_fast, the parent waits for the waiters, which never end.
    assert client.get(slow).status == "awaiting_children"
    assert client.get(slow).children_pending == 2


def test_fail_fast_waits_for_a_running_sibling_under_a_supervisor(tmp_path, dsn, schema, client):
    """The sibling's step is running when the parent wakes: the cancel marks it, the parent
    waits again (rejoin), and runs its step once the sibling's step returned and was
    cancelled."""
    sups: list = []
    try:
        start(sups, tmp_path, dsn, schema, modules='["tests.parallel_machines"]', extra="[queues.par]\n")
        kids = [["slow", {"seconds": 3}], ["square", {"n": 2, "fail": True}]]
        iid = client.insert(Fan, {"children": kids, "fail_fast": True})
        wait_until(lambda: client.get(iid).status == "done", timeout=60, what="the fan-out ended")
        assert client.get(iid).result == [
            [0, "cancelled", None, None],
            [1, "failed", None, "gave up after 1 attempts: ValueError('no square for 2')"],
        ]
        steps = [(a.step, a.outcome) for a in client.history(iid)]
        # The parent woke in collect, cancelled the sibling, waited for its step (rejoin).
        assert steps == [("fan_out", "spawn"), ("collect", "rejoin"), ("collect", "done")]
    finally:
        for s in sups:
            s.close()


def test_results_types():
    r = Results([ChildResult(1, "m", 0, "done", 2, None), ChildResult(2, "m", 1, "failed", None, "x")])
    assert not r.ok and [c.id for c in r.failed] == [2] and len(r) == 2 and r[0].value == 2
    with pytest.raises(ChildrenFailed, match=r"1 of 2 children did not finish: child 2 \(m #1\) failed: x"):
        r.values()


def test_a_child_whose_key_is_taken_leaves_its_position_empty(dsn, schema, client):
    iid = client.insert(Fan, {"children": [["square", {"n": n}] for n in range(3)]})
    # Spawn order i gets the key f"{iid}:{99 - i}": hold the middle child's key elsewhere.
    client.insert("par_nobody", {}, queue="elsewhere", correlation_key=f"{iid}:98")
    drain(dsn, ALL, schema=schema)
    assert client.get(iid).result == [[0, "done", 0, None], [2, "done", 4, None]]
