"""Hot statements stay index-bound on a big table: 200k terminal rows, 20k future rows."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from pgdurable.db.queries import for_schema
from pgdurable.runtime.worker import Worker

TERMINAL, FUTURE, LIVE = 200_000, 20_000, 500


@pytest.fixture(scope="module")
def big_schema(dsn):
    """One populated schema for the module (populating it is the slow part)."""
    import secrets

    import psycopg

    from pgdurable.db import migrations

    name = f"plans_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn, name)
        populate(conn, name)
        yield name
        conn.execute(f'DROP SCHEMA "{name}" CASCADE')


@pytest.fixture
def big(big_schema):
    return for_schema(big_schema)


def populate(db, schema):
    t = f'"{schema}".instances'
    db.execute(
        f"INSERT INTO {t} (fsm, version, step, queue, status, updated_at)"
        " SELECT 'job', 1, 'perform', 'q', 'done', now() - interval '1 day' * random()"
        " FROM generate_series(1, %s)",
        [TERMINAL],
    )
    db.execute(
        f"INSERT INTO {t} (fsm, version, step, queue, eligible_at)"
        " SELECT 'job', 1, 'perform', 'q', now() + interval '1 hour' + interval '1 second' * g"
        " FROM generate_series(1, %s) AS g",
        [FUTURE],
    )
    db.execute(
        f"INSERT INTO {t} (fsm, version, step, queue)"
        " SELECT 'job', 1, 'perform', 'q' FROM generate_series(1, %s)",
        [LIVE],
    )
    db.execute(f"ANALYZE {t}")


def plan(db, sql: bytes, params) -> dict:
    with db.transaction(force_rollback=True):
        (doc,) = db.execute(b"EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()
    return (doc if isinstance(doc, list) else json.loads(doc))[0]["Plan"]


def nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


def scans_on_instances(p: dict) -> list[dict]:
    return [n for n in nodes(p) if n.get("Relation Name") == "instances"]


def test_claim_reads_only_its_batch(db, big):
    p = plan(
        db,
        big["instance_claim"],
        {
            "queue": "q",
            "limit": 50,
            "worker": "w",
            "token": 1,
            "lease": dt.timedelta(seconds=60),
            "horizon": dt.timedelta(0),
            "gates": [],
            "gate_limits": [],
        },
    )
    scans = scans_on_instances(p)
    assert not any(n["Node Type"] == "Seq Scan" for n in scans)
    pick = [n for n in scans if n.get("Index Name") == "instances_pick"]
    assert pick and all(n["Actual Rows"] * n["Actual Loops"] <= 50 for n in pick)


def test_gc_select_uses_the_gc_index(db, big):
    p = plan(db, big["gc_select_ids"], {"retention": dt.timedelta(hours=1), "limit": 1000})
    scans = scans_on_instances(p)
    assert any(n.get("Index Name") == "instances_gc" for n in scans)
    assert not any(n["Node Type"] == "Seq Scan" for n in scans)


def test_idle_wake_up_computation_reads_a_few_rows(db, big):
    p = plan(db, big["instance_next_eligible"], {"queue": "q"})
    read = sum(n["Actual Rows"] * n["Actual Loops"] for n in scans_on_instances(p))
    assert read < 20  # not the 20,500 runnable rows


def test_await_expiry_and_reaper_use_their_partial_indexes(db, big):
    p = plan(db, big["instance_await_expire"], {"horizon": dt.timedelta(0), "limit": 1000})
    assert any(n.get("Index Name") == "instances_await_deadline" for n in scans_on_instances(p))
    p = plan(
        db,
        big["instance_reclaim"],
        {
            "workers": [],
            "nodes": [],
            "expired": True,
            "count_all": True,
            "crashed": [],
            "fsms": [],
            "versions": [],
            "max_crashes": [],
            "default_max": 3,
            "lease": dt.timedelta(seconds=60),
        },
    )
    assert not any(n["Node Type"] == "Seq Scan" for n in scans_on_instances(p))


def claim_as_w(db, schema: str, n: int) -> list[int]:
    """Mark ``n`` runnable rows executing, claimed by worker "w" with their id as fencing
    token (inside the caller's transaction); returns their ids."""
    t = f'"{schema}".instances'
    return [
        r[0]
        for r in db.execute(
            f"UPDATE {t} SET status = 'executing', locked_by = 'w', lease_token = id,"
            " lease_expires_at = now() + interval '1 minute'"
            f" WHERE id IN (SELECT id FROM {t} WHERE status = 'runnable' AND eligible_at <= now()"
            " ORDER BY id LIMIT %s) RETURNING id",
            [n],
        ).fetchall()
    ]


def commit_params(ids: list[int]) -> dict:
    """instance_commit_if_owned_many's parameters: a ``Done`` for each of ``ids`` (whose
    fencing token is their id), claimed by worker "w"."""
    rows = {
        str(i): {"token": i, "status": "done", "version": 1, "step": "perform", "state": None,
                 "delay": 0.0, "attempt": 0, "keep_awaits": False, "set_concurrency": False,
                 "concurrency_key": None, "keep_rate": True, "rate_limit": None, "weight": 1.0,
                 "result": None, "error": None}
        for i in ids
    }  # fmt: skip
    return {
        "rows": json.dumps(rows),
        "ids": ids,
        "worker": "w",
        "lease": dt.timedelta(seconds=60),
        "taken_targets": [],
        "taken_ids": [],
        "quiet_queue": "q",
    }


def test_a_flush_reads_each_outcome_once(db, big, big_schema):
    """A flush's cost grows with its rows, not with their square. The statistics say almost
    nothing is executing, so the planner estimates the guarded rows at one: when the
    outcomes were a record set joined to them, it rescanned (and re-parsed) the whole
    document for each row, and compared every pair (200 outcomes: 39,800 rows removed by
    the join filter, 14 ms; 1,000: 310 ms). Each row now looks its outcome up by key."""
    with db.transaction(force_rollback=True):
        ids = claim_as_w(db, big_schema, 200)
        commit = plan(db, big["instance_commit_if_owned_many"], commit_params(ids))
    assert len(ids) == 200
    written = [n for n in nodes(commit) if n.get("Operation") == "Update"]
    assert [n["Actual Rows"] for n in written] == [200]
    removed = sum(n.get("Rows Removed by Join Filter", 0) for n in nodes(commit))
    assert removed == 0, removed
    # The document is parsed once: its CTE runs once, whatever the plan.
    outcomes = [n for n in nodes(commit) if n.get("Subplan Name") == "CTE outcomes"]
    assert [n["Actual Loops"] for n in outcomes] == [1], outcomes


def test_ownership_guards_find_their_rows_by_primary_key(db, big, big_schema):
    """Flush and heartbeat locate the worker's rows by id, never through the lease index.

    The statistics say almost nothing is executing (the table was analyzed with none), the
    condition a busy queue is in between two autovacuums: the lease index then holds an
    entry for every row executed since, and a plan through it reads all of them. Its
    predicate (``lease_expires_at IS NOT NULL``) keeps the guards off it.
    """
    with db.transaction(force_rollback=True):
        ids = claim_as_w(db, big_schema, 10)
        commit = plan(db, big["instance_commit_if_owned_many"], commit_params(ids))
        extend = plan(
            db, big["instance_lease_extend_many"], {"ids": ids, "worker": "w", "lease": dt.timedelta(60)}
        )
    for p in (commit, extend):
        used = {n.get("Index Name") for n in scans_on_instances(p) if "Scan" in n["Node Type"]}
        assert used == {"instances_pkey"}, used
    written = [n for n in nodes(commit) if n.get("Operation") == "Update"]
    assert [n["Actual Rows"] for n in written] == [10] and len(ids) == 10


def test_history_statements_use_their_indexes(db, big, big_schema):
    """The flush's history rider probes the primary key per row; reading an instance's
    history and collecting it with the instance go through history_instance."""
    s = f'"{big_schema}"'
    with db.transaction(force_rollback=True):
        db.execute(
            f"INSERT INTO {s}.history (instance_id, fsm, version, step, attempt, outcome,"
            " started_at, finished_at, duration, worker)"
            f" SELECT id, fsm, 1, 'perform', 0, 'done', now(), now(), 0.001, 'w'"
            f" FROM {s}.instances WHERE status = 'done'"
        )
        db.execute(f"ANALYZE {s}.history")
        ids = [r[0] for r in db.execute(f"SELECT id FROM {s}.instances WHERE status = 'done' LIMIT 1000")]
        rider = plan(
            db,
            big["history_insert_many"],
            {
                "worker": "w",
                "rows": json.dumps(
                    [{"id": i, "fsm": "job", "attempt": 0, "outcome": "done", "started": 0.0, "duration": 0.0}
                     for i in ids[:50]]
                ),
            },
        )  # fmt: skip
        read = plan(db, big["history_of_instance"], {"id": ids[0], "limit": None})
        collect = plan(db, big["gc_delete_ids"], {"ids": ids})
    used = {n.get("Index Name") for n in scans_on_instances(rider) if "Scan" in n["Node Type"]}
    assert used == {"instances_pkey"}, used
    for p in (read, collect):
        on_history = [n for n in nodes(p) if n.get("Relation Name") == "history" and "Scan" in n["Node Type"]]
        assert on_history and all(n.get("Index Name") == "history_instance" for n in on_history), on_history


def test_lookups_by_key_use_the_correlation_index(db, big, big_schema):
    """A live key is found through instances_correlation, a unique index partial on the key
    being held (``correlation_key IS NOT NULL AND status = ANY (correlation_scope)``, since
    migration 15): the lookups name that condition, and the planner proves it."""
    s = f'"{big_schema}"'
    live = "{runnable,executing,awaiting_signal,awaiting_children,held}"
    with db.transaction(force_rollback=True):
        db.execute(
            f"UPDATE {s}.instances SET correlation_key = 'k' || id, correlation_scope = %s"
            f" WHERE id IN (SELECT id FROM {s}.instances ORDER BY id DESC LIMIT 400)",
            [live],
        )
        (key,) = db.execute(
            f"SELECT correlation_key FROM {s}.instances WHERE correlation_key IS NOT NULL LIMIT 1"
        ).fetchone()
        db.execute(f"ANALYZE {s}.instances")
        by_key = {"target_id": None, "target_key": key}
        plans = {
            "signal_deliver": plan(
                db,
                big["signal_deliver"],
                {
                    **by_key,
                    "name": "n",
                    "payload": "{}",
                    "dedup_key": None,
                    "notify": False,
                    "traceparent": None,
                },
            ),
            "input_pending_get": plan(db, big["input_pending_get"], by_key),
            "ops_instance_id_by_key": plan(db, big["ops_instance_id_by_key"], {"key": key}),
        }
    for name, p in plans.items():
        used = {n.get("Index Name") for n in scans_on_instances(p) if "Scan" in n["Node Type"]}
        assert "instances_correlation" in used, (name, used)
        # ops_instance_id_by_key falls back (never executed here) to the newest row that
        # ever carried the key, a walk that may scan; the others read no other way
        assert name == "ops_instance_id_by_key" or None not in used, (name, used)


def test_pooled_worker_connections_plan_for_their_parameters(dsn, schema):
    """The worker's pool configures each connection it opens to plan every statement for
    its own parameters: a generic plan of the flush made while the table was small would
    be kept after a burst grew it (docs/performance.md, the levers)."""
    worker = SimpleNamespace(engine=SimpleNamespace(q=for_schema(schema)))

    async def go() -> tuple[Any, Any]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            before = await (await conn.execute("SHOW plan_cache_mode")).fetchone()
            await Worker._configure(worker, conn)  # type: ignore[arg-type]
            after = await (await conn.execute("SHOW plan_cache_mode")).fetchone()
        return before, after

    before, after = asyncio.run(go())
    assert before == ("auto",) and after == ("force_custom_plan",)
