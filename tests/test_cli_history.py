"""``pgdurable show`` prints the step history as a timeline and the last traceback."""

from __future__ import annotations

import json

from pgdurable.client import Client
from pgdurable.testing import drain

from .machines import Boom, Counter
from .test_cli import cli


def test_show_prints_the_history_and_the_traceback(dsn, schema):
    db = ["--dsn", dsn, "--schema", schema]
    with Client(dsn, schema=schema) as client:
        boom, counter = client.insert(Boom, {}), client.insert(Counter, {"n": 0})
        drain(dsn, [Boom, Counter], schema=schema)
    res = cli("show", str(boom), *db)  # prints the step's stored traceback: a Traceback is expected
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert "history (the last 1 step attempts, oldest first)" in res.stdout
    assert "traceback\n" in res.stdout and "ValueError: kaboom" in res.stdout
    doc = json.loads(cli("show", str(boom), "--json", *db).stdout)
    assert [(h["step"], h["outcome"]) for h in doc["history"]] == [("go", "stop")]
    assert doc["last_traceback"].startswith("Traceback") and "kaboom" in doc["history"][0]["traceback"]

    doc = json.loads(cli("show", str(counter), "--json", "--history", "2", *db).stdout)
    assert [(h["step"], h["outcome"], h["next_step"]) for h in doc["history"]] == [
        ("bump", "next", "finish"),
        ("finish", "done", None),
    ]  # the last two of five attempts, oldest first
    assert doc["last_traceback"] is None
    assert json.loads(cli("show", str(counter), "--json", "--history", "0", *db).stdout)["history"] == []
