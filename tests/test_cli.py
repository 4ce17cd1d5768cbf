"""The ``pgdurable`` command's verbs, each run as a real subprocess on a populated database.

Instances in several statuses are made with the client and ``testing.drain``; every verb's
text and ``--json`` output and exit status are checked against them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgdurable import Insert
from pgdurable.client import Client
from pgdurable.db import migrations
from pgdurable.db.queries import for_schema
from pgdurable.testing import drain

from .coord_machines import Leaf, Parent, Payment
from .machines import Boom, Counter, Handled, send_email

ROOT = Path(__file__).resolve().parent.parent
MACHINES = [Counter, send_email, Boom, Payment, Parent, Leaf]
VERBS = [
    "migrate",
    "supervise",
    "status",
    "list",
    "show",
    "insert",
    "signal",
    "inputs",
    "respond",
    "cancel",
    "retry",
    "rewind",
    "pause",
    "resume",
    "cleanup",
    "check",
    "graph",
]
QUEUES = ["counting", "default", "email", "pay", "kids", "parents"]


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pgdurable`` from the repository root (so ``tests.machines`` imports)."""
    base = {k: v for k, v in os.environ.items() if k != "PGDURABLE_DSN"}
    return subprocess.run(
        [sys.executable, "-m", "pgdurable", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**base, **(env or {})},
        input=stdin,
    )


def ok(res: subprocess.CompletedProcess[str], code: int = 0) -> str:
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    return res.stdout


def data(res: subprocess.CompletedProcess[str], code: int = 0):
    return json.loads(ok(res, code))


def refusal(res: subprocess.CompletedProcess[str], code: int) -> str:
    """The one line an error prints on stderr."""
    ok(res, code)
    line = res.stderr.strip()
    assert line.startswith("pgdurable: ") and "\n" not in line, res.stderr
    return line


def write_config(tmp_path: Path, dsn: str, schema: str, queues=QUEUES, modules=None) -> Path:
    modules = modules or ["tests.machines", "tests.coord_machines"]
    path = tmp_path / "config.toml"
    body = f'[database]\ndsn = "{dsn}"\nschema = "{schema}"\n\n[runtime]\nmodules = {json.dumps(modules)}\n'
    body += "".join(f"\n[queues.{q}]\n" for q in queues)
    path.write_text(body)
    return path


@dataclass
class World:
    dsn: str
    schema: str
    counters: list[int]
    email_ok: int
    email_bad: int
    boom: int
    payment: int
    parent: int
    waiting: int
    later: int

    def db(self, *args: str) -> list[str]:
        return [*args, "--dsn", self.dsn, "--schema", self.schema]


def populate(dsn: str, schema: str) -> World:
    with Client(dsn, schema=schema) as c:
        counters = [c.insert(Counter, {"limit": 2}) for _ in range(3)]
        email_ok = c.insert(send_email, {"to": "a@example.com"})
        email_bad = c.insert(send_email, {"to": "b@example.com", "fail": 5})
        boom = c.insert(Boom, {})
        payment = c.insert(Payment, {}, correlation_key="order:42")
        parent = c.insert(Parent, {"values": [1, 2, 3], "fail": [2]})
        drain(dsn, MACHINES, schema=schema)
        waiting = c.insert(Counter, {"limit": 1})  # due, never run: nobody works here
        later = c.insert(Counter, {}, schedule_in=3600)
        c.signal("order:42", "note", {"n": 1}, dedup_key="n1")
    return World(dsn, schema, counters, email_ok, email_bad, boom, payment, parent, waiting, later)


