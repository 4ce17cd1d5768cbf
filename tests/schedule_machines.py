"""Machines with declared schedules, run by real supervisors in tests/test_schedules_runtime.py
(imported by module name)."""

from __future__ import annotations

import os

import psycopg

from pgdurable import job, schedule


@schedule("* * * * * *", name="every-second")  # 6 fields: the leading one is seconds
@job(queue="rt", max_attempts=1)
def tick(args: dict, ctx):
    """Records each run (its occurrence key and worker pid) in the test's side table."""
    with psycopg.connect(os.environ["RUNTIME_TEST_DSN"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO schedule_runs (key, pid, at) VALUES (%s, %s, clock_timestamp())",
            [ctx.correlation_key, os.getpid()],
        )
    return ctx.correlation_key


@job(queue="rt", max_attempts=1)
def ping(args: dict, ctx):
    """A machine for the schedules a test creates at run time."""
    return args
