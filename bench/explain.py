"""EXPLAIN (ANALYZE, BUFFERS) of every hot statement on a table of a million terminal rows,
a hundred thousand future-scheduled rows and a live working set. Prints each plan.

    python bench/explain.py --dsn postgresql://... [--terminal 1000000] [--future 100000]

Statements that write run inside a transaction that is rolled back, so the table is the
same for each; the schema is dropped at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import time
from typing import Any

import psycopg

from pgdurable import Insert
from pgdurable.client.bulk import Batch
from pgdurable.db import migrations
from pgdurable.db.queries import Queries

LIVE = 2000


def populate(conn: psycopg.Connection[Any], schema: str, terminal: int, future: int) -> None:
    t = f'"{schema}".instances'
    conn.execute(
        f"INSERT INTO {t} (fsm, version, step, queue, status, result, updated_at)"
        " SELECT 'job', 1, 'perform', 'q', CASE WHEN g %% 10 = 0 THEN 'failed' ELSE 'done' END, '{}',"
        " now() - interval '1 day' * random() FROM generate_series(1, %s) AS g",
        [terminal],
    )
    conn.execute(
        f"INSERT INTO {t} (fsm, version, step, queue, eligible_at)"
        " SELECT 'job', 1, 'perform', 'q', now() + interval '1 hour' + interval '1 second' * g"
        " FROM generate_series(1, %s) AS g",
        [future],
    )
    conn.execute(
        f"INSERT INTO {t} (fsm, version, step, queue)"
        " SELECT 'job', 1, 'perform', 'q' FROM generate_series(1, %s)",
        [LIVE],
    )
    conn.execute(
        f"INSERT INTO {t} (fsm, version, step, queue, status, locked_by, lease_token, lease_expires_at)"
        " SELECT 'job', 1, 'perform', 'q', 'executing', 'w', 1, now() + interval '1 minute'"
        " FROM generate_series(1, 200)"
    )
    conn.execute(f"VACUUM ANALYZE {t}")


def explain(conn: psycopg.Connection[Any], title: str, sql: bytes, params: dict[str, Any]) -> None:
    print(f"\n-- {title}")
    with conn.transaction(force_rollback=True):
        for (line,) in conn.execute(b"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, SUMMARY ON) " + sql, params):
            print(line)


def copy_timing(conn: psycopg.Connection[Any], q: Queries) -> None:
    """insert_many's COPY cannot be EXPLAINed: time it (1,000 plain rows, rolled back)."""
    print("\n-- insert_many: instance_ids_allocate + instance_copy_plain (1,000 rows)")
    batch = Batch.of([Insert("job", {"n": i}, queue="q", version=1, step="perform") for i in range(1000)])
    for _ in range(3):
        with conn.transaction(force_rollback=True):
            t0 = time.perf_counter()
            now, ids = conn.execute(q["instance_ids_allocate"], {"n": 1000}).fetchone()
            t1 = time.perf_counter()
            with conn.cursor().copy(q["instance_copy_plain"]) as copy:
                copy.write(batch.encode(ids, now, plain=True))
            t2 = time.perf_counter()
        print(f"ids drawn in {(t1 - t0) * 1000:.2f} ms, COPY in {(t2 - t1) * 1000:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--terminal", type=int, default=1_000_000)
    parser.add_argument("--future", type=int, default=100_000)
    args = parser.parse_args()
    schema = f"explain_{secrets.token_hex(3)}"
    q = Queries(schema)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        migrations.migrate(conn, schema)
        try:
            populate(conn, schema, args.terminal, args.future)
            ids = [
                r[0]
                for r in conn.execute(f"SELECT id FROM \"{schema}\".instances WHERE status = 'executing'")
            ]
            print(
                f"{args.terminal:,} terminal, {args.future:,} future, {LIVE:,} runnable,"
                f" {len(ids)} executing rows"
            )
            explain(
                conn,
                "instance_claim (batch 50)",
                q["instance_claim"],
                {
                    "queue": "q",
                    "limit": 50,
                    "worker": "w2",
                    "token": 2,
                    "lease": dt.timedelta(seconds=60),
                    "horizon": dt.timedelta(0),
                    "gates": [],
                    "gate_limits": [],
                },
            )
            n = 50
            rows = [
                {
                    "id": i,
                    "token": 1,
                    "status": "done",
                    "version": 1,
                    "step": "perform",
                    "state": None,
                    "delay": 0.0,
                    "attempt": 0,
                    "keep_awaits": False,
                    "set_concurrency": False,
                    "concurrency_key": None,
                    "keep_rate": False,
                    "rate_limit": None,
                    "weight": 1.0,
                    "result": {},
                    "error": None,
                }
                for i in ids[:n]
            ]
            explain(
                conn,
                "instance_commit_if_owned_many (50 Done)",
                q["instance_commit_if_owned_many"],
                {
                    "worker": "w",
                    "lease": dt.timedelta(seconds=60),
                    "quiet_queue": "q",
                    "ids": ids[:n],
                    "rows": json.dumps(rows),
                    "taken_targets": [],
                    "taken_ids": [],
                },
            )
            explain(
                conn,
                "instance_lease_extend_many (200 rows)",
                q["instance_lease_extend_many"],
                {"worker": "w", "ids": ids, "lease": dt.timedelta(seconds=60)},
            )
            explain(
                conn,
                "instance_insert_one",
                q["instance_insert_one"],
                {
                    "fsm": "job",
                    "version": 1,
                    "step": "perform",
                    "queue": "q",
                    "state": "{}",
                    "priority": 0,
                    "at": None,
                    "delay": 0.0,
                    "correlation_key": "k1",
                    "correlation_scope": ["runnable"],
                    "concurrency_key": None,
                    "rate_limit": None,
                    "weight": 1.0,
                    "notify": False,
                },
            )
            explain(
                conn,
                "signal_deliver (by id)",
                q["signal_deliver"],
                {
                    "target_id": ids[0],
                    "target_key": None,
                    "name": "go",
                    "payload": "{}",
                    "dedup_key": None,
                    "notify": False,
                },
            )
            explain(
                conn,
                "instance_reclaim (expired leases)",
                q["instance_reclaim"],
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
                },
            )
            explain(
                conn,
                "instance_await_expire",
                q["instance_await_expire"],
                {"horizon": dt.timedelta(0), "limit": 1000},
            )
            explain(
                conn,
                "gc_select_ids (retention 12 h, 1000)",
                q["gc_select_ids"],
                {"retention": dt.timedelta(hours=12), "limit": 1000},
            )
            explain(conn, "instance_next_eligible", q["instance_next_eligible"], {"queue": "q"})
            copy_timing(conn, q)
        finally:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    main()
