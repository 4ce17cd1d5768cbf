"""Step timeouts and step processes under a real supervisor: real workers, real threads, real
child processes killed with real signals.

Queue ``rt`` runs sync steps in the worker's threads (one process, one slot, no prefetch, so
the slot an overdue thread keeps is visible); queue ``iso`` runs them in step processes
(``isolation = "process"``, one worker, two slots).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from pgdurable.testing import assert_done, assert_failed

from . import timeout_machines as tm
from .supervised import ROOT, start, wait_until

ISO = """
[queues.iso]
processes = 1
concurrency = 2
prefetch = 0
isolation = "process"

[logging]
format = "json"
"""

SETTINGS = {
    "modules": '["tests.timeout_machines"]',
    "processes": 1,
    "concurrency": 1,
    "prefetch": 0,
    "extra": ISO,
}


def gone(pid: int) -> bool:
    """Dead or a zombie (the state follows the command name, which may hold spaces)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def events(sup, name: str) -> list[dict]:
    found = []
    for line in sup.log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == name:
                found.append(record)
    return found


def status_of(client, iid: int, *statuses: str):
    return wait_until(
        lambda: (i := client.get(iid)) is not None and i.status in statuses and i,
        what=f"instance {iid} {statuses}",
    )


def test_an_async_step_times_out_is_retried_then_fails_with_history(sups, tmp_path, dsn, schema, client):
    sup = start(sups, tmp_path, dsn, schema, **SETTINGS)
    iid = client.insert(tm.Hangs, {})
    status_of(client, iid, "failed")
    assert_failed(client, iid, "saw StepTimeout of start after 0.3 s")
    attempts = client.history(iid)
    assert [(a.attempt, a.outcome, a.error) for a in attempts] == [
        (0, "retry", "timeout start 0.3"),
        (1, "stop", "saw StepTimeout of start after 0.3 s"),
    ]
    assert "StepTimeout: step 'start' timed out after 0.3 s" in (attempts[1].traceback or "")
    job = client.insert(tm.slow_job, {})
    status_of(client, job, "failed")
    assert_failed(client, job, "gave up after 2 attempts: StepTimeout")
    assert sup.proc.poll() is None


def test_an_overdue_thread_fails_its_step_keeps_its_slot_and_its_late_return_is_ignored(
    sups, tmp_path, dsn, schema, client
):
    sup = start(sups, tmp_path, dsn, schema, **SETTINGS)
    release = tmp_path / "release"
    blocked = client.insert(tm.Blocks, {"release": str(release)})
    status_of(client, blocked, "failed")
    assert_failed(client, blocked, "StepTimeout(\"step 'start' timed out after 0.3 s\")")
    sup.wait_for("1 overdue")  # the worker reports the thread, the supervisor's status shows it
    [overdue] = wait_until(lambda: events(sup, "step_overdue"), what="the step_overdue line")
    assert (overdue["instance"], overdue["step"], overdue["timeout"]) == (blocked, "start", 0.3)

    # Its thread still holds the queue's one slot (concurrency = 1): a new row waits. Guard:
    # Slots.busy counts the overdue; without it this row would run beside the thread.
    quick = client.insert(tm.Quick, {})
    # Three status lines later (each from a fresh report of the worker), it still waits.
    statuses: list[str] = []

    def three() -> bool:
        statuses.extend(m for m in sup.sent_during(0.5) if m.startswith("STATUS="))
        return len(statuses) >= 3

    wait_until(three, what="three status lines")
    assert all("1 overdue" in m for m in statuses), statuses
    assert client.get(quick).status == "runnable"

    release.write_text("")  # the thread returns Done("late"): discarded
    status_of(client, quick, "done")
    wait_until(lambda: events(sup, "step_overdue_gone"), what="the step_overdue_gone line")
    inst = assert_failed(client, blocked, "StepTimeout")
    assert inst.result is None
    assert [a.outcome for a in client.history(blocked)] == ["stop"]


def test_a_step_process_past_its_timeout_is_killed_and_the_worker_goes_on(
    sups, tmp_path, dsn, schema, client
):
    sup = start(sups, tmp_path, dsn, schema, **SETTINGS)
    workers = sorted(sup.workers())
    pidfile = tmp_path / "hang.pid"
    hung = client.insert(tm.IsoHang, {"pidfile": str(pidfile)})
    status_of(client, hung, "failed")
    assert_failed(client, hung, "StepTimeout(\"step 'start' timed out after 2 s\")")
    child = int(pidfile.read_text())
    wait_until(lambda: gone(child), what="the overdue step process to be killed")
    assert child not in workers

    quick = [client.insert(tm.iso_quick, {}) for _ in range(4)]
    for iid in quick:
        status_of(client, iid, "done")
    iso_worker = {client.get(iid).result["ppid"] for iid in quick}
    assert len(iso_worker) == 1 and iso_worker <= set(workers)  # step processes of one worker
    assert all(client.get(iid).result["pid"] not in workers for iid in quick)
    assert sorted(sup.workers()) == workers  # no worker restarted
    [line] = events(sup, "step_overdue")
    assert line["instance"] == hung


