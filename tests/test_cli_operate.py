"""The verbs that act: ``cancel``, ``retry``, ``rewind``, ``pause``, ``resume`` — each run as a
real subprocess (the history in ``show``: tests/test_cli_history.py)."""

from __future__ import annotations

import json

from pgdurable.client import Client
from pgdurable.testing import drain

from .machines import Boom, Counter
from .test_cli import cli, ok


def test_retry_cancel_rewind_pause_resume(dsn, schema):
    db = ["--dsn", dsn, "--schema", schema]
    with Client(dsn, schema=schema) as client:
        boom = client.insert(Boom, {})
        drain(dsn, [Boom], schema=schema)
        assert client.get(boom).status == "failed"

        # retry by filter: a dry run counts, then one by id
        dry = json.loads(ok(cli("retry", "--machine", "boom", "--dry-run", "--json", *db)))
        assert dry == {"matched": 1, "retried": 0, "skipped": {}, "dry_run": True}
        assert client.get(boom).status == "failed"
        out = ok(cli("retry", str(boom), *db))
        assert out.strip() == f"instance {boom} retries step {client.get(boom).step!r}"
        assert client.get(boom).status == "runnable"
        assert "give an instance ID, or filters" in cli("retry", *db).stderr

        # cancel a runnable instance; a second cancel finds it finished
        out = ok(cli("cancel", str(boom), "--reason", "operator", *db))
        assert out.strip() == f"instance {boom}: cancelled"
        assert client.get(boom).status == "cancelled"
        again = json.loads(ok(cli("cancel", str(boom), "--json", *db)))
        assert again["outcome"] == "terminal" and again["status"] == "cancelled"
        assert cli("cancel", "999999", *db).returncode == 3

        # rewind a finished counter to its first step with a new state
        counter = client.insert(Counter, {"n": 0})
        drain(dsn, [Counter], schema=schema)
        assert client.get(counter).status == "done"
        first = client.history(counter)[0].step
        ok(cli("rewind", str(counter), first, '{"n": 5}', *db))
        inst = client.get(counter)
        assert inst.status == "runnable" and inst.step == first and inst.state == {"n": 5}
        assert cli("rewind", str(counter), "no_such_step", *db).returncode == 3

        # pause and resume a queue
        assert ok(cli("pause", "counting", *db)).strip() == "queue counting paused"
        assert ok(cli("pause", "counting", *db)).strip() == "queue counting was paused already"
        assert "counting" in client.paused()
        shown = json.loads(ok(cli("status", "--json", *db)))
        assert {e["queue"]: e["paused"] for e in shown["queues"]}["counting"] is True
        assert "counting (paused)" in ok(cli("status", *db))
        assert ok(cli("resume", "counting", *db)).strip() == "queue counting resumed"
        assert client.paused() == {}
