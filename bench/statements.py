"""The hot statements alone: what the claim, the flush and its history rider cost per row,
beside the variants the profile points at (docs/performance.md, "The levers, one by one").

    python bench/statements.py --dsn postgresql://localhost/postgres [--rounds 3] [--iterations 40]

``--dsn`` names a maintenance database; the script creates a scratch database
``bench_stmt_<random>`` next to it, migrates pgdurable's schema into it and drops it at the
end. No worker runs: each measurement inserts a batch of runnable rows (not timed), then
times one statement (or one pipeline) from the client, its round trip included, on a
connection set up as the worker's is for that statement. Each cell is the median over the
iterations (the first five left out) in µs per row; the variants of a group alternate
round by round, so that drift of a shared machine moves them alike.

Groups and variants:

- **claim** (100 rows, generic plans, as the feeder's connection plans it):
  ``instance_claim`` as shipped; the same without its two ``EXISTS`` of ``RETURNING``
  (whether a row has an inbox or children); a bare ``UPDATE … WHERE id IN (SELECT … SKIP
  LOCKED) RETURNING`` of the same columns.
- **flush** (200 ``Done`` outcomes, ``force_custom_plan`` as the worker's pool plans it):
  ``instance_commit_if_owned_many`` and its history rider in one pipeline, as shipped; the
  same with every key of each outcome in the flush's document (the engine leaves the keys at
  their defaults out: a plain ``Done`` sends six of seventeen); the history row written by
  a CTE of the flush statement instead of its rider; the flush
  without history; the flush planned generically (``plan_cache_mode = auto``, its plan
  made on this table); a bare ``UPDATE … FROM unnest(…)`` of status and lease.
- **row width** (100 rows): the bare claim and complete on the instance table against the
  same two statements on a narrow table with the three partial indexes they touch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from run import create_db, drop_db, revision, server_facts

from pgdurable.db.migrations import migrate
from pgdurable.db.queries import for_schema, int_array

SCHEMA = "pgdurable"
WORKER = "bench:1:stmt"
TOKEN = 7
LEASE = dt.timedelta(seconds=60)
Q = for_schema(SCHEMA)

INSERT = (
    "INSERT INTO pgdurable.instances (fsm, version, step, state, queue) "
    "SELECT 'noop', 1, 'run', '{\"n\": 1}', 'bench' FROM generate_series(1, %(n)s)"
)
CLAIM_PARAMS = {
    "queue": "bench",
    "worker": WORKER,
    "token": TOKEN,
    "lease": LEASE,
    "horizon": dt.timedelta(0),
    "gates": "{}",
    "gate_limits": "{}",
}
_EXISTS = (
    b'EXISTS (SELECT 1 FROM "pgdurable".signals AS s WHERE s.target_id = i.id) AS has_inbox',
    b'EXISTS (SELECT 1 FROM "pgdurable".instances AS c WHERE c.parent_id = i.id) AS has_children',
)
BARE_CLAIM = b"""
UPDATE pgdurable.instances AS i
SET status = 'executing', locked_by = %(worker)s, lease_token = %(token)s,
    lease_expires_at = now() + %(lease)s::interval, updated_at = now()
WHERE i.id IN (SELECT id FROM pgdurable.instances
               WHERE status = 'runnable' AND queue = %(queue)s AND eligible_at <= now()
               ORDER BY priority, eligible_at LIMIT %(limit)s FOR NO KEY UPDATE SKIP LOCKED)
