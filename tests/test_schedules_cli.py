"""``pgdurable schedule list|create|update|enable|disable|trigger|delete``, each run as a real
subprocess: its --json parsed, its exit statuses (0 done, 2 bad input, 3 not there)."""

from __future__ import annotations

import datetime as dt

from pgdurable.testing import fire_schedules

from .test_cli import cli, data, ok, refusal
from .test_schedules import nightly


def test_schedule_verbs(dsn, schema, client):
    db = ["--dsn", dsn, "--schema", schema]
    fire_schedules(dsn, [nightly], schema=schema, at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC))  # registers it

    assert ok(cli("schedule", "list", *db)).strip() == "no schedules"
    assert data(cli("schedule", "list", "--json", *db)) == []

    made = data(
        cli(
            "schedule",
            "create",
            "report",
            "nightly",
            "0 9 * * MON-FRI",
            "--tz",
            "Europe/Paris",
            "--state",
            '{"kind": "daily"}',
            "--overlap",
            "skip",
            "--json",
            *db,
        )
    )
    assert {k: made[k] for k in ("name", "machine", "cron", "timezone", "state", "overlap", "enabled")} == {
        "name": "report",
        "machine": "nightly",
        "cron": "0 9 * * MON-FRI",
        "timezone": "Europe/Paris",
        "state": {"kind": "daily"},
        "overlap": "skip",
        "enabled": True,
    }
    assert made["next_fire_at"] == client.get_schedule("report").next_fire_at.isoformat().replace(
        "+00:00", "Z"
    )
    text = ok(cli("schedule", "create", "hourly", "nightly", "@hourly", *db))
    assert text.startswith("schedule hourly: machine nightly, cron '@hourly' in UTC, enabled")
    assert "next fire: " in text

    listed = data(cli("schedule", "list", "--json", *db))
    assert [s["name"] for s in listed] == ["hourly", "report"]
    table = ok(cli("schedule", "list", *db)).splitlines()
    assert table[0].split() == [
        "NAME",
        "MACHINE",
        "CRON",
        "ZONE",
        "ENABLED",
        "NEXT",
        "FIRE",
        "FIRES",
        "ERROR",
    ]
    assert table[1].startswith("hourly") and " UTC (in " in table[1]

    changed = data(
        cli("schedule", "update", "hourly", "--cron", "*/30 * * * *", "--queue", "other", "--json", *db)
    )
    assert (changed["cron"], changed["queue"]) == ("*/30 * * * *", "other")
    assert data(cli("schedule", "update", "hourly", "--machine-queue", "--json", *db))["queue"] is None

    assert ok(cli("schedule", "disable", "hourly", *db)).strip() == "schedule hourly disabled"
    assert ok(cli("schedule", "disable", "hourly", *db)).strip() == "schedule hourly was disabled already"
    enabled = data(cli("schedule", "enable", "hourly", "--json", *db))
    assert enabled["enabled"] is True and enabled["changed"] is True

    fired = data(cli("schedule", "trigger", "report", "--json", *db))
    assert fired["schedule"] == "report"
    inst = client.get(fired["id"])
    assert inst.fsm == "nightly" and inst.state == {"kind": "daily"}

    assert data(cli("schedule", "delete", "hourly", "--json", *db)) == {"schedule": "hourly", "deleted": True}
    assert [s.name for s in client.schedules()] == ["report"]

    # refusals: not there (3), taken (3), bad input (2), no machine registered (3)
    for verb in ("enable", "disable", "trigger", "delete"):
        assert refusal(cli("schedule", verb, "hourly", *db), 3) == "pgdurable: no schedule 'hourly'"
    assert refusal(cli("schedule", "update", "hourly", "--cron", "@daily", *db), 3) == (
        "pgdurable: no schedule 'hourly'"
    )
    assert "exists already" in refusal(cli("schedule", "create", "report", "nightly", "@daily", *db), 3)
    assert "invalid cron expression '61 * * * *'" in refusal(
        cli("schedule", "create", "x", "nightly", "61 * * * *", *db), 2
    )
    assert "unknown time zone 'Nowhere/City'" in refusal(
        cli("schedule", "create", "x", "nightly", "@daily", "--tz", "Nowhere/City", *db), 2
    )
    assert "--state is not valid JSON" in refusal(
        cli("schedule", "create", "x", "nightly", "@daily", "--state", "{", *db), 2
    )
    assert "nothing to change" in refusal(cli("schedule", "update", "report", *db), 2)
    ok(cli("schedule", "create", "spooky", "ghost", "@daily", *db))
    assert "no supervisor of this schema registered" in refusal(cli("schedule", "trigger", "spooky", *db), 3)
    assert client.get_schedule("x") is None

    # an occurrence of a schedule whose machine nobody registered: status reports it
    fire_schedules(dsn, schema=schema, at=client.get_schedule("spooky").next_fire_at)
    shown = data(cli("status", "--json", *db))
    assert [e["name"] for e in shown["schedule_errors"]] == ["spooky"]
    assert any(p.startswith("schedule spooky: machine 'ghost' is not registered") for p in shown["problems"])
    assert "schedule spooky: machine 'ghost' is not registered" in ok(cli("status", *db))
    assert "  schedule " in ok(cli("--help"))