@pytest.fixture(scope="module")
def world(dsn):
    """One populated schema for the read-only verbs (populating it is the slow part)."""
    schema = f"cli_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn, schema)
    try:
        yield populate(dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def fresh(dsn, schema):
    """A populated schema of this test's own, for the verbs that change it."""
    return populate(dsn, schema)


# --------------------------------------------------------------------------- the command itself


def test_help_lists_every_verb_and_each_verb_has_help():
    top = ok(cli("--help"))
    for verb in VERBS:
        assert f"  {verb} " in top, verb
        sub = ok(cli(verb, "--help"))
        assert f"Usage: pgdurable {verb}" in sub
        if verb in ("status", "list", "show", "insert", "signal", "cleanup", "check", "graph"):
            assert "--json" in sub, verb
    assert "Exit status" in top


def test_version():
    from importlib.metadata import version

    assert ok(cli("--version")).strip() == f"pgdurable {version('pgdurable')}"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["nosuchverb"], "No such command 'nosuchverb'"),
        (["list", "--status", "bogus"], "'--status'"),
        (["cleanup", "--dsn", "x"], "'--older-than'"),
        (["cleanup", "--older-than", "soon", "--dsn", "x"], "'soon' is not a duration"),
        (["list", "--since", "yesterday", "--dsn", "x"], "neither an ISO time"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, expected):
    line = refusal(cli(*args), 2)
    assert expected in line and "--help" in line


def test_no_database_is_one_line():
    assert (
        refusal(cli("status"), 2) == "pgdurable: no database: give --dsn, --config FILE or set PGDURABLE_DSN"
    )


