"""Cron schedules against a real database: the client's methods (sync and async), the cron
pass (``engine.schedules.fire_due``) at chosen times — missed runs, overlap, unknown
machines, disabled schedules — the registration of declared schedules, and the three
guards that make an occurrence fire once."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from zoneinfo import ZoneInfo

import psycopg
import pytest

from pgdurable import InvalidValue, NoTarget, UnknownMachine, job, schedule
from pgdurable.client import AsyncClient, ScheduleExists
from pgdurable.db.queries import for_schema
from pgdurable.engine import schedules
from pgdurable.engine.schedules import FireReport, fire_due, fire_one, occurrence_key
from pgdurable.testing import drain, fire_schedules

HOUR = dt.timedelta(hours=1)


@job(name="nightly", queue="cron_q")
def nightly(args: dict, ctx):
    return args


@job(name="ghost", queue="cron_q")
def ghost(args: dict, ctx):
    return args


def register(dsn: str, schema: str, *machines) -> None:
    """Register machines (and their declared schedules) as a supervisor does; fire nothing."""
    fire_schedules(dsn, list(machines), schema=schema, at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC))


def keys_of(db, schema: str, fsm: str = "nightly") -> list[str]:
    rows = db.execute(
        f'SELECT correlation_key FROM "{schema}".instances WHERE fsm = %s ORDER BY id', [fsm]
    ).fetchall()
    return [r[0] for r in rows]


@pytest.fixture
def hourly(dsn, schema, client):
    """An hourly schedule of a registered machine; its first fire is the next full hour."""
    register(dsn, schema, nightly)
    return client.create_schedule("hourly", "nightly", "0 * * * *", state={"n": 1})


# --------------------------------------------------------------------------- the client


def test_create_get_list_update_enable_disable_delete(dsn, schema, client):
    s = client.create_schedule(
        "report", nightly, "0 9 * * MON-FRI", tz="Europe/Paris", state={"kind": "daily"}, priority=3
    )
    assert (s.name, s.fsm, s.cron, s.timezone, s.state, s.priority) == (
        "report",
        "nightly",
        "0 9 * * MON-FRI",
        "Europe/Paris",
        {"kind": "daily"},
        3,
    )
    assert s.enabled and s.source == "api" and s.fires == 0
    local = s.next_fire_at.astimezone(dt.timezone(dt.timedelta(hours=1)))  # Paris in winter
    assert (local.hour, local.minute) == (9, 0) and local.weekday() < 5
    assert client.get_schedule("report") == s
    assert client.get_schedule("nope") is None
    with pytest.raises(ScheduleExists, match="schedule 'report' exists already"):
        client.create_schedule("report", "nightly", "@daily")

    changed = client.update_schedule("report", cron="@hourly", queue="elsewhere")
    assert (changed.cron, changed.queue, changed.timezone, changed.state) == (
        "@hourly",
        "elsewhere",
        "Europe/Paris",
        {"kind": "daily"},
    )
    assert changed.next_fire_at - s.created_at <= HOUR and changed.next_fire_at.minute == 0
    assert client.update_schedule("report", queue=None).queue is None

    assert client.disable_schedule("report") is True
    assert client.disable_schedule("report") is False
    assert client.get_schedule("report").enabled is False
    assert client.enable_schedule("report") is True
    assert client.enable_schedule("report") is False

    client.create_schedule("another", "nightly", "@daily", enabled=False)
    assert [x.name for x in client.schedules()] == ["another", "report"]
    client.delete_schedule("another")
    with pytest.raises(NoTarget, match="no schedule 'another'"):
        client.delete_schedule("another")
    for verb in (client.enable_schedule, client.disable_schedule, client.trigger_schedule):
        with pytest.raises(NoTarget):
            verb("another")
    with pytest.raises(NoTarget):
        client.update_schedule("another", cron="@daily")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "0 9 * *"}, "has 4 fields"),
        ({"cron": "@daily", "tz": "Moon/Base"}, "unknown time zone"),
        ({"cron": "@daily", "missed": "never"}, "missed must be one of"),
        ({"cron": "@daily", "overlap": "queue"}, "overlap must be one of"),
        ({"cron": "@daily", "missed": "catch_up", "catch_up_limit": 0}, "catch_up_limit must be"),
        ({"cron": "@daily", "priority": 10**6}, "priority must be an integer"),
        ({"cron": "@daily", "queue": ""}, "queue must be a non-empty name"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(client, kwargs, message):
    cron = kwargs.pop("cron")
    with pytest.raises(InvalidValue, match=message):
        client.create_schedule("bad", "nightly", cron, **kwargs)
    assert client.schedules() == []


def test_update_refuses_bad_input_and_keeps_the_schedule(client):
    client.create_schedule("s", "nightly", "@daily")
    with pytest.raises(InvalidValue, match="invalid cron expression"):
        client.update_schedule("s", cron="99 * * * *")
    with pytest.raises(TypeError, match="unexpected keyword argument .colour."):
        client.update_schedule("s", colour="red")  # type: ignore[call-arg]
    assert client.get_schedule("s").cron == "@daily"


def test_async_client(dsn, schema):
    register(dsn, schema, nightly)

    async def main() -> None:
        async with AsyncClient(dsn, schema=schema) as ac:
            s = await ac.create_schedule("a", "nightly", "*/5 * * * *", state={"x": 1})
            assert (await ac.get_schedule("a")) == s
            assert [x.name for x in await ac.schedules()] == ["a"]
            assert (await ac.update_schedule("a", overlap="skip")).overlap == "skip"
            assert await ac.disable_schedule("a") is True
            assert await ac.enable_schedule("a") is True
            iid = await ac.trigger_schedule("a")
            inst = await ac.get(iid)
            assert (inst.fsm, inst.state, inst.correlation_key.startswith("schedule:a@manual:")) == (
                "nightly",
                {"x": 1},
                True,
            )
            assert (await ac.get_schedule("a")).last_instance_id == iid
            await ac.delete_schedule("a")
            with pytest.raises(NoTarget):
                await ac.delete_schedule("a")

    asyncio.run(main())


def test_inside_the_callers_transaction(dsn, schema, client):
    with psycopg.connect(dsn) as conn:
        client.create_schedule("tx", "nightly", "@daily", conn=conn)
        assert client.get_schedule("tx") is None  # not committed yet
        conn.rollback()
    assert client.get_schedule("tx") is None


def test_trigger(dsn, schema, client, db):
    client.create_schedule("t", "ghost", "@daily", state={"a": 1})
    with pytest.raises(UnknownMachine, match="no supervisor of this schema registered"):
        client.trigger_schedule("t")
    register(dsn, schema, ghost)
    client.disable_schedule("t")  # a trigger fires a disabled schedule too
    iid = client.trigger_schedule("t")
    inst = client.get(iid)
    assert (inst.fsm, inst.queue, inst.state, inst.status) == ("ghost", "cron_q", {"a": 1}, "runnable")
    s = client.get_schedule("t")
    assert s.last_instance_id == iid and s.fires == 0 and s.next_fire_at is not None


# --------------------------------------------------------------------------- firing


def test_an_occurrence_fires_once_and_the_schedule_moves_on(dsn, schema, client, db, hourly):
    first = hourly.next_fire_at
    q = for_schema(schema)
    assert fire_schedules(dsn, schema=schema, at=first - dt.timedelta(seconds=1)).fired == []
    report = fire_schedules(dsn, schema=schema, at=first)
    key = occurrence_key("hourly", first)
    assert [(n, k) for n, k, _ in report.fired] == [("hourly", key)]
    assert report.fired[0][1] == f"schedule:hourly@{first:%Y-%m-%dT%H:%M:%S}Z"
    s = client.get_schedule("hourly")
    assert (s.next_fire_at, s.last_fire_at, s.fires, s.skipped) == (first + HOUR, first, 1, 0)
    assert s.last_instance_id == report.fired[0][2]
    inst = client.get(s.last_instance_id)
    assert (inst.fsm, inst.state, inst.queue, inst.status) == ("nightly", {"n": 1}, "cron_q", "runnable")
    # again at the same time: nothing is due
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert fire_due(conn, q, at=first + dt.timedelta(seconds=30)).fired == []
    assert keys_of(db, schema) == [key]
    assert schedules.seconds_until_due(db, q) > 0


def test_missed_skip_fires_the_latest_once(dsn, schema, client, db, hourly, caplog):
    first = hourly.next_fire_at
    with caplog.at_level(logging.WARNING, logger="pgdurable.cron"):
        report = fire_schedules(dsn, schema=schema, at=first + 5 * HOUR + dt.timedelta(minutes=30))
    assert [k for _, k, _ in report.fired] == [occurrence_key("hourly", first + 5 * HOUR)]
    assert report.skipped == 5
    s = client.get_schedule("hourly")
    assert (s.next_fire_at, s.fires, s.skipped) == (first + 6 * HOUR, 1, 5)
    assert [r.event for r in caplog.records if hasattr(r, "event")] == ["schedule_missed"]


def test_missed_catch_up_fires_up_to_its_limit(dsn, schema, client, db, hourly):
    client.update_schedule("hourly", missed="catch_up", catch_up_limit=3)
    first = hourly.next_fire_at
    report = fire_schedules(dsn, schema=schema, at=first + 5 * HOUR + dt.timedelta(minutes=30))
    assert keys_of(db, schema) == [occurrence_key("hourly", first + h * HOUR) for h in (3, 4, 5)]
    assert report.skipped == 3
    s = client.get_schedule("hourly")
    assert (s.fires, s.skipped, s.last_fire_at) == (3, 3, first + 5 * HOUR)
    # within the limit: every missed occurrence fires
    report = fire_schedules(dsn, schema=schema, at=first + 7 * HOUR)
    assert [k for _, k, _ in report.fired] == [occurrence_key("hourly", first + h * HOUR) for h in (6, 7)]
    assert report.skipped == 0


def test_overlap_allow_fires_while_the_previous_run_is_live(dsn, schema, client, db, hourly):
    first = hourly.next_fire_at
    fire_schedules(dsn, schema=schema, at=first)
    fire_schedules(dsn, schema=schema, at=first + HOUR)
    assert len(keys_of(db, schema)) == 2


def test_overlap_skip(dsn, schema, client, db, hourly, caplog):
    client.update_schedule("hourly", overlap="skip")
    first = hourly.next_fire_at
    fire_schedules(dsn, schema=schema, at=first)
    with caplog.at_level(logging.INFO, logger="pgdurable.cron"):
        report = fire_schedules(dsn, schema=schema, at=first + HOUR)  # the first run is runnable
    assert report.fired == [] and report.skipped == 1
    assert "schedule_overlap_skipped" in [getattr(r, "event", None) for r in caplog.records]
    s = client.get_schedule("hourly")
    assert (s.fires, s.skipped, s.next_fire_at) == (1, 1, first + 2 * HOUR)
    drain(dsn, [nightly], schema=schema)  # the previous run finishes: the next one fires
    report = fire_schedules(dsn, schema=schema, at=first + 2 * HOUR)
    assert [k for _, k, _ in report.fired] == [occurrence_key("hourly", first + 2 * HOUR)]


def test_overlap_cancel(dsn, schema, client, db, hourly):
    client.update_schedule("hourly", overlap="cancel")
    first = hourly.next_fire_at
    prev = fire_schedules(dsn, schema=schema, at=first).fired[0][2]
    report = fire_schedules(dsn, schema=schema, at=first + HOUR)
    assert report.cancelled == [prev]
    old = client.get(prev)
    assert old.status == "cancelled" and "superseded by its occurrence" in old.cancel_reason
    assert client.get(report.fired[0][2]).status == "runnable"
    drain(dsn, [nightly], schema=schema)
    report = fire_schedules(dsn, schema=schema, at=first + 2 * HOUR)  # previous done: nothing to cancel
    assert report.cancelled == [] and len(report.fired) == 1


def test_overlap_policies_fire_only_the_latest_of_a_catch_up(dsn, schema, client, db, hourly):
    client.update_schedule("hourly", overlap="skip", missed="catch_up", catch_up_limit=5)
    first = hourly.next_fire_at
    report = fire_schedules(dsn, schema=schema, at=first + 3 * HOUR)
    assert [k for _, k, _ in report.fired] == [occurrence_key("hourly", first + 3 * HOUR)]
    assert report.skipped == 3


def test_a_disabled_schedule_fires_nothing_and_an_enable_starts_from_now(dsn, schema, client, db, hourly):
    client.disable_schedule("hourly")
    first = hourly.next_fire_at
    assert fire_schedules(dsn, schema=schema, at=first + 10 * HOUR).fired == []
    assert keys_of(db, schema) == []
    client.enable_schedule("hourly")
    s = client.get_schedule("hourly")
    assert s.next_fire_at == first  # from now: the next full hour, what was missed is gone


def test_unknown_machine_is_reported_once_and_skipped_not_retried(dsn, schema, client, db, caplog):
    register(dsn, schema, nightly)
    s = client.create_schedule("haunted", "ghost", "0 * * * *")
    first = s.next_fire_at
    with caplog.at_level(logging.WARNING, logger="pgdurable.cron"):
        for h in range(3):
            report = fire_schedules(dsn, schema=schema, at=first + h * HOUR)
            assert report.fired == [] and "not registered" in report.errors["haunted"]
    warned = [r for r in caplog.records if getattr(r, "event", None) == "schedule_unknown_machine"]
    assert len(warned) == 1  # once, not at every occurrence
    s = client.get_schedule("haunted")
    assert "machine 'ghost' is not registered by any supervisor" in s.last_error
    assert (s.next_fire_at, s.skipped, s.fires) == (first + 3 * HOUR, 3, 0)  # moved on: no retry loop
    assert fire_schedules(dsn, schema=schema, at=first + 2 * HOUR).errors == {}  # nothing due
    # a deploy registers the machine: the next occurrence fires and clears the error
    report = fire_schedules(dsn, [ghost], schema=schema, at=first + 3 * HOUR)
    assert [n for n, _, _ in report.fired] == ["haunted"]
    s = client.get_schedule("haunted")
    assert (s.last_error, s.last_error_at, s.fires) == (None, None, 1)


def test_a_cron_broken_by_sql_disables_the_schedule_with_the_reason(dsn, schema, client, db, hourly):
    db.execute(f'UPDATE "{schema}".schedules SET cron = %s', ["not a cron"])
    report = fire_schedules(dsn, schema=schema, at=hourly.next_fire_at)
    assert "has 3 fields" in report.errors["hourly"]
    s = client.get_schedule("hourly")
    assert s.enabled is False and s.last_error.startswith("disabled: cron expression 'not a cron'")
    with pytest.raises(InvalidValue):
        client.enable_schedule("hourly")
    client.update_schedule("hourly", cron="@hourly")
    assert client.enable_schedule("hourly") is True
    assert client.get_schedule("hourly").last_error is None


def test_a_schedule_inserted_by_sql_gets_its_next_fire(dsn, schema, client, db):
    register(dsn, schema, nightly)
    db.execute(f"INSERT INTO \"{schema}\".schedules (name, fsm, cron) VALUES ('raw', 'nightly', '@daily')")
    fire_schedules(dsn, schema=schema)
    s = client.get_schedule("raw")
    assert s.next_fire_at is not None and (s.next_fire_at.hour, s.next_fire_at.minute) == (0, 0)


# --------------------------------------------------------------------------- registration


def test_declared_schedules_keep_an_operators_changes(dsn, schema, client, db):
    def declare(**kwargs):
        @schedule("0 6 * * *", name="digest", **kwargs)
        @job(name="digest_job", queue="cron_q")
        def digest(args: dict, ctx):
            return args

        return digest

    v1 = declare(state={"v": 1})
    register(dsn, schema, v1)
    s = client.get_schedule("digest")
    assert (s.source, s.fsm, s.cron, s.state, s.enabled) == (
        "code",
        "digest_job",
        "0 6 * * *",
        {"v": 1},
        True,
    )
    assert s.next_fire_at is not None

    # the operator disables it and moves it to 07:00: a restart of the same code keeps both
    client.disable_schedule("digest")
    client.update_schedule("digest", cron="0 7 * * *")
    register(dsn, schema, v1)
    s = client.get_schedule("digest")
    assert (s.enabled, s.cron) == (False, "0 7 * * *")

    # a deploy changes the state in code: the state follows, the operator's cron and disable stay
    register(dsn, schema, declare(state={"v": 2}))
    s = client.get_schedule("digest")
    assert (s.enabled, s.cron, s.state) == (False, "0 7 * * *", {"v": 2})

    # a deploy that changes the cron in code wins for the cron
    v3 = declare(state={"v": 2}, tz="Europe/Paris")
    register(dsn, schema, v3)
    assert client.get_schedule("digest").timezone == "Europe/Paris"
    client.enable_schedule("digest")
    before = client.get_schedule("digest").next_fire_at

    @schedule("30 6 * * *", name="digest", state={"v": 2}, tz="Europe/Paris")
    @job(name="digest_job", queue="cron_q")
    def v4(args: dict, ctx):
        return args

    register(dsn, schema, v4)
    s = client.get_schedule("digest")
    assert s.cron == "30 6 * * *" and s.next_fire_at != before
    paris = s.next_fire_at.astimezone(ZoneInfo("Europe/Paris"))
    assert (paris.hour, paris.minute) == (6, 30)

    # deleted at run time, a declared schedule comes back at the next start
    client.delete_schedule("digest")
    register(dsn, schema, v4)
    assert client.get_schedule("digest").source == "code"


# --------------------------------------------------------------------------- the guards


def _due_row(conn, q, at):
    rows = conn.execute(q["schedule_due_lock"], {"at": at, "limit": 10}).fetchall()
    assert len(rows) == 1
    return rows[0]


def test_guard_row_lock_a_second_pass_skips_a_schedule_being_fired(dsn, schema, client, db, hourly):
    """Guard 1, schedule_due_lock's FOR UPDATE SKIP LOCKED: while one pass holds the due
    schedule, another pass fires nothing and does not wait (without SKIP LOCKED it would
    wait and time out; without FOR UPDATE it would fire the occurrence too)."""
    q = for_schema(schema)
    at = hourly.next_fire_at
    with psycopg.connect(dsn) as holder:
        _due_row(holder, q, at)  # the first pass's transaction, left open
        with psycopg.connect(dsn, autocommit=True) as other:
            other.execute("SET lock_timeout = '3s'")
            report = fire_due(other, q, at=at)
        assert report.fired == [] and report.errors == {}
        report = FireReport()
        fire_one(holder, q, _due_row(holder, q, at), report)
        holder.commit()
    assert len(report.fired) == 1
    assert keys_of(db, schema) == [occurrence_key("hourly", at)]


def test_guard_advance_a_pass_that_read_a_stale_row_fires_nothing(dsn, schema, client, db, hourly):
    """Guard 2, schedule_advance's ``next_fire_at = old``: a pass that read the schedule
    before another pass fired and moved it on advances nothing and inserts nothing (without
    the guard it would advance it again: lost stays 0 and fires/last_fire_at change)."""
    q = for_schema(schema)
    at = hourly.next_fire_at
    with psycopg.connect(dsn) as stale:
        row = _due_row(stale, q, at)
        stale.rollback()  # it read the row, then lost its lock (as a pass without the lock would)
        fire_schedules(dsn, schema=schema, at=at)  # another pass fires the occurrence
        report = FireReport()
        fire_one(stale, q, row, report)
        stale.commit()
    assert (report.lost, report.fired) == (1, [])
    s = client.get_schedule("hourly")
    assert (s.fires, s.next_fire_at) == (1, at + HOUR)
    assert keys_of(db, schema) == [occurrence_key("hourly", at)]


def test_guard_key_an_occurrence_is_never_inserted_twice(dsn, schema, client, db, hourly):
    """Guard 3, the occurrence key reserved in every status: a pass that fires an occurrence
    again (here: the schedule set back by SQL to the occurrence it fired) inserts nothing,
    even after its run finished (with the default, live-only scope it would insert a second
    run)."""
    at = hourly.next_fire_at
    fire_schedules(dsn, schema=schema, at=at)
    drain(dsn, [nightly], schema=schema)
    db.execute(f'UPDATE "{schema}".schedules SET next_fire_at = %s', [at])
    report = fire_schedules(dsn, schema=schema, at=at)
    assert report.fired == [] and report.lost == 0
    assert keys_of(db, schema) == [occurrence_key("hourly", at)]
    assert client.get_schedule("hourly").fires == 1


def test_concurrent_passes_fire_each_occurrence_once(dsn, schema, client, db):
    """Eight passes at once, at each of 30 successive times, on 5 schedules."""
    register(dsn, schema, nightly)
    made = [client.create_schedule(f"s{i}", "nightly", "* * * * *") for i in range(5)]
    q = for_schema(schema)
    first = made[0].next_fire_at
    assert all(s.next_fire_at == first for s in made)
    minutes = [first + dt.timedelta(minutes=m) for m in range(30)]
    fired: list[tuple[str, str, int]] = []
    lock = threading.Lock()
    for at in minutes:
        barrier = threading.Barrier(8)

        def one_pass(at=at, barrier=barrier):
            with psycopg.connect(dsn, autocommit=True) as conn:
                barrier.wait()
                report = fire_due(conn, q, at=at)
            with lock:
                fired.extend(report.fired)

        threads = [threading.Thread(target=one_pass) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    expected = sorted(occurrence_key(f"s{i}", at) for i in range(5) for at in minutes)
    assert sorted(k for _, k, _ in fired) == expected  # each reported by exactly one pass
    assert sorted(keys_of(db, schema)) == expected
    assert [s.fires for s in client.schedules()] == [30] * 5