RETURNING i.id, i.fsm, i.version, i.step, i.state::text, i.attempt, i.crashes, i.queue,
          i.priority, i.eligible_at, i.awaits, i.correlation_key, i.concurrency_key,
          i.rate_limit, i.weight, i.parent_id"""
BARE_DONE = b"""
UPDATE pgdurable.instances AS i
SET status = 'done', locked_by = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS u(id, token)
WHERE i.id = u.id AND i.locked_by = %(worker)s AND i.lease_token = u.token AND i.status = 'executing'
RETURNING i.id"""
HISTORY_CTE = b"""), history AS (
    INSERT INTO "pgdurable".history
        (instance_id, fsm, version, step, attempt, outcome, next_step, started_at, finished_at,
         duration, worker, error, traceback, state, logs)
    SELECT w.id, h.fsm, h.version, h.step, h.attempt, h.outcome, h.next_step,
           to_timestamp(h.started), to_timestamp(h.started + h.duration), h.duration, %(worker)s,
           h.error, h.traceback, h.state, h.logs
    FROM written AS w,
         jsonb_to_record((SELECT hdoc FROM outcomes) -> w.id::text)
         AS h(fsm text, version int, step text, attempt int, outcome text, next_step text,
              started float8, duration float8, error text, traceback text, state jsonb, logs jsonb)
    RETURNING 1
), notified AS ("""
NARROW = """
DROP TABLE IF EXISTS narrow;
CREATE TABLE narrow (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, status text NOT NULL DEFAULT 'runnable',
    queue text NOT NULL DEFAULT 'bench', priority smallint NOT NULL DEFAULT 0,
    eligible_at timestamptz NOT NULL DEFAULT now(), locked_by text, lease_token bigint,
    lease_expires_at timestamptz, updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX narrow_pick ON narrow (queue, priority, eligible_at) WHERE status = 'runnable';
CREATE INDEX narrow_lease ON narrow (lease_expires_at)
    WHERE status = 'executing' AND lease_expires_at IS NOT NULL;
CREATE INDEX narrow_gc ON narrow (updated_at) WHERE status IN ('done', 'failed', 'cancelled');
"""


def _sql(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


def _claim_variants() -> dict[str, bytes]:
    shipped = _sql(Q["instance_claim"])
    lean = shipped.replace(_EXISTS[0], b"false AS has_inbox").replace(_EXISTS[1], b"false AS has_children")
    assert lean != shipped, "instance_claim no longer has the EXISTS this script removes"
    return {"as shipped": shipped, "without the two EXISTS": lean, "bare UPDATE … RETURNING": BARE_CLAIM}


def _flush_docs(ids: list[int], every_key: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The flush's and the rider's parameters for ``Done`` outcomes of ``ids``: each
    outcome with its defaults left out, as the engine sends it, or with ``every_key``."""
    outcome: dict[str, Any] = {"token": TOKEN, "status": "done", "version": 1, "step": "run", "delay": 0.0,
                               "weight": 1.0}  # fmt: skip
    if every_key:
        outcome |= {
            "state": None, "attempt": 0, "keep_awaits": False, "set_concurrency": False,
            "concurrency_key": None, "keep_rate": False, "rate_limit": None, "result": None,
            "error": None, "traceback": None, "saga": None,
        }  # fmt: skip
    now = time.time()
    attempt = {"fsm": "noop", "attempt": 0, "outcome": "done", "started": now, "duration": 1e-4, "version": 1,
               "step": "run", "state": {"n": 1}}  # fmt: skip
    flush = {
        "worker": WORKER,
        "lease": LEASE,
        "quiet_queue": "bench",
        "ids": int_array(ids),
        "rows": json.dumps({str(i): outcome for i in ids}),
        "taken_targets": "{}",
        "taken_ids": "{}",
    }
    rider = {"worker": WORKER, "rows": json.dumps([{"id": i, **attempt} for i in ids])}
    flush["history"] = json.dumps({str(i): attempt for i in ids})
    return flush, rider


class Bench:
    def __init__(self, dsn: str, iterations: int):
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.iterations = iterations
        migrate(self.conn, SCHEMA)
        self.conn.execute(NARROW)

    def _claimed(self, n: int) -> list[int]:
        self.conn.execute(INSERT, {"n": n})
        cur = self.conn.execute(Q["instance_claim"], {**CLAIM_PARAMS, "limit": n}, prepare=True)
        return [row[0] for row in cur.fetchall()]

    def _time(self, setup: Callable[[], Any], run: Callable[[Any], int], rows: int) -> float:
        """Median µs per row of ``run`` (after ``setup``, not timed) over the iterations."""
        times = []
        for _ in range(self.iterations):
            arg = setup()
            t = time.perf_counter()
            done = run(arg)
            times.append(time.perf_counter() - t)
            assert done == rows, f"{done} rows instead of {rows}"
        return statistics.median(times[5:]) * 1e6 / rows

    def claim(self, variant: bytes, n: int = 100) -> float:
        self.conn.execute("SET plan_cache_mode = auto")  # the feeder's connection

        def run(_: None) -> int:
            return len(self.conn.execute(variant, {**CLAIM_PARAMS, "limit": n}, prepare=True).fetchall())

        return self._time(lambda: self.conn.execute(INSERT, {"n": n}), run, n)

    def flush(self, variant: str, n: int = 200) -> float:
        conn = self.conn
        conn.execute(
            "SET plan_cache_mode = " + ("auto" if variant == "generic plan" else "force_custom_plan")
        )
        shipped = _sql(Q["instance_commit_if_owned_many"])
        cte = shipped.replace(b"), notified AS (", HISTORY_CTE).replace(
            b"SELECT %(rows)s::jsonb AS doc", b"SELECT %(rows)s::jsonb AS doc, %(history)s::jsonb AS hdoc"
        )
        assert cte != shipped, "the flush no longer has the shape this script extends"

        def setup() -> tuple[dict[str, Any], dict[str, Any]]:
            return _flush_docs(self._claimed(n), every_key=variant == EVERY_KEY)

        def run(docs: tuple[dict[str, Any], dict[str, Any]]) -> int:
            flush, rider = docs
            if variant == "history as a CTE of the flush":
                return len(conn.execute(cte, flush, prepare=True).fetchall())
            if variant == "bare UPDATE … FROM unnest":
                ids = [int(i) for i in flush["ids"].strip("{}").split(",")]
                params = {"ids": ids, "tokens": [TOKEN] * len(ids), "worker": WORKER}
                return len(conn.execute(BARE_DONE, params, prepare=True).fetchall())
            if variant in ("without history", "generic plan"):
                return len(conn.execute(Q["instance_commit_if_owned_many"], flush, prepare=True).fetchall())
            with conn.pipeline():  # as shipped: the commit and its rider, one Sync
                cur = conn.execute(Q["instance_commit_if_owned_many"], flush, prepare=True)
                conn.execute(Q["history_insert_many"], rider, prepare=True)
            return len(cur.fetchall())

        return self._time(setup, run, n)

    def width(self, table: str, n: int = 100) -> tuple[float, float]:
        """The bare claim and the bare complete on ``table``, µs per row each."""
        conn = self.conn
        insert = (
            INSERT
            if table == "pgdurable.instances"
            else "INSERT INTO narrow (queue) SELECT 'bench' FROM generate_series(1, %(n)s)"
        )
        claim = (
            f"UPDATE {table} AS i SET status = 'executing', locked_by = %(w)s, lease_token = %(t)s, "
            "lease_expires_at = now() + interval '60 s', updated_at = now() WHERE i.id IN "
            f"(SELECT id FROM {table} WHERE status = 'runnable' AND queue = 'bench' AND eligible_at <= now() "
            "ORDER BY priority, eligible_at LIMIT %(n)s FOR NO KEY UPDATE SKIP LOCKED) RETURNING i.id"
        )
        done = (
            f"UPDATE {table} AS i SET status = 'done', locked_by = NULL, lease_token = NULL, "
            "lease_expires_at = NULL, updated_at = now() "
            "WHERE i.id = ANY(%(ids)s) AND i.locked_by = %(w)s AND i.status = 'executing' RETURNING i.id"
        )
        claims, dones = [], []
        for _ in range(self.iterations):
            conn.execute(insert, {"n": n})
            t = time.perf_counter()
            ids = [
                r[0] for r in conn.execute(claim, {"w": WORKER, "t": TOKEN, "n": n}, prepare=True).fetchall()
            ]
            claims.append(time.perf_counter() - t)
            t = time.perf_counter()
            finished = len(conn.execute(done, {"ids": ids, "w": WORKER}, prepare=True).fetchall())
            dones.append(time.perf_counter() - t)
            assert len(ids) == finished == n
        return statistics.median(claims[5:]) * 1e6 / n, statistics.median(dones[5:]) * 1e6 / n


EVERY_KEY = "every key of each outcome sent, defaults too"
FLUSH_VARIANTS = (
    "as shipped (with its history rider)",
    EVERY_KEY,
    "history as a CTE of the flush",
    "without history",
    "generic plan",
    "bare UPDATE … FROM unnest",
)


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", required=True, help="the maintenance database of the server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    name = f"bench_stmt_{secrets.token_hex(4)}"
    facts = server_facts(args.dsn)
    print(
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC: PostgreSQL {facts['server_version']} "
        f"(synchronous_commit={facts['synchronous_commit']}); pgdurable at {revision()}; "
        f"{args.rounds} rounds of {args.iterations} iterations\n"
    )
    dsn = create_db(args.dsn, name)
    try:
        bench = Bench(dsn, args.iterations)
        claims: dict[str, list[float]] = {k: [] for k in _claim_variants()}
        flushes: dict[str, list[float]] = {k: [] for k in FLUSH_VARIANTS}
        widths: dict[str, tuple[list[float], list[float]]] = {"instances": ([], []), "narrow": ([], [])}
        for r in range(args.rounds):
            for label, text in _claim_variants().items():
                claims[label].append(bench.claim(text))
            for label in FLUSH_VARIANTS:
                flushes[label].append(bench.flush(label))
            for table, key in (("pgdurable.instances", "instances"), ("narrow", "narrow")):
                c, d = bench.width(table)
                widths[key][0].append(c)
                widths[key][1].append(d)
            print(f"round {r + 1} of {args.rounds} done", file=sys.stderr)
        bench.conn.close()
    finally:
        drop_db(args.dsn, name)
    print("µs per row, median of the rounds (min–max); each round's figure is a median of its iterations.\n")
    print("| claim of 100 rows | µs per row |\n|---|---:|")
    for label, values in claims.items():
        print(f"| {label} | {_cell(values)} |")
    print("\n| flush of 200 `Done` outcomes | µs per row |\n|---|---:|")
    for label, values in flushes.items():
        print(f"| {label} | {_cell(values)} |")
    print("\n| bare statements, 100 rows | claim µs per row | complete µs per row |\n|---|---:|---:|")
    for key, label in (
        ("instances", "the instance table"),
        ("narrow", "a narrow table, three partial indexes"),
    ):
        print(f"| {label} | {_cell(widths[key][0])} | {_cell(widths[key][1])} |")


if __name__ == "__main__":
    main()