def test_the_client_does_not_import_click_and_the_cli_imports_no_runtime():
    code = textwrap.dedent(
        """
        import sys
        import pgdurable.client
        assert "click" not in sys.modules, "the client imported click"
        import pgdurable.ops.cli
        heavy = [m for m in ("pgdurable.runtime", "pgdurable.engine", "pgdurable.contract.fsm", "uvloop")
                 if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# --------------------------------------------------------------------------- where the database is


def test_the_database_from_a_config_file_the_environment_or_dsn(world, tmp_path):
    cfg = write_config(tmp_path, world.dsn, world.schema)
    by_config = data(cli("status", "--config", str(cfg), "--json"))
    assert by_config["schema"] == world.schema
    by_env = data(cli("status", "--schema", world.schema, "--json", env={"PGDURABLE_DSN": world.dsn}))
    assert by_env["schema"] == world.schema
    assert [e["queue"] for e in by_env["queues"]] == [e["queue"] for e in by_config["queues"]]
    # --dsn wins over the config's (which names a port where nothing listens)
    refused = write_config(tmp_path, make_conninfo(world.dsn, host="127.0.0.1", port="1"), world.schema)
    assert (
        data(cli("status", "--config", str(refused), "--dsn", world.dsn, "--json"))["schema"] == world.schema
    )
    line = refusal(cli("status", "--config", str(refused)), 2)
    assert "port 1 failed: Connection refused" in line


def test_a_schema_that_is_not_migrated_is_one_line(world):
    line = refusal(cli("list", "--dsn", world.dsn, "--schema", "nothing_here"), 2)
    assert "schema 'nothing_here' has no pgdurable tables" in line and "pgdurable migrate" in line


# --------------------------------------------------------------------------- status


def test_status_counts_per_queue_and_says_no_live_worker_seen(world):
    doc = data(cli("status", *world.db("--json")))
    q = {e["queue"]: e for e in doc["queues"]}
    assert set(QUEUES) - {"default"} <= set(q)
    counting = q["counting"]
    assert (counting["runnable"], counting["due"], counting["finished"]["done"]) == (2, 1, 3)
    assert counting["oldest_due_age"] >= 0 and counting["next_due_in"] > 3000
    assert counting["machines"] == ["counter"]
    assert q["email"]["finished"] == {"done": 1, "failed": 1, "cancelled": 0}
    assert q["kids"]["finished"] == {"done": 2, "failed": 1, "cancelled": 0}
    assert counting["workers"] == {"listening": 0, "holding": [], "live_worker_seen": False}
    assert any(
        p.startswith("queue counting: 1 due row,") and "no live worker seen" in p for p in doc["problems"]
    )
    assert "awaiting_signal" not in counting

    text = ok(cli("status", *world.db()))
    assert "QUEUE" in text and "OLDEST DUE" in text and "no live worker seen" in text
    assert "queue counting: 1 due row, the oldest waiting" in text

    awaiting = data(cli("status", *world.db("--json", "--awaiting")))
    assert {e["queue"]: e["awaiting_signal"] for e in awaiting["queues"]}["pay"] == 1


def test_status_sees_workers_by_their_feeder_connection_and_their_leases(fresh, db):
    """Rows held under a running lease, and a feeder connection, are live workers; an
    expired lease is not (the rows are set as a worker's claim would leave them)."""
    t = f'"{fresh.schema}".instances'
    with Client(fresh.dsn, schema=fresh.schema) as c:
        gone = c.insert(send_email, {"to": "c@example.com"})
    claim = (
        f"UPDATE {t} SET status = 'executing', locked_by = %s, lease_expires_at = now() + %s WHERE id = %s"
    )
    db.execute(claim, ["host-a:k1:100:ab12/counting/1/4242", dt.timedelta(minutes=1), fresh.waiting])
    db.execute(claim, ["host-b:k2:1:cd/email/1/7", dt.timedelta(minutes=-1), gone])
    with psycopg.connect(fresh.dsn, application_name="pgdurable feeder pay"):
        doc = data(cli("status", *fresh.db("--json")))
    by = {e["queue"]: e for e in doc["queues"]}
    assert by["counting"]["workers"]["holding"] == [{"host": "host-a", "workers": 1, "rows": 1}]
    assert by["counting"]["workers"]["live_worker_seen"] is True
    assert by["pay"]["workers"]["listening"] == 1 and by["pay"]["workers"]["live_worker_seen"]
    assert by["email"]["expired_leases"] == 1 and not by["email"]["workers"]["live_worker_seen"]
    assert not any(p.startswith(("queue counting:", "queue pay:")) for p in doc["problems"])
    assert any("1 executing row whose lease expired" in p for p in doc["problems"])


# --------------------------------------------------------------------------- list


def test_list_pages_with_a_cursor_until_the_end(world):
    everything = data(cli("list", *world.db("--json", "--limit", "1000")))
    ids = [r["id"] for r in everything["instances"]]
    assert ids == sorted(ids, reverse=True) and everything["next_cursor"] is None
    seen: list[int] = []
    cursor: list[str] = []
    pages = 0
    while True:
        page = data(cli("list", *world.db("--json", "--limit", "4", *cursor)))
        seen += [r["id"] for r in page["instances"]]
        pages += 1
        if page["next_cursor"] is None:
            break
        assert page["next_cursor"] == page["instances"][-1]["id"]
        cursor = ["--cursor", str(page["next_cursor"])]
    assert seen == ids and pages == -(-len(ids) // 4)

    text = ok(cli("list", *world.db("--limit", "2")))
    assert text.splitlines()[0].split() == [
        "ID", "MACHINE", "STEP", "STATUS", "QUEUE", "ATTEMPT", "KEY", "UPDATED", "LAST", "ERROR"
    ]  # fmt: skip
    assert f"next page: --cursor {ids[1]}" in text


def test_list_filters(world):
    def ids(*args: str) -> set[int]:
        return {r["id"] for r in data(cli("list", *world.db("--json", *args)))["instances"]}

    failed = data(cli("list", *world.db("--json", "--status", "failed")))["instances"]
    assert {r["fsm"] for r in failed} == {"send_email", "boom", "leaf"}
    assert next(r for r in failed if r["id"] == world.boom)["last_error"] == "ValueError('kaboom')"
    assert ids("--machine", "counter", "--status", "done") == set(world.counters)
    assert ids("--machine", "counter", "--status", "runnable") == {world.waiting, world.later}
    assert ids("--status", "done", "--status", "failed", "--queue", "email") == {
        world.email_ok,
        world.email_bad,
    }
    assert ids("--key", "order:42") == {world.payment}
    assert ids("--since", "1h") == ids()
    assert ids("--until", "1h") == set()
    assert ids("--since", "2999-01-01T00:00:00+00:00") == set()
    assert ids("--time", "inserted", "--since", "2d", "--machine", "boom") == {world.boom}
    assert "no instances match" in ok(cli("list", *world.db("--machine", "nothing")))


# --------------------------------------------------------------------------- show


def test_show_a_parent_with_its_children(world):
    text = ok(cli("show", str(world.parent), *world.db()))
    assert text.startswith(f"instance {world.parent}: parent v1, step join, done\n")
    assert "children (3: done 2, failed 1)" in text and '"values": [' in text and "result" in text
    doc = data(cli("show", str(world.parent), *world.db("--json")))
    assert doc["children"]["counts"] == {"done": 2, "failed": 1}
    assert [c["fsm"] for c in doc["children"]["first"]] == ["leaf"] * 3
    assert doc["state"]["values"] == [1, 2, 3] and doc["result"]["statuses"] == ["done", "failed", "done"]

    failed_leaf = next(c["id"] for c in doc["children"]["first"] if c["status"] == "failed")
    child = ok(cli("show", str(failed_leaf), *world.db()))
    assert "parent\n" in child and f"{world.parent}  parent  join  done" in child
    assert child.rstrip().endswith("last error\n  leaf 2 failed")


def test_show_by_key_with_the_inbox(world):
    doc = data(cli("show", "order:42", *world.db("--json")))
    assert doc["id"] == world.payment and doc["status"] == "awaiting_signal"
    assert doc["awaits"] == ["paid", "cancelled"]
    assert doc["inbox"]["total"] == 1
    assert doc["inbox"]["signals"][0] | {"id": 0, "inserted_at": 0} == {
        "id": 0, "name": "note", "payload": {"n": 1}, "dedup_key": "n1", "inserted_at": 0
    }  # fmt: skip
    text = ok(cli("show", "order:42", *world.db()))
    assert "key         'order:42'" in text and "inbox (1 signal)" in text and '{"n":1}' in text


def test_show_what_is_not_there_exits_3(world):
    assert refusal(cli("show", "999999", *world.db()), 3) == "pgdurable: no instance 999999"
    line = refusal(cli("show", str(world.boom), "--by-key", *world.db()), 3)
    assert line == f"pgdurable: no instance with correlation key '{world.boom}'"


# --------------------------------------------------------------------------- insert, signal


def test_insert_and_signal_through_the_client(fresh):
    doc = data(cli("insert", "payment", '{"timeout": null}', "--key", "order:7", *fresh.db("--json")))
    with Client(fresh.dsn, schema=fresh.schema) as c:
        inst = c.get(doc["id"])
        assert (inst.fsm, inst.queue, inst.status, inst.correlation_key) == (
            "payment",
            "pay",
            "runnable",
            "order:7",
        )
        line = refusal(cli("insert", "payment", "--key", "order:7", *fresh.db()), 3)
        assert line == "pgdurable: correlation key already occupied: 'order:7'"
        line = refusal(cli("insert", "nosuch", *fresh.db()), 3)
        assert "machine 'nosuch' is not registered" in line and "--queue" in line
        assert "is not valid JSON" in refusal(cli("insert", "payment", "{", *fresh.db()), 2)

        text = ok(
            cli(
                "insert",
                "counter",
                "-",
                "--schedule-in",
                "2h",
                "--priority",
                "-1",
                *fresh.db(),
                stdin='{"limit": 5}',
            )
        )
        iid = int(text.split()[-1])
        later = c.get(iid)
        assert later.state == {"limit": 5} and later.priority == -1
        assert (later.eligible_at - later.inserted_at).total_seconds() > 7000

        drain(fresh.dsn, MACHINES, schema=fresh.schema, collapse_time=False)
        assert c.get(doc["id"]).status == "awaiting_signal"
        out = ok(cli("signal", "order:7", "paid", '{"n": 3}', "--dedup-key", "pay-1", *fresh.db()))
        assert out.strip().startswith("delivered 'paid' to 'order:7' (signal ")
        again = data(
            cli("signal", "order:7", "paid", '{"n": 3}', "--dedup-key", "pay-1", *fresh.db("--json"))
        )
        assert again == {"target": "order:7", "name": "paid", "signal_id": None, "duplicate": True}
        drain(fresh.dsn, MACHINES, schema=fresh.schema, collapse_time=False)
        assert c.get(doc["id"]).result["seen"] == ["paid:3"]  # one delivery, not two
        line = refusal(cli("signal", str(doc["id"]), "paid", *fresh.db()), 3)
        assert line == f"pgdurable: no live instance {doc['id']} to signal (unknown or already finished)"


# --------------------------------------------------------------------------- cleanup


def test_cleanup_dry_run_then_real_spares_live_rows_and_children_of_live_parents(fresh, db):
    # A live parent whose children already finished: they must stay (the parent reads them).
    with Client(fresh.dsn, schema=fresh.schema) as c:
        live_parent = c.insert(Parent, {"values": [7, 8]})
    drain(fresh.dsn, MACHINES, schema=fresh.schema, queues=["parents"])
    drain(fresh.dsn, MACHINES, schema=fresh.schema, queues=["kids"])
    t = f'"{fresh.schema}".instances'
    kept_children = {r[0] for r in db.execute(f"SELECT id FROM {t} WHERE parent_id = %s", [live_parent])}
    assert len(kept_children) == 2

    def count(status: str) -> int:
        return db.execute(f"SELECT count(*) FROM {t} WHERE status = %s", [status]).fetchone()[0]

    live_before = db.execute(f"SELECT count(*) FROM {t} WHERE status NOT IN ('done', 'failed')").fetchone()[0]
    done, failed = count("done"), count("failed")

    none = data(cli("cleanup", "--older-than", "1h", "--dry-run", *fresh.db("--json")))
    assert none["would_delete"] == 0

    only_failed = data(
        cli("cleanup", "--older-than", "0s", "--status", "failed", "--dry-run", *fresh.db("--json"))
    )
    assert only_failed["by_status"] == {"failed": failed}
    dry = data(cli("cleanup", "--older-than", "0s", "--dry-run", *fresh.db("--json")))
    assert dry["by_status"] == {"done": done - 2, "failed": failed} and dry["dry_run"] is True
    assert count("done") == done  # nothing went

    text = ok(cli("cleanup", "--older-than", "0s", "--status", "failed", "--batch", "2", *fresh.db()))
    assert text.strip() == f"deleted {failed} failed rows finished over 0s ago (failed {failed})"
    real = data(cli("cleanup", "--older-than", "0s", "--batch", "2", *fresh.db("--json")))
    assert real["deleted"] == done - 2 and real["by_status"] == {"done": done - 2}
    left = {r[0] for r in db.execute(f"SELECT id FROM {t} WHERE status IN ('done', 'failed')")}
    assert left == kept_children
    assert (
        db.execute(f"SELECT count(*) FROM {t} WHERE status NOT IN ('done', 'failed')").fetchone()[0]
        == live_before
    )


# --------------------------------------------------------------------------- check


def test_check_passes_then_fails_on_rows_the_modules_do_not_define(fresh, tmp_path):
    cfg = str(write_config(tmp_path, fresh.dsn, fresh.schema))
    out = ok(cli("check", "--config", cfg))
    assert (
        out.startswith("ok: ") and "live rows, all of machines, versions and steps the modules define" in out
    )

    with Client(fresh.dsn, schema=fresh.schema) as c:
        c.insert("ghost", {}, queue="counting")
        c.insert_many([Insert("counter", {}, version=9, step="bump", queue="counting")])
        c.insert_many([Insert("counter", {}, version=1, step="gone", queue="counting")])
    res = cli("check", "--config", cfg)
    lines = ok(res, 1).splitlines()
    assert (
        "1 row (runnable 1) of machine 'ghost' on queue counting: the modules define no machine 'ghost'"
        in lines
    )
    assert (
        "1 row (runnable 1) of machine 'counter' version 9 on queue counting: "
        "the modules define 'counter' only in version 1" in lines
    )
    assert any(
        line.startswith("1 row (runnable 1) of machine 'counter' version 1 at step 'gone'") for line in lines
    )
    assert res.stderr.strip() == "pgdurable: check failed: 3 problems"
    doc = data(cli("check", "--config", cfg, "--json"), 1)
    assert doc["ok"] is False
    assert sorted(p["kind"] for p in doc["problems"]) == [
        "undefined_machine",
        "undefined_machine",
        "undefined_step",
    ]


def test_check_fails_when_a_queue_is_served_by_no_queue_of_the_config(fresh, tmp_path):
    cfg = str(write_config(tmp_path, fresh.dsn, fresh.schema, queues=[q for q in QUEUES if q != "parents"]))
    with psycopg.connect(fresh.dsn, autocommit=True) as conn:  # registered by another deploy
        conn.execute(
            f'INSERT INTO "{fresh.schema}".machines (name, version, initial_step, queue, steps)'
            " VALUES ('reports', 2, 'go', 'reporting', '{go}')"
        )
    lines = ok(cli("check", "--config", cfg), 1).splitlines()
    assert (
        "machine 'reports' version 2 is registered on queue 'reporting', which this config does not run "
        "(no [queues.reporting])" in lines
    )
    assert any(
        line.startswith("machine 'parent' version 1 (tests.coord_machines) runs on queue 'parents'")
        for line in lines
    )
    # a fleet split by queue: only this config's queues count
    assert ok(cli("check", "--config", cfg, "--own-queues")).startswith("ok: ")


def test_check_on_a_schema_behind_fails(dsn, tmp_path):
    nothing = f"m_{secrets.token_hex(4)}"
    cfg = str(write_config(tmp_path, dsn, nothing))
    res = cli("check", "--config", cfg)
    assert f"schema '{nothing}' has no pgdurable tables" in ok(res, 1)


# --------------------------------------------------------------------------- graph


def test_graph_draws_the_edges_declared_in_code(tmp_path, dsn):
    cfg = str(write_config(tmp_path, dsn, "pgdurable"))
    mermaid = ok(cli("graph", "counter", "--config", cfg))
    assert mermaid.startswith("stateDiagram-v2\n")
    for edge in ("[*] --> bump", "bump --> bump: Next", "bump --> finish: Next", "finish --> __done: Done"):
        assert f"    {edge}\n" in mermaid, edge
    assert "__error --> __failed: Stop (the default handle())" in mermaid

    dot = ok(cli("graph", "payment", "--config", cfg, "--format", "dot"))
    assert '"start" -> "settle" [label="Await paid, cancelled"];' in dot and dot.startswith(
        'digraph "payment v1" {'
    )

    doc = data(cli("graph", "handled", "--config", cfg, "--json"))
    edge = {"source": "__error", "target": "recovered", "outcome": "Next", "detail": ""}
    assert {**edge, "seen": None, "declared": True} in doc["edges"]
    job = data(cli("graph", "send_email", "--config", cfg, "--json"))
    assert {(e["source"], e["target"], e["outcome"]) for e in job["edges"]} == {
        ("perform", "__done", "Done"), ("perform", "perform", "Retry"), ("perform", "__failed", "Stop")
    }  # fmt: skip

    line = refusal(cli("graph", "nope", "--config", cfg), 3)
    assert line.startswith(f"pgdurable: no machine 'nope' in the modules of {cfg} (it defines: ")


def test_graph_observed_counts_the_transitions_taken(tmp_path, dsn, schema):
    with Client(dsn, schema=schema) as client:
        for _ in range(2):
            client.insert(Counter, {"n": 0, "limit": 2})
        client.insert(Handled, {})
        client.insert(Boom, {})
    drain(dsn, [Counter, Handled, Boom], schema=schema)
    with psycopg.connect(dsn, autocommit=True) as conn:  # a transition an older code took
        conn.execute(
            f'INSERT INTO "{schema}".history (instance_id, fsm, version, step, attempt, outcome,'
            " next_step, started_at, finished_at, duration, worker)"
            " VALUES (0, 'counter', 1, 'finish', 0, 'next', 'bump', now(), now(), 0, 'w')"
        )
    cfg = str(write_config(tmp_path, dsn, schema))

    mermaid = ok(cli("graph", "counter", "--config", cfg, "--observed"))
    for edge in (
        "bump --> bump: Next ×4",
        "bump --> finish: Next ×2",
        "finish --> __done: Done ×2",
        "finish --> bump: Next ×1 (not in code)",
    ):
        assert f"    {edge}\n" in mermaid, (edge, mermaid)
    assert "×N: step attempts that took it, from the step history" in mermaid
    dot = ok(cli("graph", "counter", "--config", cfg, "--observed", "--format", "dot"))
    assert '"finish" -> "bump" [label="Next ×1 (not in code)", style=dashed];' in dot
    # What handle() returned after a step raised is counted on that step, through handle().
    handled = data(cli("graph", "handled", "--config", cfg, "--observed", "--json"))
    assert handled["observed"] is True
    assert {"source": "go", "target": "recovered", "outcome": "Next", "detail": "through handle()",
            "seen": 1, "declared": True} in handled["edges"]  # fmt: skip
    boom = ok(cli("graph", "boom", "--config", cfg, "--observed"))
    assert "    go --> __failed: Stop (through handle()) ×1\n" in boom
    # Without --observed, no count and no database.
    assert "×" not in ok(cli("graph", "counter", "--config", cfg))
    assert "--dsn and --schema are for --observed only" in refusal(
        cli("graph", "counter", "--config", cfg, "--dsn", dsn), 2
    )


def test_graph_follows_helpers_and_lists_what_it_cannot_resolve(tmp_path, dsn):
    (tmp_path / "routed.py").write_text(
        textwrap.dedent(
            """
            from pgdurable import FSM, Await, Done, Next, Stop, step

            class Routed(FSM, name="routed", queue="r"):
                @step(initial=True)
                def start(self, ctx):
                    if ctx.attempt:
                        return self._route(ctx)
                    target = "finish"
                    return Next(target)

                def _route(self, ctx):
                    return Await(["go", "stop"], then=Routed.decide)

                @step
                def decide(self, ctx):
                    return Next("finish") if ctx.awaited else Stop("no")

                @step
                def finish(self, ctx):
                    return Done()
            """
        )
    )
    cfg = str(write_config(tmp_path, dsn, "pgdurable", queues=["r"], modules=["routed"]))
    out = ok(cli("graph", "routed", "--config", cfg))
    assert "    start --> decide: Await go, stop\n" in out
    assert "    decide --> finish: Next\n" in out and "    decide --> __failed: Stop\n" in out
    assert "%% not drawn: Next(target) in start (line " in out and "not written as self.x" in out


# --------------------------------------------------------------------------- plans


@pytest.fixture(scope="module")
def big(dsn):
    """100,000 finished rows and a few live ones: what an operator's verbs must not scan."""
    name = f"cliplan_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn, name)
        t = f'"{name}".instances'
        conn.execute(
            f"INSERT INTO {t} (fsm, version, step, queue, status, updated_at)"
            " SELECT 'job', 1, 'perform', 'q', 'done', now() - interval '10 days' * random()"
            " FROM generate_series(1, 100000)"
        )
        conn.execute(
            f"INSERT INTO {t} (fsm, version, step, queue)"
            " SELECT 'job', 1, 'perform', 'q' FROM generate_series(1, 50)"
        )
        conn.execute(f"VACUUM ANALYZE {t}")
        yield conn, for_schema(name)
        conn.execute(f'DROP SCHEMA "{name}" CASCADE')


def explain(conn, sql: bytes, params) -> dict:
    (doc,) = conn.execute(b"EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params, prepare=False).fetchone()
    return (doc if isinstance(doc, list) else json.loads(doc))[0]["Plan"]


def nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


def test_status_reads_only_partial_indexes(big):
    conn, q = big
    plan = explain(conn, q["ops_status_queues"], {"window": dt.timedelta(hours=1)})
    scans = [n for n in nodes(plan) if n.get("Relation Name") == "instances"]
    assert scans and not [n for n in scans if n["Node Type"] == "Seq Scan"], scans
    assert sum(n.get("Actual Rows", 0) for n in scans) < 2_000  # the live rows and an hour of finished ones


def test_list_and_cleanup_stop_at_their_limit(big):
    conn, q = big
    params = dict.fromkeys(
        ("cursor", "machine", "queue", "statuses", "key", "since_at", "since_ago", "until_at", "until_ago")
    )
    plan = explain(
        conn, q["ops_instance_list"], {**params, "on_inserted": False, "limit": 51, "cursor": 60_000}
    )
    read = sum(n.get("Actual Rows", 0) for n in nodes(plan) if n.get("Relation Name") == "instances")
    assert read <= 51, plan
    with conn.transaction(force_rollback=True):
        plan = explain(
            conn,
            q["ops_cleanup_select_ids"],
            {"statuses": ["done", "failed", "cancelled"], "older": dt.timedelta(days=1), "limit": 100},
        )
    scans = [
        n for n in nodes(plan) if n.get("Relation Name") == "instances" and n["Node Type"] != "Index Scan"
    ]
    assert not [n for n in scans if n["Node Type"] == "Seq Scan"], plan
    assert any(n.get("Index Name") == "instances_gc" for n in nodes(plan)), plan
