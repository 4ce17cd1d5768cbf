"""The occurrences of a cron expression in a time zone (pgdurable.contract.schedule.Cron),
across daylight-saving changes, without a database: the next-fire computation with fixed
zones and fixed instants."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from pgdurable import FSM, DefinitionError, InvalidValue, job, schedule, step
from pgdurable.contract.schedule import Cron, declared_schedules

UTC = dt.UTC
PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def local(fires: list[dt.datetime], zone: ZoneInfo) -> list[str]:
    return [f.astimezone(zone).isoformat() for f in fires]


# --------------------------------------------------------------------------- spring forward
# Paris, 2026-03-29: at 02:00 (+01:00) the clocks jump to 03:00 (+02:00); 02:xx does not exist.


def test_a_daily_time_in_the_gap_fires_once_at_the_end_of_the_gap():
    fires = Cron.parse("30 2 * * *", "Europe/Paris").upcoming(utc(2026, 3, 27, 12), 3)
    assert local(fires, PARIS) == [
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",  # 02:30 did not exist: once, when the gap ends
        "2026-03-30T02:30:00+02:00",
    ]


def test_times_in_the_gap_collapse_into_one_fire():
    fires = Cron.parse("*/15 2 * * *", "Europe/Paris").upcoming(utc(2026, 3, 28, 23), 3)
    assert local(fires, PARIS) == [
        "2026-03-29T03:00:00+02:00",  # 02:00, 02:15, 02:30, 02:45: one fire
        "2026-03-30T02:00:00+02:00",
        "2026-03-30T02:15:00+02:00",
    ]


def test_an_hourly_schedule_fires_for_the_skipped_hour_once():
    fires = Cron.parse("30 * * * *", "Europe/Paris").upcoming(utc(2026, 3, 28, 23, 0), 4)
    assert local(fires, PARIS) == [
        "2026-03-29T00:30:00+01:00",
        "2026-03-29T01:30:00+01:00",
        "2026-03-29T03:00:00+02:00",  # the 02:30 that did not exist
        "2026-03-29T03:30:00+02:00",
    ]


# --------------------------------------------------------------------------- fall back
# Paris, 2026-10-25: at 03:00 (+02:00) the clocks go back to 02:00 (+01:00); 02:xx exists twice.


def test_an_ambiguous_daily_time_fires_once_at_its_first_instant():
    fires = Cron.parse("30 2 * * *", "Europe/Paris").upcoming(utc(2026, 10, 23, 12), 3)
    assert local(fires, PARIS) == [
        "2026-10-24T02:30:00+02:00",
        "2026-10-25T02:30:00+02:00",  # and not again at 02:30+01:00
        "2026-10-26T02:30:00+01:00",
    ]


def test_croniter_alone_fires_the_ambiguous_time_twice():
    """Why Cron asks croniter about wall times only: with an aware start, croniter (the
    version installed) returns 02:30 twice on the fall-back day. Should croniter change, this
    test says the wrapper may be simplified; the tests above hold either way."""
    from croniter import croniter

    it = croniter("30 2 * * *", dt.datetime(2026, 10, 24, 12, tzinfo=PARIS))
    fires = [it.get_next(dt.datetime) for _ in range(2)]
    assert [f.astimezone(UTC) for f in fires] == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 30)]


def test_an_hourly_schedule_fires_each_wall_time_of_the_repeated_hour_once():
    fires = Cron.parse("30 * * * *", "Europe/Paris").upcoming(utc(2026, 10, 24, 22, 0), 4)
    assert local(fires, PARIS) == [
        "2026-10-25T00:30:00+02:00",
        "2026-10-25T01:30:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T03:30:00+01:00",  # 02:30+01:00 is the same wall time: not again
    ]


def test_next_after_an_instant_inside_the_repeated_hour():
    cron = Cron.parse("*/15 * * * *", "Europe/Paris")
    # 02:10+01:00 is in the second pass of 02:xx: the next fire is 03:00+01:00
    assert local([cron.next_after(utc(2026, 10, 25, 1, 10))], PARIS) == ["2026-10-25T03:00:00+01:00"]


def test_new_york_both_changes():
    cron = Cron.parse("30 1 * * *", "America/New_York")  # 01:xx repeats on 2026-11-01
    assert local(cron.upcoming(utc(2026, 10, 31, 12), 2), NEW_YORK) == [
        "2026-11-01T01:30:00-04:00",
        "2026-11-02T01:30:00-05:00",
    ]
    cron = Cron.parse("30 2 * * *", "America/New_York")  # 02:xx is skipped on 2026-03-08
    assert local(cron.upcoming(utc(2026, 3, 7, 12), 2), NEW_YORK) == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-09T02:30:00-04:00",
    ]


# --------------------------------------------------------------------------- the latest due


def test_latest_occurrences_are_the_newest_oldest_first():
    cron = Cron.parse("0 * * * *", "UTC")
    got = cron.latest(utc(2026, 1, 1, 10, 30), since=utc(2026, 1, 1, 5), limit=3)
    assert got == [utc(2026, 1, 1, 8), utc(2026, 1, 1, 9), utc(2026, 1, 1, 10)]
    assert cron.latest(utc(2026, 1, 1, 10), since=utc(2026, 1, 1, 10), limit=5) == [utc(2026, 1, 1, 10)]
    assert cron.latest(utc(2026, 1, 1, 10, 30), since=utc(2026, 1, 1, 10, 1), limit=5) == []


def test_latest_inside_the_repeated_hour_sees_the_first_pass():
    cron = Cron.parse("*/15 * * * *", "Europe/Paris")
    got = cron.latest(utc(2026, 10, 25, 1, 10), since=utc(2026, 10, 25, 0, 0), limit=10)
    assert local(got, PARIS) == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:15:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:45:00+02:00",
    ]


# --------------------------------------------------------------------------- the syntax


def test_names_aliases_and_seconds():
    weekdays = Cron.parse("0 9 * * MON-FRI", "Europe/Paris").upcoming(utc(2026, 11, 27, 12), 2)  # a Friday
    assert local(weekdays, PARIS) == ["2026-11-30T09:00:00+01:00", "2026-12-01T09:00:00+01:00"]
    assert Cron.parse("0 0 1 JAN *").next_after(utc(2026, 3, 1)) == utc(2027, 1, 1)
    assert Cron.parse("@daily").next_after(utc(2026, 3, 1, 5)) == utc(2026, 3, 2)
    assert Cron.parse("@HOURLY").next_after(utc(2026, 3, 1, 5, 1)) == utc(2026, 3, 1, 6)
    every2 = Cron.parse("*/2 * * * * *")  # six fields: seconds first
    assert every2.seconds
    assert every2.upcoming(utc(2026, 1, 1, 0, 0, 1), 2) == [
        utc(2026, 1, 1, 0, 0, 2),
        utc(2026, 1, 1, 0, 0, 4),
    ]


@pytest.mark.parametrize(
    ("expr", "tz", "message"),
    [
        ("0 9 * *", "UTC", "has 4 fields"),
        ("0 0 9 * * * 2026", "UTC", "has 7 fields"),
        ("61 * * * *", "UTC", "invalid cron expression"),
        ("0 9 * * FUNDAY", "UTC", "invalid cron expression"),
        ("@fortnightly", "UTC", "unknown cron alias"),
        ("", "UTC", "a cron expression is needed"),
        ("0 9 * * *", "Europe/Pariss", "unknown time zone 'Europe/Pariss'"),
        ("0 9 * * *", "", "time zone must be an IANA name"),
    ],
)
def test_bad_input_is_named(expr, tz, message):
    with pytest.raises(InvalidValue, match=message):
        Cron.parse(expr, tz)


# --------------------------------------------------------------------------- declarations


def test_declarations_on_jobs_and_machines():
    @schedule("0 9 * * MON-FRI", tz="Europe/Paris", state={"kind": "daily"})
    @schedule("@hourly", name="hourly-report", overlap="skip")
    @job(name="report")
    def report(args: dict, ctx):
        return args

    @schedule("*/5 * * * *", missed="catch_up", catch_up_limit=3)
    class Sync(FSM, name="sync"):
        @step(initial=True)
        def run(self, ctx):
            return None

    decls = declared_schedules([report, Sync])
    assert [(d.name, d.fsm, d.cron) for d in decls] == [
        ("hourly-report", "report", "@hourly"),
        ("report", "report", "0 9 * * MON-FRI"),
        ("sync", "sync", "*/5 * * * *"),
    ]
    assert decls[1].tz == "Europe/Paris" and decls[1].document()["state"] == {"kind": "daily"}
    assert (decls[2].missed, decls[2].catch_up_limit) == ("catch_up", 3)


def test_bad_declarations_fail_at_import():
    with pytest.raises(InvalidValue, match="overlap must be one of"):
        schedule("@daily", overlap="queue")
    with pytest.raises(InvalidValue, match="catch_up_limit must be an integer >= 1"):
        schedule("@daily", missed="catch_up", catch_up_limit=0)
    with pytest.raises(InvalidValue, match="unknown time zone"):
        schedule("@daily", tz="Mars/Olympus")

    def plain(args: dict):
        return None

    with pytest.raises(DefinitionError, match="put @schedule above @job"):
        schedule("@daily")(plain)

    @schedule("@daily", name="same")
    @job(name="a")
    def a(args: dict):
        return None

    @schedule("@hourly", name="same")
    @job(name="b")
    def b(args: dict):
        return None

    with pytest.raises(DefinitionError, match="schedule 'same' is declared twice"):
        declared_schedules([a, b])
