"""A snapshot held open for long is reported by the maintenance process (vacuum_held),
once, and its end too (vacuum_released)."""

from __future__ import annotations

import json
import time

import psycopg

from .supervised import start, wait_until


def events(sup, name):
    lines = [json.loads(line) for line in sup.log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


def test_a_snapshot_held_open_is_reported_once_then_its_end(tmp_path, dsn, schema):
    holder = psycopg.connect(dsn, application_name="stuck report")
    try:
        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT 1")  # the snapshot is taken: it holds back vacuum from now on
        pid = holder.info.backend_pid
        sups: list = []
        try:
            sup = start(
                sups,
                tmp_path,
                dsn,
                schema,
                snapshot_warning=0.5,
                extra='[logging]\nformat = "json"\n',
            )
            held = wait_until(lambda: events(sup, "vacuum_held"), what="a vacuum_held line")
            assert held[0]["holder"] == "transaction" and f"pid {pid}," in held[0]["who"]
            assert "application 'stuck report'" in held[0]["who"]
            assert held[0]["level"] == "warning" and held[0]["age"] > 0.5
            time.sleep(2)  # passes go on (0.5 s apart): the same holder is not reported again
            assert len(events(sup, "vacuum_held")) == 1
            holder.rollback()
            gone = wait_until(lambda: events(sup, "vacuum_released"), what="a vacuum_released line")
            assert f"pid {pid}," in gone[0]["who"]
        finally:
            for s in sups:
                s.close()
    finally:
        holder.close()
