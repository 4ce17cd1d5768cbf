"""Limits with real worker processes and two supervisors on one database."""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
from collections import defaultdict

from pgdurable import Insert
from pgdurable.db.queries import for_schema
from pgdurable.runtime.sweeps import gc as maintenance

from .supervised import start, wait_until

LIMITS = """
[concurrency_limits]
gate = { limit = 3, shards = 2 }
cfg = { limit = 1 }

[rate_limits]
api = { allowed = 5, period = "1s", burst = 5 }
"""


def max_overlap(db, prefix: str) -> dict[str, int]:
    """Most steps of one key running at the same moment, from their start/end records."""
    rows = db.execute(
        "SELECT split_part(tag, '|', 1), what, at FROM runtime_runs WHERE tag LIKE %s ORDER BY at, what DESC",
        [prefix + "%"],
    ).fetchall()
    now: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    for key, what, _ in rows:
        now[key] += 1 if what == "start" else -1
        peak[key] = max(peak[key], now[key])
    return dict(peak)


def taken(db, schema) -> int:
    """Slots held right now over all gate counters (GC may prune idle shards: re-created full)."""
    return db.execute(f'SELECT COALESCE(sum(capacity - available), 0) FROM "{schema}".gate_slots').fetchone()[
        0
    ]


class Sampler(threading.Thread):
    """Samples slot holders and K=1 executors per key while a run goes on."""

    def __init__(self, db, schema):
        super().__init__(daemon=True)
        self.db, self.schema, self.peak, self.done = db, schema, defaultdict(int), threading.Event()
        self.start()

    def run(self):
        sql = (
            f"SELECT concurrency_key, count(*) FROM \"{self.schema}\".instances WHERE status = 'executing'"
            " AND concurrency_key IS NOT NULL AND (concurrency_shard IS NULL OR concurrency_shard >= 0)"
            " GROUP BY 1"
        )
        import psycopg

        with psycopg.connect(self.db.info.dsn, autocommit=True) as conn:
            while not self.done.wait(0.005):
                for key, n in conn.execute(sql):
                    self.peak[key] = max(self.peak[key], n)

    def stop(self):
        self.done.set()
        self.join(10)
        return dict(self.peak)


def test_keys_and_gates_hold_across_processes_and_supervisors(dsn, schema, client, db, sups, tmp_path, runs):
    for _ in range(2):
        start(sups, tmp_path, dsn, schema, processes=2, concurrency=4, prefetch=2, extra=LIMITS)
    sampler = Sampler(db, schema)
    jobs = [
        Insert("sleepy", {"tag": f"gate:1|{i}", "sleep": 0.05}, concurrency_key="gate:1") for i in range(30)
    ]
    jobs += [
        Insert("sleepy", {"tag": f"solo:{i % 3}|{i}", "sleep": 0.05}, concurrency_key=f"solo:{i % 3}")
        for i in range(30)
    ]
    ids = client.insert_many(jobs)
    for iid in ids:
        assert client.wait(iid, timeout=120).__class__.__name__ == "Done"
    sampled = sampler.stop()
    assert max(sampled.get("gate:1", 0), max_overlap(db, "gate:1")["gate:1"]) <= 3
    assert max_overlap(db, "gate:1")["gate:1"] >= 2  # the gate does let several through
    for k in ("solo:0", "solo:1", "solo:2"):
        assert sampled.get(k, 0) <= 1 and max_overlap(db, k)[k] == 1  # K = 1 serialised
    # different K=1 keys did run side by side
    intervals = db.execute(
        "SELECT split_part(tag, '|', 1) AS key, min(at) FILTER (WHERE what = 'start'),"
        " max(at) FILTER (WHERE what = 'end') FROM runtime_runs WHERE tag LIKE 'solo:%%'"
        " GROUP BY split_part(tag, '|', 2), 1"
    ).fetchall()
    overlapping = any(a[0] != b[0] and a[1] < b[2] and b[1] < a[2] for a in intervals for b in intervals)
    assert overlapping
    assert taken(db, schema) == 0  # every slot given back
    for s in sups:
        assert s.stop() == 0


