"""The runtime with real processes and real signals: supervisors, workers, kill -9."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from psycopg import sql

from pgdurable import Insert
from pgdurable.db.migrations import latest
from pgdurable.runtime.systemd import Notifier

from .supervised import ROOT, Supervised, alive, start, wait_until


def statuses(db, schema):
    return dict(db.execute(f'SELECT status, count(*) FROM "{schema}".instances GROUP BY 1').fetchall())


def test_kill_9_worker_mid_step_reruns_at_once(dsn, schema, client, sups, tmp_path):
    sup = start(sups, tmp_path, dsn, schema, processes=1, lease=120)
    marker = tmp_path / "marker"
    iid = client.insert("once_blocking", {"marker": str(marker)})
    victim = int(wait_until(lambda: marker.exists() and marker.read_text(), what="the step to start"))
    assert victim in sup.workers()
    t = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    res = client.wait(iid, timeout=30)
    took = time.monotonic() - t
    assert res.result["crash_free_run_pid"] != victim
    assert took < 60, "re-ran only after the lease expired"  # lease is 120 s
    inst = client.get(iid)
    assert (inst.status, inst.attempt) == ("done", 0)  # a crash is not an attempt
    wait_until(lambda: len(sup.workers()) == 1, what="a replacement worker")
    assert sup.stop() == 0


def test_a_worker_runs_with_a_tuned_garbage_collector(dsn, schema, client, sups, tmp_path):
    """The collector of a worker process runs every 10,000 allocations, not Python's 700,
    and never traverses what the process had at start (frozen)."""
    import gc

    from pgdurable.runtime.forked import GC_THRESHOLDS

    sup = start(sups, tmp_path, dsn, schema, processes=1)
    res = client.wait(client.insert("gc_settings", {}), timeout=30)
    assert res.result["pid"] in sup.workers()
    assert tuple(res.result["threshold"]) == GC_THRESHOLDS != gc.get_threshold()
    assert res.result["frozen"] > 10_000  # the modules, the registry, the configuration
    assert sup.stop() == 0


def test_step_that_kills_its_worker_fails_after_max_crashes(dsn, schema, client, sups, tmp_path, runs):
    """Only the culprit fails: neighbours that were running or prefetched in the dying
    worker go back without being blamed, and the rest of the queue keeps flowing."""
    start(sups, tmp_path, dsn, schema, processes=1, concurrency=4, prefetch=4)
    good = client.insert_many([Insert("sleepy", {"tag": f"g{i}", "sleep": 0.3}) for i in range(6)])
    bad = client.insert("suicide", {})
    later = [client.insert("stamp", {}) for _ in range(5)]
    res = client.wait(bad, timeout=60)
    assert res.status == "failed" and res.error == "worker died 3 times in step perform"
    for iid in good + later:
        assert client.wait(iid, timeout=30).__class__.__name__ == "Done"
    assert sups[0].stop() == 0


def test_sigterm_during_load_drains(dsn, schema, client, db, sups, tmp_path, runs):
    sup = start(sups, tmp_path, dsn, schema, processes=1, concurrency=2, prefetch=4, drain_timeout=20)
    client.insert_many([Insert("sleepy", {"tag": f"j{i}", "sleep": 0.5}) for i in range(12)])
    wait_until(
        lambda: db.execute("SELECT count(*) FROM runtime_runs WHERE what = 'start'").fetchone()[0] >= 2,
        what="steps to start",
    )
    code = sup.stop()
    sup.wait_for("STOPPING=1", timeout=1)
    assert code == 0
    counts = statuses(db, schema)
    assert counts.get("executing", 0) == 0  # prefetched rows went back, in-flight ones finished
    started = {t for (t,) in db.execute("SELECT tag FROM runtime_runs WHERE what = 'start'")}
    ended = {t for (t,) in db.execute("SELECT tag FROM runtime_runs WHERE what = 'end'")}
    assert started == ended  # every step that started also finished
    assert counts.get("done", 0) == len(started) and counts.get("runnable", 0) == 12 - len(started)


def test_kill_9_supervisor_workers_exit_and_next_supervisor_recovers(
    dsn, schema, client, db, sups, tmp_path, runs
):
    sup = start(sups, tmp_path, dsn, schema, processes=2, concurrency=2, drain_timeout=1)
    ids = client.insert_many([Insert("sleepy", {"tag": f"k{i}", "sleep": 0.3}) for i in range(20)])
    wait_until(
        lambda: db.execute("SELECT count(*) FROM runtime_runs").fetchone()[0] >= 2, what="work to start"
    )
    workers = sup.workers()
    assert len(workers) == 2
    sup.kill()  # SIGKILL the supervisor only
    wait_until(lambda: not any(alive(p) for p in workers), timeout=30, what="orphaned workers to exit")
    start(sups, tmp_path, dsn, schema, processes=2, concurrency=2)
    for iid in ids:
        assert client.wait(iid, timeout=60).__class__.__name__ == "Done"
    assert statuses(db, schema) == {"done": 20}


def test_restarted_supervisor_reclaims_rows_of_its_dead_incarnation(dsn, schema, client, db, sups, tmp_path):
    sup = start(sups, tmp_path, dsn, schema, processes=1, lease=300)
    marker = tmp_path / "marker"
    iid = client.insert("once_blocking", {"marker": str(marker)})
    wait_until(marker.exists, what="the step to start")
    os.killpg(os.getpgid(sup.proc.pid), signal.SIGKILL)  # the whole host's pgdurable dies at once
    sup.proc.wait(10)
    assert client.get(iid).status == "executing"  # lease of 300 s still running
    sup.sock.close()
    sup.sock_path.unlink()
    again = Supervised(tmp_path, dsn, schema, name="sup0", processes=1, lease=300)  # same config
    sups.append(again)
    again.ready()
    res = client.wait(iid, timeout=30)  # well before the lease: reclaimed at start
    assert res.__class__.__name__ == "Done"


def test_a_node_reclaims_only_its_own_dead_incarnations(dsn, schema, client, sups, tmp_path):
    """Two hosts may share a host name: a starting supervisor takes over only the rows of
    its own node's dead incarnations (its node id, by default from /etc/machine-id and the
    config path), never those of another node with the same host name."""
    alpha = {"node_line": 'node_id = "alpha"'}
    beta = {"node_line": 'node_id = "beta"'}
    sup = start(sups, tmp_path, dsn, schema, processes=1, lease=300, **alpha)
    marker = tmp_path / "marker"
    iid = client.insert("once_blocking", {"marker": str(marker)})
    wait_until(marker.exists, what="the step to start")
    os.killpg(os.getpgid(sup.proc.pid), signal.SIGKILL)  # node alpha dies whole
    sup.proc.wait(10)
    start(sups, tmp_path, dsn, schema, processes=1, lease=300, **beta)  # same host name
    time.sleep(1.0)
    assert client.get(iid).status == "executing"  # not beta's to take
    start(sups, tmp_path, dsn, schema, processes=1, lease=300, **alpha)
    assert client.wait(iid, timeout=30).__class__.__name__ == "Done"  # alpha's successor took it


def test_two_supervisors_share_a_backlog_without_double_execution(
    dsn, schema, client, db, sups, tmp_path, runs
):
    start(sups, tmp_path, dsn, schema, processes=2, concurrency=3)
    start(sups, tmp_path, dsn, schema, processes=2, concurrency=3)
    ids = client.insert_many([Insert("sleepy", {"tag": f"t{i}", "sleep": 0.02}) for i in range(200)])
    for iid in ids:
        client.wait(iid, timeout=60)
    assert statuses(db, schema) == {"done": 200}
    per_tag = db.execute(
        "SELECT tag, count(*) FILTER (WHERE what = 'start') FROM runtime_runs GROUP BY tag"
    ).fetchall()
    assert len(per_tag) == 200 and all(n == 1 for _, n in per_tag)  # each step ran exactly once
    pids = {p for (p,) in db.execute("SELECT DISTINCT pid FROM runtime_runs")}
    workers = set(sups[0].workers()) | set(sups[1].workers())
    assert pids <= workers and pids & set(sups[0].workers()) and pids & set(sups[1].workers())


def test_idle_worker_wakes_on_notify_and_delayed_job_starts_on_time(dsn, schema, client, sups, tmp_path):
    start(sups, tmp_path, dsn, schema, processes=1, poll_ceiling=60)
    time.sleep(1.0)  # let the worker go idle on its 60 s poll ceiling
    t = time.time()
    now = client.insert("stamp", {})
    started = client.wait(now, timeout=20).result["started"]
    assert started - t < 10  # woken by the notification, not the 60 s poll
    t = time.time()
    later = client.insert("stamp", {}, schedule_in=2)
    started = client.wait(later, timeout=30).result["started"]
    assert 2.0 <= started - t < 10  # not before it is due, and not at the next 60 s poll


def test_delayed_work_starts_on_time_while_its_worker_is_busy(dsn, schema, client, sups, tmp_path, runs):
    """Next(delay=), Retry(delay=) and schedule_in start when due although their worker
    process has another step running all along (with a 10 s heartbeat and a 60 s poll
    ceiling, they used to start up to heartbeat - delay seconds late)."""
    start(sups, tmp_path, dsn, schema, processes=1, concurrency=4, heartbeat=10, poll_ceiling=60)
    busy = client.insert("sleepy", {"tag": "busy", "sleep": 12})
    wait_until(lambda: client.get(busy).status == "executing", what="the long step")
    time.sleep(0.5)
    nxt = client.insert("later", {"how": "next", "delay": 2})
    retry = client.insert("later", {"how": "retry", "delay": 2})
    t = time.time()
    scheduled = client.insert("stamp", {}, schedule_in=3)
    lateness = {
        "next": client.wait(nxt, timeout=30).result["late"],
        "retry": client.wait(retry, timeout=30).result["late"],
        "schedule_in": client.wait(scheduled, timeout=30).result["started"] - (t + 3),
    }
    for what, late in lateness.items():
        assert -0.05 <= late < 1.0, (what, lateness)
    assert client.get(busy).status == "executing", "the worker was busy all along"


@pytest.mark.parametrize("how", ["pool", "autocommit conn", "caller's transaction"])
def test_insert_many_wakes_an_idle_worker(dsn, schema, client, sups, tmp_path, how):
    """The COPY commits before its notification is sent (or with the caller's commit):
    the woken worker finds the rows, rather than waiting for its 60 s poll."""
    import psycopg

    start(sups, tmp_path, dsn, schema, processes=1, poll_ceiling=60)
    time.sleep(1.0)  # idle on its 60 s poll ceiling
    t = time.time()
    specs = [Insert("stamp", {}) for _ in range(3)]
    if how == "pool":
        ids = client.insert_many(specs)
    else:
        with psycopg.connect(dsn, autocommit=how == "autocommit conn") as conn:
            ids = client.insert_many(specs, conn=conn)
            if how == "caller's transaction":
                time.sleep(0.5)  # not visible, not notified, until the commit
                conn.commit()
    started = [client.wait(i, timeout=20).result["started"] for i in ids]
    assert max(started) - t < 10


def test_bad_config_names_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[runtime]\nlease = "long"\n[queues.q]\n')
    out = subprocess.run(
        [sys.executable, "-m", "pgdurable", "supervise", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode != 0
    assert "runtime.lease" in out.stderr and str(cfg) in out.stderr


def test_sighup_reloads_and_replaces_workers_without_losing_work(
    dsn, schema, client, db, sups, tmp_path, runs
):
    sup = start(sups, tmp_path, dsn, schema, processes=1, concurrency=2)
    old = sup.workers()
    ids = client.insert_many([Insert("sleepy", {"tag": f"h{i}", "sleep": 0.2}) for i in range(20)])
    wait_until(
        lambda: db.execute("SELECT count(*) FROM runtime_runs").fetchone()[0] >= 2, what="work to start"
    )
    sup.config.write_text(sup.config.read_text().replace("processes = 1", "processes = 2"))
    sup.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(set(sup.workers()) - set(old)) == 2, what="two new workers")
    wait_until(lambda: not any(alive(p) for p in old), what="the old worker to drain and exit")
    for iid in ids:
        assert client.wait(iid, timeout=60).__class__.__name__ == "Done"
    per_tag = db.execute(
        "SELECT tag, count(*) FILTER (WHERE what = 'start') FROM runtime_runs GROUP BY tag"
    ).fetchall()
    assert len(per_tag) == 20 and all(n == 1 for _, n in per_tag)
    assert sup.stop() == 0


def test_watchdog_only_while_workers_report(dsn, schema, sups, tmp_path):
    sup = start(sups, tmp_path, dsn, schema, processes=1, heartbeat=1)
    sup.messages.clear()
    sup.wait_for("WATCHDOG=1", timeout=10)
    (worker,) = sup.workers()
    os.kill(worker, signal.SIGSTOP)  # alive but silent: a fleet that stopped consuming
    try:
        time.sleep(6)  # past the 5 s report deadline
        fresh = sup.sent_during(3)
        assert any(m.startswith("STATUS=") for m in fresh)
        assert "WATCHDOG=1" not in fresh
    finally:
        os.kill(worker, signal.SIGCONT)
    sup.messages.clear()
    sup.wait_for("WATCHDOG=1", timeout=10)
    assert sup.stop() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_runs_a_real_supervisor_on_the_embedded_postgres(tmp_path):
    """The README's demo command, on a data directory of its own."""
    pytest.importorskip("pgserver")
    cfg = tmp_path / "demo.toml"
    text = (ROOT / "examples" / "demo.toml").read_text().replace("../.pgdurable/demo", "data")
    cfg.write_text(text.replace("127.0.0.1:9464", f"127.0.0.1:{free_port()}"))
    out = subprocess.run(
        [sys.executable, "-m", "pgdurable.demo", "--orders", "3", "--config", str(cfg)]
        + ["--dashboard", f"127.0.0.1:{free_port()}", "--log", str(tmp_path / "demo.log")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all 3 orders settled" in out.stdout
    assert "supervisor stopped (exit 0)" in out.stdout
    log = (tmp_path / "demo.log").read_text()
    assert "started for queue orders" in log and "supervisor stopped" in log
    assert "shipped" in log or "no payment" in log
    assert re.search(r"dashboard: http://127.0.0.1:\d+/  \(login: admin / \S+, for this run\)", out.stdout)
    assert "pgdurable dashboard on http://127.0.0.1:" in log
    assert re.search(r"metrics: http://127.0.0.1:\d+/metrics", out.stdout)
    assert re.search(r"orders: \d+ done, \d+ failed, \d+ in flight \| \d+ steps/s", out.stdout)


def test_await_timeout_fires_promptly_on_an_idle_queue(dsn, schema, client, sups, tmp_path):
    """The deadline sweep notifies: no wait for the 60 s poll ceiling."""
    start(sups, tmp_path, dsn, schema, processes=1, poll_ceiling=60)
    iid = client.insert("waiter", {"timeout": 1})
    t = time.time()
    res = client.wait(iid, timeout=30)
    assert res.result["timed_out"] and res.result["at"] - t < 10


def test_supervisor_refuses_to_start_on_a_schema_that_is_behind(dsn, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[database]\ndsn = "{dsn}"\nschema = "never_migrated"\n'
        '[runtime]\nmodules = ["tests.runtime_machines"]\n[queues.rt]\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "pgdurable", "supervise", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode != 0
    assert f"{latest()} migrations behind" in out.stderr and "pgdurable migrate" in out.stderr


def test_reaper_returns_rows_whose_lease_expired(dsn, schema, client, db, sups, tmp_path):
    """A worker that stops heartbeating (frozen, or its host gone) loses its rows to the
    reaper of any node; a crash is counted and its late outcome would be fenced off."""
    sup = start(sups, tmp_path, dsn, schema, processes=1, lease=2, heartbeat=1)
    marker = tmp_path / "marker"
    iid = client.insert("once_blocking", {"marker": str(marker)})
    wait_until(marker.exists, what="the step to start")
    (worker,) = sup.workers()
    os.kill(worker, signal.SIGSTOP)  # alive, holding the row, no more heartbeats
    try:
        inst = wait_until(
            lambda: (i := client.get(iid)).status != "executing" and i, timeout=30, what="the reaper"
        )
        assert inst.crashes == 1 and "lease expired" in inst.last_error
    finally:
        os.kill(worker, signal.SIGKILL)


def test_feeder_reconnects_and_listens_after_its_connection_is_killed(
    dsn, schema, client, db, sups, tmp_path
):
    # heartbeat = 30: an idle feeder looks on its own only every 30 s, so a job that
    # starts within 3 s was woken by a notification on the new connection.
    sup = start(sups, tmp_path, dsn, schema, processes=1, poll_ceiling=60, heartbeat=30)
    (worker,) = sup.workers()
    title = Path(f"/proc/{worker}/cmdline").read_bytes()
    assert title.startswith(b"pgdurable: worker rt 1/1")  # process titles say role and queue

    def feeder_pids():
        return {
            pid
            for (pid,) in db.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgdurable feeder rt'"
                " AND datname = current_database() AND state IS NOT NULL"
            )
        }

    (old,) = wait_until(feeder_pids, what="the feeder connection")
    names = [
        n
        for (n,) in db.execute(
            "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'pgdurable%%rt'"
            " AND datname = current_database()"
        )
    ]
    # the pool and the feeder, which LISTENs: no connection of its own for LISTEN
    assert names.count("pgdurable feeder rt") == 1 and set(names) <= {
        "pgdurable feeder rt",
        "pgdurable worker rt",
    }
    db.execute("SELECT pg_terminate_backend(%s)", [old])
    wait_until(lambda: (pids := feeder_pids()) and old not in pids, what="a new feeder connection")
    time.sleep(1.0)
    t = time.time()
    res = client.wait(client.insert("stamp", {}), timeout=20)
    assert res.result["started"] - t < 3  # woken by a notification again, not a 30 s look


def test_a_full_worker_keeps_probing_its_feeder_connection(dsn, schema, client, sups, tmp_path, runs):
    """A worker whose slots are all taken does not wait for notifications; it still probes
    its connection every heartbeat, so its reports stay healthy and systemd's watchdog is
    fed (stale after 3 × heartbeat + 5 s = 8 s here)."""
    sup = start(sups, tmp_path, dsn, schema, processes=1, concurrency=1, prefetch=0, heartbeat=1)
    iid = client.insert("sleepy", {"tag": "full", "sleep": 14})
    wait_until(lambda: client.get(iid).status == "executing", what="the long step to start")
    time.sleep(9)
    assert "WATCHDOG=1" in sup.sent_during(3)
    assert client.get(iid).status == "executing"  # still full while the watchdog was fed
    assert client.wait(iid, timeout=30).__class__.__name__ == "Done"


def test_inline_run_ahead_in_a_worker(dsn, schema, client, sups, tmp_path):
    sup = start(sups, tmp_path, dsn, schema, processes=2)
    ids = [client.insert("relay", {}) for _ in range(10)]
    for iid in ids:
        pids = client.wait(iid, timeout=30).result["pids"]
        assert len(pids) == 3 and len(set(pids)) == 1  # one worker ran the whole chain
    assert sup.stop() == 0


def test_heartbeat_keeps_a_long_step_owned(dsn, schema, client, db, sups, tmp_path, runs):
    """A step running twice as long as the lease is never reaped: one heartbeat statement
    keeps extending the leases of every row the worker holds."""
    start(sups, tmp_path, dsn, schema, processes=1, lease=2, heartbeat=0.5)
    iid = client.insert("sleepy", {"tag": "long", "sleep": 5})
    res = client.wait(iid, timeout=30)
    assert res.__class__.__name__ == "Done"
    assert db.execute("SELECT count(*) FROM runtime_runs WHERE what = 'start'").fetchone()[0] == 1
    assert client.get(iid).last_error is None  # never "reclaimed from …"


def test_ctrl_c_to_the_process_group_drains(dsn, schema, client, db, sups, tmp_path, runs):
    """Ctrl-C reaches every process of the group: workers ignore it, the supervisor drains."""
    sup = start(sups, tmp_path, dsn, schema, processes=2, concurrency=2)
    client.insert_many([Insert("sleepy", {"tag": f"c{i}", "sleep": 0.5}) for i in range(6)])
    wait_until(lambda: db.execute("SELECT count(*) FROM runtime_runs").fetchone()[0] >= 1, what="a start")
    os.killpg(os.getpgid(sup.proc.pid), signal.SIGINT)
    assert sup.proc.wait(60) == 0
    started = {t for (t,) in db.execute("SELECT tag FROM runtime_runs WHERE what = 'start'")}
    ended = {t for (t,) in db.execute("SELECT tag FROM runtime_runs WHERE what = 'end'")}
    assert started and started == ended  # in-flight steps finished, none was cut off
    assert statuses(db, schema).get("executing", 0) == 0


def test_slow_steps_keep_the_buffer_at_prefetch(dsn, schema, client, db, sups, tmp_path, runs):
    """Quick steps widen a process's buffer (bigger claims); slow ones never do, so a process
    does not sit on rows that another one could run."""
    start(sups, tmp_path, dsn, schema, processes=1, concurrency=1, prefetch=1)
    client.insert_many([Insert("sleepy", {"tag": f"s{i}", "sleep": 0.15}) for i in range(8)])
    held = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counts = statuses(db, schema)
        held.append(counts.get("executing", 0))
        if counts.get("done", 0) == 8:
            break
        time.sleep(0.03)
    assert statuses(db, schema).get("done", 0) == 8
    # one running, one prefetched, and one whose outcome is being committed: never the batch
    assert 2 <= max(held) <= 3


def test_buffer_grows_with_quick_steps_up_to_batch():
    import logging

    from pgdurable.contract.fsm import Registry
    from pgdurable.engine import Engine
    from pgdurable.runtime.config import parse
    from pgdurable.runtime.context import Runtime
    from pgdurable.runtime.slots import BUFFER_HORIZON, Slots

    def slots(prefetch: int) -> Slots:
        cfg = parse(
            {
                "database": {"dsn": "postgresql://unused"},
                "queues": {"q": {"concurrency": 10, "prefetch": prefetch, "batch": 50}},
            }
        )
        rt = Runtime(cfg, "postgresql://unused", "q", 0, Engine(Registry([])), None, logging.getLogger("t"))
        return Slots(rt, flusher=None)

    w = slots(10)
    assert w.room() == 20  # nothing measured yet: concurrency + prefetch
    w.step_time = 10 * BUFFER_HORIZON / 30  # ten slots start 30 rows within the horizon
    assert w.room() == 10 + 30
    w.step_time = 1e-5  # no-op steps: capped at the batch
    assert w.room() == 10 + 50
    w.step_time = 5.0  # slow steps: the configured prefetch, no more
    assert w.room() == 20
    w0 = slots(0)
    w0.step_time = 1e-5
    assert w0.room() == 10  # prefetch = 0: no buffer, however quick the steps


def test_a_freed_slot_starts_the_next_buffered_row_without_the_feeder():
    """A step that returns frees its slot for the next buffered row at once: with one slot
    and three rows claimed in one batch, all three run although no feeder runs (before, a
    freed slot waited for the feeder's next round, a claim's round trip away)."""
    import asyncio
    import datetime as dt
    import logging
    from types import SimpleNamespace

    from pgdurable.engine.claim import Claimed
    from pgdurable.runtime.config import parse
    from pgdurable.runtime.context import Runtime
    from pgdurable.runtime.slots import Slots

    ran: list[int] = []

    async def run(row: Claimed) -> SimpleNamespace:
        ran.append(row.id)
        return SimpleNamespace(inline=False)

    async def submit(result: SimpleNamespace) -> bool:
        return True

    engine = SimpleNamespace(run=run, transactional=lambda row: False, keeps_snapshot=lambda row: False)
    cfg = parse({"database": {"dsn": "postgresql://unused"}, "queues": {"q": {"concurrency": 1}}})
    rt = Runtime(cfg, "postgresql://unused", "q", 0, engine, None, logging.getLogger("t"))  # type: ignore[arg-type]
    now = dt.datetime.now(dt.UTC)
    rows = [
        Claimed(i, "m", 1, "s", "{}", 0, 0, "q", 0, now, None, None, None, None, 1.0, None,
                False, False, False, None, None, None, None)
        for i in (1, 2, 3)
    ]  # fmt: skip

    async def main() -> None:
        slots = Slots(rt, SimpleNamespace(submit=submit))  # type: ignore[arg-type]
        slots.fill(rows)
        assert len(slots.running) == 1 and len(slots.buffer) == 2  # one slot
        for _ in range(50):
            if len(ran) == 3 and not slots.tasks:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert ran == [1, 2, 3]


def test_idle_worker_does_not_spin_on_rows_held_elsewhere(dsn, schema, client, db, sups, tmp_path, runs):
    """A due row whose concurrency key is busy cannot be claimed; the idle process pauses
    between looks instead of claiming in a tight loop until the key frees."""
    start(sups, tmp_path, dsn, schema, processes=2, concurrency=2)
    first = client.insert("sleepy", {"tag": "holder", "sleep": 3}, concurrency_key="k")
    wait_until(lambda: db.execute("SELECT count(*) FROM runtime_runs").fetchone()[0] >= 1, what="holder")
    second = client.insert("sleepy", {"tag": "waiter", "sleep": 0}, concurrency_key="k")

    def commits() -> int:
        return db.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0]

    time.sleep(1.0)  # statistics reach the view about once a second
    before = commits()
    time.sleep(1.5)
    looked = commits() - before
    assert client.wait(first, timeout=30).__class__.__name__ == "Done"
    assert client.wait(second, timeout=30).__class__.__name__ == "Done"
    # two idle-ish processes looking every 50 ms, plus heartbeats: well under 200 a second
    # (spinning, each looks every millisecond or so)
    assert looked < 300, looked


def test_sd_notify_never_blocks_the_supervisor(tmp_path):
    """A receiver that does not read (systemd busy): the supervisor drops messages instead
    of stopping in sendto() once the socket's queue is full."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    notifier = Notifier(str(tmp_path / "notify"))
    sender = threading.Thread(target=lambda: [notifier.send("STATUS=x") for _ in range(1000)], daemon=True)
    sender.start()
    sender.join(10)
    try:
        assert not sender.is_alive()
        assert sock.recv(100) == b"STATUS=x"  # what fitted was delivered
    finally:
        notifier.close()
        sock.close()


def test_ready_is_sent_again_when_systemd_missed_it(dsn, schema, sups, tmp_path):
    """The notify socket's queue is full when the workers are up: READY=1 is dropped, and
    the supervisor sends it again with a later status instead of never."""
    qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    sup = Supervised(tmp_path, dsn, schema, processes=1, prefill=qlen + 1)  # full past qlen
    sups.append(sup)
    time.sleep(6)  # workers up, READY=1 tried against the full queue
    sup.ready()
    assert "X=filler" in sup.messages  # the queue was full indeed
    assert sup.stop() == 0


def test_failing_claims_back_off_and_a_stop_cuts_the_back_off_short(dsn, schema, client, db, sups, tmp_path):
    """Claims that keep failing are retried after a growing back-off (not in a loop), and
    SIGTERM during a long back-off stops the worker at once rather than after it."""
    sup = start(sups, tmp_path, dsn, schema, processes=1)
    # Every claim now fails (its UPDATE to 'executing' violates the constraint); inserts work.
    table = sql.Identifier(schema, "instances")
    forbid = "ALTER TABLE {} ADD CONSTRAINT no_claims CHECK (status <> 'executing') NOT VALID"
    db.execute(sql.SQL(forbid).format(table))
    try:
        client.insert("stamp", {})

        def failures() -> int:
            return sup.log.read_text().count("claim failed")

        wait_until(lambda: failures() >= 1, timeout=30, what="a failed claim")
        t0 = time.monotonic()
        wait_until(lambda: failures() >= 4, timeout=30, what="four failed claims")
        # the first back-offs are short (0.05-0.1, 0.1-0.2, 0.2-0.4 s): not a second each
        assert time.monotonic() - t0 < 2.0
        wait_until(lambda: failures() >= 7, timeout=30, what="seven failed claims")
        # ...and they grow (0.4-0.8, 0.8-1.6, 1.6-3.2 s next): not a tight loop either
        assert time.monotonic() - t0 >= 2.5
        # the seventh back-off is 2.5-5 s long; a stop does not wait for it
        t1 = time.monotonic()
        assert sup.stop() == 0
        assert time.monotonic() - t1 < 2.0
        assert failures() <= 8
    finally:
        db.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT no_claims").format(table))
