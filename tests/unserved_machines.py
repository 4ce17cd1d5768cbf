"""A job on a queue the test supervisors do not configure (tests/test_unserved.py)."""

from __future__ import annotations

from pgdurable import job


@job(queue="orphan")
def orphan(args: dict) -> dict:
    return args
