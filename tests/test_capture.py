"""Log capture (docs/history.md#log-capture): what a step attempt logs is kept with its
history row, bounded, per attempt — and never another attempt's lines."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from pgdurable.contract.errors import ConfigError
from pgdurable.engine.capture import CaptureSettings
from pgdurable.runtime.config import parse
from pgdurable.testing import drain

from .capture_machines import Chatty, Pair
from .supervised import start, wait_until


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO)  # capture keeps what the loggers let through


def lines(attempt):
    return [(line.level, line.logger, line.message) for line in attempt.logs]


def test_a_step_attempt_keeps_its_log_lines_and_prints(dsn, schema, client):
    iid = client.insert(Chatty, {"amount": 42})
    drain(dsn, [Chatty], schema=schema, capture=CaptureSettings(prints=True))
    first, retried, second = client.history(iid)
    expected = [
        ("INFO", "pgdurable.step", "charging 42"),
        ("WARNING", "shop.payments", "slow gateway"),
        ("PRINT", "stdout", "a printed line"),
        ("PRINT", "stdout", "two words ended"),
    ]
    # Each attempt has its own lines; pgdurable's own line about the error is not among them.
    assert lines(first) == expected and first.outcome == "retry"
    assert lines(retried) == expected and retried.outcome == "next"
    assert second.logs == ()
    assert all(line.at.tzinfo is not None for line in first.logs)


def test_prints_are_not_kept_unless_asked_and_capture_can_be_off(dsn, schema, client):
    iid = client.insert(Chatty, {"amount": 1})
    drain(dsn, [Chatty], schema=schema)  # the default: log lines, no prints
    assert [m for _, _, m in lines(client.history(iid)[0])] == ["charging 1", "slow gateway"]
    off = client.insert(Chatty, {"amount": 2})
    drain(dsn, [Chatty], schema=schema, capture=None)
    assert all(a.logs == () for a in client.history(off))


def test_capture_is_bounded(dsn, schema, client):
    iid = client.insert(Chatty, {"amount": 3, "lines": 150, "long": True})
    drain(dsn, [Chatty], schema=schema, capture=CaptureSettings(lines=100, chars=2000))
    last = client.history(iid)[-1]
    assert len(last.logs) == 101
    assert last.logs[99].message == "line 99"
    assert last.logs[100].message == "[51 more lines not kept: at most 100 per attempt]"
    long = client.insert(Chatty, {"amount": 4, "long": True})
    drain(dsn, [Chatty], schema=schema)
    cut = client.history(long)[-1].logs[0].message
    assert len(cut) == 2000 and cut.startswith("[… 3000 characters cut]")


def test_steps_running_at_once_keep_their_own_lines_and_show_prints_them(tmp_path, dsn, schema, client):
    sups: list = []
    try:
        start(
            sups,
            tmp_path,
            dsn,
            schema,
            modules='["tests.capture_machines"]',
            processes=1,
            extra="[queues.cap]\nconcurrency = 4\n",
        )
        a, b = client.insert(Pair, {"name": "a"}), client.insert(Pair, {"name": "b"})
        for iid in (a, b):
            wait_until(lambda iid=iid: client.get(iid).status == "done", what="the pair talked")
        assert [m for _, _, m in lines(client.history(a)[0])] == ["a before", "a after"]
        assert [m for _, _, m in lines(client.history(b)[0])] == ["b before", "b after"]
        # They did run at once: b started before a finished.
        ha, hb = client.history(a)[0], client.history(b)[0]
        assert max(ha.started_at, hb.started_at) < min(ha.finished_at, hb.finished_at)
    finally:
        for s in sups:
            s.close()
    shown = subprocess.run(
        [sys.executable, "-m", "pgdurable", "show", str(a), "--dsn", dsn, "--schema", schema],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "logs of step talk, try 0\n" in shown.stdout
    assert " INFO    pgdurable.step: a before\n" in shown.stdout
    doc = json.loads(
        subprocess.run(
            [sys.executable, "-m", "pgdurable", "show", str(a), "--dsn", dsn, "--schema", schema, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
    assert [line["message"] for line in doc["history"][0]["logs"]] == ["a before", "a after"]


def test_capture_settings_in_the_config():
    base = {"runtime": {"modules": []}, "queues": {"q": {}}}
    cfg = parse({**base, "logging": {"capture_print": True, "capture_level": "warning"}}, "c.toml")
    assert cfg.logging.capture_settings() == CaptureSettings(logging.WARNING, 100, 2000, True)
    assert parse({**base, "logging": {"capture": False}}, "c.toml").logging.capture_settings() is None
    with pytest.raises(ConfigError, match=r"logging.capture_level"):
        parse({**base, "logging": {"capture_level": "loud"}}, "c.toml")
    with pytest.raises(ConfigError, match=r"at least 100 characters.*logging.capture_chars"):
        parse({**base, "logging": {"capture_chars": 10}}, "c.toml")


def test_a_sync_step_run_by_a_supervisor_keeps_its_lines(tmp_path, dsn, schema, client):
    """A worker runs sync steps on its own thread pool: the attempt's capture (a context
    variable) must follow the step there (the guard: run_sync in runtime/worker.py runs the
    step in a copy of the caller's context; without it this attempt keeps no line)."""
    sups: list = []
    try:
        start(sups, tmp_path, dsn, schema, modules='["tests.capture_machines"]', processes=1)
        iid = client.insert(Chatty, {"amount": 5}, queue="rt")
        wait_until(lambda: client.get(iid).status == "done", what="the sync steps ran")
    finally:
        for s in sups:
            s.close()
    first = client.history(iid)[0]
    assert ("INFO", "pgdurable.step", "charging 5") in lines(first)
    assert ("WARNING", "shop.payments", "slow gateway") in lines(first)
