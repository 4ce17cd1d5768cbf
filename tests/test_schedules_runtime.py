"""Cron schedules fired by real supervisors (their maintenance processes): two of them on one
database fire an every-second schedule, each occurrence exactly once and none dropped; a
schedule created while the cron sleeps wakes it; a disable made before a start outlives it."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from pgdurable.db.queries import for_schema
from pgdurable.engine import schedules

from . import schedule_machines
from .supervised import start, wait_until

MODULES = '["tests.schedule_machines"]'
#: Occurrences the exactly-once test watches (one a second).
OCCURRENCES = 40


@pytest.fixture
def schedule_runs(db):
    db.execute("CREATE TABLE IF NOT EXISTS schedule_runs (key text, pid int, at timestamptz)")
    db.execute("TRUNCATE schedule_runs")
    yield
    db.execute("DROP TABLE IF EXISTS schedule_runs")


def _instances(db, schema: str) -> list[tuple[str, dt.datetime, str]]:
    return db.execute(
        f'SELECT correlation_key, inserted_at, status FROM "{schema}".instances WHERE fsm = %s ORDER BY id',
        ["tick"],
    ).fetchall()


def _at(key: str) -> dt.datetime:
    return dt.datetime.strptime(key.rpartition("@")[2], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def test_two_supervisors_fire_each_occurrence_once(dsn, schema, db, client, sups, tmp_path, schedule_runs):
    a = start(sups, tmp_path, dsn, schema, modules=MODULES, processes=1)
    b = start(sups, tmp_path, dsn, schema, modules=MODULES, processes=1)
    assert len(a.maintenance()) == 1 and len(b.maintenance()) == 1
    wait_until(lambda: len(_instances(db, schema)) >= OCCURRENCES, timeout=OCCURRENCES + 60, what="40 fires")
    assert a.stop() == 0 and b.stop() == 0

    fired = _instances(db, schema)
    keys = [k for k, _, _ in fired]
    assert len(keys) == len(set(keys)), "an occurrence was inserted twice"
    times = [_at(k) for k in keys]
    # every second from the first fire to the last, none missing, in order
    span = int((times[-1] - times[0]).total_seconds())
    assert times == [times[0] + dt.timedelta(seconds=s) for s in range(span + 1)]
    # never early (each is inserted at or after its time)
    assert all(inserted >= _at(k) for k, inserted, _ in fired)
    s = client.get_schedule("every-second")
    # none dropped by the missed policy: each pass came before the next second was due
    assert (s.fires, s.skipped, s.last_error) == (len(keys), 0, None)
    # every run that finished ran once
    done = [k for k, _, status in fired if status == "done"]
    runs = db.execute("SELECT key, count(*) FROM schedule_runs GROUP BY key").fetchall()
    assert {k: n for k, n in runs if k in done} == dict.fromkeys(done, 1)
    for sup in (a, b):
        assert "Traceback" not in sup.log.read_text()


def test_a_schedule_created_while_the_cron_sleeps_wakes_it(dsn, schema, db, client, sups, tmp_path):
    """The declared every-second schedule is disabled before the start (and stays so: the
    same code keeps an operator's disable), so the cron sleeps its longest (30 s); creating a
    schedule notifies it, and its first occurrence fires long before that sleep would end."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        schedules.register(conn, for_schema(schema), [schedule_machines.tick, schedule_machines.ping])
    client.disable_schedule("every-second")
    sup = start(sups, tmp_path, dsn, schema, modules=MODULES, processes=1)
    assert client.get_schedule("every-second").enabled is False
    made = client.create_schedule("soon", "ping", "* * * * * *", state={"hello": 1})

    def fired():
        row = db.execute(
            f'SELECT id FROM "{schema}".instances WHERE fsm = %s ORDER BY id LIMIT 1', ["ping"]
        ).fetchone()
        return row

    row = wait_until(fired, timeout=15, what="the new schedule's first fire (woken by NOTIFY)")
    inst = client.get(row[0])
    assert inst.correlation_key.startswith("schedule:soon@") and _at(
        inst.correlation_key
    ) >= made.created_at.replace(microsecond=0)
    assert (
        db.execute(f'SELECT count(*) FROM "{schema}".instances WHERE fsm = %s', ["tick"]).fetchone()[0] == 0
    )
    client.disable_schedule("soon")
    assert sup.stop() == 0
