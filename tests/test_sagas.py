"""Compensation (docs/sagas.md): the compensations of the completed steps run in reverse
order, as durable steps, when an instance fails or is cancelled — exactly once each, even
when a worker dies in one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pgdurable import FSM, DefinitionError, DrainLimitExceeded, Next, OperationRefused, saga, step
from pgdurable.client import Saga
from pgdurable.testing import drain

from .saga_machines import ALL, Doomed, Hooked, Leased, Order, Trip
from .supervised import start, wait_until


def ran(log) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_a_failure_compensates_the_completed_steps_in_reverse(dsn, schema, client, tmp_path):
    log = tmp_path / "log"
    iid = client.insert(Trip, {"log": str(log), "fail": True})
    drain(dsn, ALL, schema=schema)
    assert ran(log) == [
        "book_flight",
        "book_hotel",
        "cancel_hotel (RuntimeError('card declined'))",
        "cancel_flight (RuntimeError('card declined'))",
    ]
    inst = client.get(iid)
    assert inst.status == "failed"
    assert inst.last_error == "RuntimeError('card declined')"  # the failure, not a compensation's
    assert inst.saga == Saga("compensated", (), "RuntimeError('card declined')", "charge", 0)
    steps = [(a.step, a.outcome, a.next_step) for a in client.history(iid)]
    assert steps == [
        ("book_flight", "next", "book_hotel"),
        ("book_hotel", "next", "charge"),
        ("charge", "compensate", "cancel_hotel"),
        ("cancel_hotel", "next", "cancel_flight"),
        ("cancel_flight", "compensated", None),
    ]
    shown = show(dsn, schema, iid)
    assert "  saga        compensated after RuntimeError('card declined') in step charge\n" in shown.stdout
    doc = json.loads(show(dsn, schema, iid, "--json").stdout)
    assert doc["saga"]["mode"] == "compensated" and doc["saga"]["stack"] == []


def show(dsn, schema, iid, *more):
    run = subprocess.run(
        [sys.executable, "-m", "pgdurable", "show", str(iid), "--dsn", dsn, "--schema", schema, *more],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return run


def test_success_runs_no_compensation_and_keeps_what_a_failure_would_undo(dsn, schema, client, tmp_path):
    log = tmp_path / "log"
    iid = client.insert(Trip, {"log": str(log)})
    drain(dsn, ALL, schema=schema)
    assert ran(log) == ["book_flight", "book_hotel", "charge"]
    inst = client.get(iid)
    assert (inst.status, inst.result) == ("done", "booked")
    assert inst.saga == Saga(None, ("cancel_hotel", "cancel_flight"))
    assert "  saga        a failure would run: cancel_hotel, cancel_flight\n" in show(dsn, schema, iid).stdout


def test_a_compensation_that_keeps_failing_gives_up_and_the_chain_goes_on(dsn, schema, client, tmp_path):
    log = tmp_path / "log"
    iid = client.insert(Trip, {"log": str(log), "fail": True, "stuck": "cancel_hotel"})
    drain(dsn, ALL, schema=schema)
    assert ran(log) == ["book_flight", "book_hotel", "cancel_flight (RuntimeError('card declined'))"]
    inst = client.get(iid)
    assert inst.status == "failed" and inst.last_error == "RuntimeError('card declined')"
    assert inst.saga == Saga("compensation_failed", (), "RuntimeError('card declined')", "charge", 1)
    outcomes = [(a.step, a.attempt, a.outcome) for a in client.history(iid)][2:]
    assert outcomes == [
        ("charge", 0, "compensate"),
        ("cancel_hotel", 0, "retry"),  # compensation_attempts=2: one retry, then it gives up
        ("cancel_hotel", 1, "next"),
        ("cancel_flight", 0, "compensation_failed"),
    ]
    assert "ConnectionError: cancel_hotel: service down" in client.history(iid)[4].traceback


def test_cancel_compensates_and_ends_cancelled(dsn, schema, client, tmp_path):
    log = tmp_path / "log"
    iid = client.insert(Trip, {"log": str(log), "park": True})
    drain(dsn, ALL, schema=schema)
    assert client.get(iid).status == "awaiting_signal"
    assert client.cancel(iid, "changed plans").outcome == "cancelling"
    drain(dsn, ALL, schema=schema)
    assert ran(log)[2:] == [
        "cancel_hotel (cancelled: changed plans)",
        "cancel_flight (cancelled: changed plans)",
    ]
    inst = client.get(iid)
    assert (inst.status, inst.cancel_reason) == ("cancelled", "changed plans")
    assert inst.saga is not None and inst.saga.status == "compensated"


def test_cancel_without_compensation_ends_at_once(dsn, schema, client, tmp_path):
    log = tmp_path / "log"
    iid = client.insert(Trip, {"log": str(log), "park": True})
    drain(dsn, ALL, schema=schema)
    assert client.cancel(iid, compensate=False).outcome == "cancelled"
    drain(dsn, ALL, schema=schema)
    assert ran(log) == ["book_flight", "book_hotel"]
    assert client.get(iid).saga == Saga(None, ("cancel_hotel", "cancel_flight"))


def test_the_on_cancel_step_runs_first_then_the_compensations(dsn, schema, client, tmp_path):
    log = tmp_path / "log"
    iid = client.insert(Hooked, {"log": str(log)})
    drain(dsn, ALL, schema=schema)
    client.cancel(iid, "stop it")
    drain(dsn, ALL, schema=schema)
    assert ran(log) == ["reserve", "tidy (stop it)", "undo_reserve"]
    inst = client.get(iid)
    assert inst.status == "cancelled" and inst.saga is not None and inst.saga.status == "compensated"


def test_a_cancel_while_compensating_lets_the_compensations_finish(dsn, schema, client, tmp_path):
    log = tmp_path / "log"
    iid = client.insert(Trip, {"log": str(log), "fail": True, "stuck": "cancel_hotel"})
    # Four steps: the first two, the failing one, a first try of cancel_hotel; then cancel.
    with pytest.raises(DrainLimitExceeded):
        drain(dsn, ALL, schema=schema, max_steps=3)
    assert client.get(iid).saga.status == "compensating"
    assert client.cancel(iid, "give up").outcome == "cancelling"
    drain(dsn, ALL, schema=schema)
    inst = client.get(iid)
    assert (inst.status, inst.saga.status) == ("cancelled", "compensation_failed")
    assert ran(log)[-1] == "cancel_flight (RuntimeError('card declined'))"


def test_retry_refuses_a_compensated_instance_and_rewind_starts_it_afresh(dsn, schema, client, tmp_path):
    log = tmp_path / "log"
    iid = client.insert(Trip, {"log": str(log), "fail": True})
    drain(dsn, ALL, schema=schema)
    with pytest.raises(OperationRefused, match="compensated the steps it had completed"):
        client.retry(iid)
    assert client.retry_many(machine=Trip, dry_run=False).skipped == {"compensated": 1}
    client.rewind(iid, "book_flight", {"log": str(log)})
    assert client.get(iid).saga is None
    drain(dsn, ALL, schema=schema)
    assert client.get(iid).status == "done"


def test_saga_helper(dsn, schema, client, tmp_path):
    log = tmp_path / "log"
    ok = client.insert(Order, {"log": str(log)})
    bad = client.insert(Order, {"log": str(tmp_path / "bad"), "declined": True})
    drain(dsn, ALL, schema=schema)
    assert client.get(ok).result == {"log": str(log), "reserved": True, "charged": True}
    assert ran(tmp_path / "bad") == ["reserve_stock", "release_stock"]
    inst = client.get(bad)
    assert inst.status == "failed" and inst.saga is not None and inst.saga.status == "compensated"
    assert inst.last_error == "step charge_card gave up after 2 attempts: RuntimeError('declined')"


def test_definitions_are_checked():
    with pytest.raises(DefinitionError, match="compensate='nope' names no step"):

        class A(FSM, name="a_bad"):
            @step(initial=True, compensate="nope")
            def go(self, ctx):
                return Next(self.go)

    with pytest.raises(DefinitionError, match="cannot declare a compensation of its own"):

        class B(FSM, name="b_bad"):
            @step(initial=True, compensate="undo")
            def go(self, ctx):
                return None

            @step(compensate="go2")
            def undo(self, ctx):
                return None

            @step
            def go2(self, ctx):
                return None

    with pytest.raises(DefinitionError, match="must be named functions"):
        saga("s_bad", [(lambda s: s, None)])
    with pytest.raises(DefinitionError, match="at least one action"):
        saga("s_empty", [])


# --------------------------------------------------------------------------- crashes


def test_a_worker_killed_in_a_compensation_runs_each_compensation_once(tmp_path, dsn, schema, client):
    """The saga fails at step 3; its worker is killed (SIGKILL) during the first compensation.
    The supervisor returns the row, the compensation runs again, and each compensation's
    effect is recorded exactly once, in reverse order."""
    log = tmp_path / "log"
    sups: list = []
    try:
        start(sups, tmp_path, dsn, schema, modules='["tests.saga_machines"]', extra="[queues.sagas]\n")
        iid = client.insert(Trip, {"log": str(log), "fail": True, "kill": "cancel_hotel"})
        wait_until(lambda: client.get(iid).status == "failed", timeout=60, what="the saga compensated")
        assert (tmp_path / "log.killed").exists()  # the worker did die in the compensation
        assert ran(log) == [
            "book_flight",
            "book_hotel",
            "cancel_hotel (RuntimeError('card declined'))",
            "cancel_flight (RuntimeError('card declined'))",
        ]
        inst = client.get(iid)
        assert inst.saga == Saga("compensated", (), "RuntimeError('card declined')", "charge", 0)
        finished = [a.step for a in client.history(iid) if a.outcome in ("next", "compensated")]
        assert finished.count("cancel_hotel") == 1 and finished.count("cancel_flight") == 1

        # A step whose worker dies max_crashes times: the reclaim starts the compensations.
        doomed = client.insert(Doomed, {"log": str(tmp_path / "doomed")})
        wait_until(lambda: client.get(doomed).status == "failed", timeout=60, what="the doomed saga")
        assert ran(tmp_path / "doomed") == ["first", "undo (worker died 1 times in step second)"]
        d = client.get(doomed)
        assert d.last_error == "worker died 1 times in step second"
        assert d.saga == Saga("compensated", (), "worker died 1 times in step second", "second", 0)
    finally:
        for s in sups:
            s.close()


def test_a_deadline_compensates_completed_steps_with_an_async_undo(dsn, schema, client, tmp_path):
    """The deadline's fail mark goes through cancel_finish, which starts the compensations
    (and the compensation step may be async)."""
    log = tmp_path / "log"
    iid = client.insert(Leased, {"log": str(log)}, deadline=0.3)
    drain(dsn, ALL, schema=schema)
    assert client.get(iid).status == "awaiting_signal"

    def failed() -> bool:
        drain(dsn, ALL, schema=schema)  # runs the deadline statements on the real clock
        return client.get(iid).status == "failed"

    wait_until(failed, what="the deadline failed the lease")
    lines = ran(log)
    assert lines[0] == "lease" and lines[1].startswith("end_lease (deadline passed: not finished by ")
    inst = client.get(iid)
    assert inst.saga is not None and (inst.saga.status, inst.saga.step) == ("compensated", "close")
    assert inst.last_error.startswith("deadline passed: not finished by ")
