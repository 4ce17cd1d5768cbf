"""Core throughput on one connection, no worker processes: insert_many, single inserts,
and claim → run → flush of no-op jobs in batches. Prints a table; --json writes one.

    python bench/core.py --dsn postgresql://... [--jobs 10000] [--batch 100]

Figures move from run to run on shared machines; compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time

import psycopg

from pgdurable import Insert, job
from pgdurable.client import AsyncClient
from pgdurable.contract.fsm import Registry
from pgdurable.db import migrations
from pgdurable.engine import Engine


@job(name="bench_noop", queue="bench")
def noop(args: dict) -> None:
    return None


async def bench(dsn: str, jobs: int, batch: int) -> list[tuple[str, float, str]]:
    schema = f"bench_{secrets.token_hex(3)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn, schema)
    rows: list[tuple[str, float, str]] = []
    try:
        async with AsyncClient(dsn, schema=schema) as client:
            specs = [Insert(noop, {}) for _ in range(jobs)]
            t = time.perf_counter()
            for i in range(0, jobs, 1000):
                await client.insert_many(specs[i : i + 1000])
            rows.append(("insert_many (batches of 1000)", jobs / (time.perf_counter() - t), "rows/s"))

            n = min(jobs, 2000)
            t = time.perf_counter()
            for _ in range(n):
                await client.insert(noop, {})
            rows.append(("insert, one at a time", n / (time.perf_counter() - t), "rows/s"))

        engine = Engine(Registry([noop]), schema=schema)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            done = 0
            t = time.perf_counter()
            while True:
                claimed = await engine.claim(conn, "bench", batch)
                if not claimed:
                    break
                await engine.flush(conn, [await engine.run(r) for r in claimed])
                done += len(claimed)
            rows.append(
                (
                    f"claim/run/flush, batches of {batch}, 1 connection",
                    done / (time.perf_counter() - t),
                    "jobs/s",
                )
            )
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    rows = asyncio.run(bench(args.dsn, args.jobs, args.batch))
    width = max(len(name) for name, _, _ in rows)
    print(f"{'workload':<{width}}  {'rate':>10}")
    for name, rate, unit in rows:
        print(f"{name:<{width}}  {rate:>10,.0f} {unit}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"workload": n, "rate": r, "unit": u} for n, r, u in rows], f, indent=2)


if __name__ == "__main__":
    main()