def test_rate_limit_holds_across_supervisors(dsn, schema, client, db, sups, tmp_path, runs):
    for _ in range(2):
        start(sups, tmp_path, dsn, schema, processes=2, concurrency=10, prefetch=0, extra=LIMITS)
    ids = client.insert_many(
        [Insert("sleepy", {"tag": f"api|{i}", "sleep": 0}, rate_limit="api") for i in range(25)]
    )
    for iid in ids:
        assert client.wait(iid, timeout=120).__class__.__name__ == "Done"
    starts = [at for (at,) in db.execute("SELECT at FROM runtime_runs WHERE what = 'start' ORDER BY at")]
    assert len(starts) == 25
    # A token bucket (burst 5, 5/s) allows at most 5 + 5·w starts in any window of w seconds
    # (+1 for the grant-to-start delay of a row straddling the window's edge).
    for i, t0 in enumerate(starts):
        for w in (0.5, 1.0, 2.0):
            n = sum(1 for t in starts[i:] if t < t0 + dt.timedelta(seconds=w))
            assert n <= 5 + 5 * w + 1, (w, n)
    assert (starts[-1] - starts[0]).total_seconds() >= (25 - 5) / 5 - 0.5
    for s in sups:
        assert s.stop() == 0


def test_gate_counters_true_after_kill_9_mid_step(dsn, schema, client, db, sups, tmp_path):
    sup = start(sups, tmp_path, dsn, schema, processes=1, extra=LIMITS)
    marker = tmp_path / "marker"
    iid = client.insert("once_blocking", {"marker": str(marker)}, concurrency_key="gate:k")
    victim = int(wait_until(lambda: marker.exists() and marker.read_text(), what="the step to start"))
    assert taken(db, schema) == 1
    os.kill(victim, signal.SIGKILL)
    assert client.wait(iid, timeout=30).__class__.__name__ == "Done"
    assert taken(db, schema) == 0
    repaired, _ = maintenance.limits(db, for_schema(schema))
    assert repaired == 0  # the reclaim credited the slot itself; nothing left to repair
    assert sup.stop() == 0


def test_gate_limit_change_by_reload_while_rows_run(dsn, schema, client, db, sups, tmp_path, runs):
    sup = start(sups, tmp_path, dsn, schema, processes=2, concurrency=4, extra=LIMITS)
    ids = client.insert_many(
        [Insert("sleepy", {"tag": f"cfg:1|{i}", "sleep": 0.2}, concurrency_key="cfg:1") for i in range(12)]
    )
    wait_until(lambda: db.execute("SELECT count(*) FROM runtime_runs").fetchone()[0] >= 1, what="a start")
    assert max_overlap(db, "cfg:1")["cfg:1"] == 1
    sup.config.write_text(sup.config.read_text().replace("cfg = { limit = 1 }", "cfg = { limit = 2 }"))
    sup.proc.send_signal(signal.SIGHUP)
    for iid in ids:
        assert client.wait(iid, timeout=60).__class__.__name__ == "Done"
    assert max_overlap(db, "cfg:1")["cfg:1"] <= 2
    assert db.execute(
        f'SELECT available, capacity FROM "{schema}".gate_slots WHERE key = %s', ["cfg:1"]
    ).fetchone() == (2, 2)
    assert sup.stop() == 0


def test_misconfigured_limit_is_held_logged_and_counted(dsn, schema, client, sups, tmp_path):
    sup = start(sups, tmp_path, dsn, schema, processes=1, extra=LIMITS)
    iid = client.insert("stamp", {}, rate_limit="nope")
    wait_until(lambda: client.get(iid).status == "held", what="the row to be held")
    assert "rate limit 'nope' is not configured" in client.get(iid).last_error
    sup.wait_for("1 held by misconfigured limits", timeout=10)  # in systemd's STATUS
    assert sup.stop() == 0
    assert f"instance {iid} held: rate limit 'nope' is not configured" in sup.log.read_text()