def test_a_step_process_killed_from_outside_charges_only_its_row(sups, tmp_path, dsn, schema, client):
    sup = start(sups, tmp_path, dsn, schema, **SETTINGS)
    workers = sorted(sup.workers())
    release = tmp_path / "release"
    victim = client.insert(tm.IsoWaits, {"pidfile": str(tmp_path / "a.pid"), "release": str(release)})
    other = client.insert(tm.IsoWaits, {"pidfile": str(tmp_path / "b.pid"), "release": str(release)})
    pid_a = int(wait_until(lambda: (tmp_path / "a.pid").exists() and (tmp_path / "a.pid").read_text()))
    pid_b = int(wait_until(lambda: (tmp_path / "b.pid").exists() and (tmp_path / "b.pid").read_text()))
    assert pid_a != pid_b

    os.kill(pid_a, signal.SIGKILL)
    status_of(client, victim, "failed")
    assert_failed(client, victim, "step process died: signal 9")
    assert client.get(other).status == "executing"  # its neighbour in another process goes on

    release.write_text("")
    status_of(client, other, "done")
    assert_done(client, other, pid_b)
    again = client.insert(tm.iso_quick, {})  # a fresh process replaces the dead one
    status_of(client, again, "done")
    # An idle step process killed from outside is never charged to the row that comes next.
    idle = client.get(again).result["pid"]
    os.kill(idle, signal.SIGKILL)
    wait_until(lambda: gone(idle), what="the idle step process to die")
    after = [client.insert(tm.iso_quick, {}) for _ in range(2)]
    for iid in after:
        status_of(client, iid, "done", "failed")
        assert_done(client, iid)
    assert sorted(sup.workers()) == workers
    [died] = events(sup, "step_process_died")
    assert (died["instance"], died["child"]) == (victim, pid_a)


def test_every_outcome_and_error_crosses_the_process_boundary(sups, tmp_path, dsn, schema, client):
    sup = start(sups, tmp_path, dsn, schema, **SETTINGS)
    [worker] = [
        p
        for p in sup.workers()
        if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"pgdurable: worker iso")
    ]
    tour = client.insert(tm.IsoOutcomes, {})
    raises = client.insert(tm.IsoRaises, {})
    unpicklable = client.insert(tm.IsoRaises, {"unpicklable": True})
    exits = client.insert(tm.IsoExits, {})
    in_loop = client.insert(tm.IsoAsync, {})
    hangs = client.insert(tm.IsoAsync, {"hang": True})

    status_of(client, tour, "done", "failed")
    result = assert_done(client, tour).result
    assert (result["n"], result["children"]) == (3, [0, 10])
    assert result["parent_pid"] != worker
    assert [a.outcome for a in client.history(tour)] == ["next", "retry", "await", "spawn", "done"]

    status_of(client, raises, "failed")
    assert_failed(client, raises, "handled Boom: bang")
    inst = client.get(raises)
    assert "in the step process:" in (inst.last_traceback or "")
    assert "raise Boom" in (inst.last_traceback or "")
    status_of(client, unpicklable, "failed")
    assert_failed(client, unpicklable, "handled StepProcessError: Unpicklable: no pickle")
    status_of(client, exits, "failed")
    assert_failed(client, exits, "step process died: exit status 3")

    status_of(client, in_loop, "done")
    assert_done(client, in_loop, worker)  # an async step runs in the worker's own loop
    status_of(client, hangs, "failed")
    assert_failed(client, hangs, "StepTimeout")
    assert worker in sup.workers()
    logged = [e for e in events(sup, "step_log") if e.get("fsm") == "iso_child"]
    assert len(logged) == 2 and all(e["pid"] != worker for e in logged)  # ctx.log in the child


def test_a_bad_isolation_stops_the_supervisor_naming_the_key_and_the_file(tmp_path, dsn, schema):
    config = tmp_path / "bad.toml"
    config.write_text(f'[database]\ndsn = "{dsn}"\nschema = "{schema}"\n\n[queues.iso]\nisolation = "fork"\n')
    out = subprocess.run(
        [sys.executable, "-m", "pgdurable", "supervise", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert 'expected "thread" or "process", got \'fork\'' in text
    assert str(config) in text and "queues.iso.isolation" in text
    assert "Traceback" not in text


def test_a_graceful_stop_kills_the_step_processes_and_gives_their_rows_back(
    sups, tmp_path, dsn, schema, client
):
    sup = start(sups, tmp_path, dsn, schema, **{**SETTINGS, "drain_timeout": 1})
    pidfile = tmp_path / "w.pid"
    waits = client.insert(tm.IsoWaits, {"pidfile": str(pidfile), "release": str(tmp_path / "never")})
    child = int(wait_until(lambda: pidfile.exists() and pidfile.read_text()))
    assert sup.stop() == 0  # the step outlived the drain: its process is killed, the row given back
    assert gone(child)
    inst = client.get(waits)
    assert (inst.status, inst.attempt, inst.crashes) == ("runnable", 0, 0)
