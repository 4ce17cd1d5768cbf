"""Does NOTIFY inside the writing transaction serialise commits?

Every committing transaction that issued NOTIFY takes a cluster-wide lock while it queues
its notifications. This runs many concurrent single-row producers, each insert in its own
durable transaction, with and without a pg_notify in the same statement, side by side in
one run, and prints the ratio. (pgdurable notifies in the writing transaction; an
out-of-band, coalesced emitter would be the alternative if the ratio were poor.)

    python bench/notify.py --dsn postgresql://... [--producers 16] [--seconds 5]
"""

from __future__ import annotations

import argparse
import secrets
import threading
import time

import psycopg

from pgdurable.client import Client
from pgdurable.db import migrations

INSERT = "INSERT INTO {t} (payload) VALUES (%s)"
INSERT_NOTIFY = (
    "WITH ins AS (INSERT INTO {t} (payload) VALUES (%s) RETURNING id) "
    "SELECT pg_notify('bench_notify_q', '') FROM ins"
)


NOTIFY_AFTER = "SELECT pg_notify('bench_notify_q', '')"


def producers(dsn: str, sql: str, n: int, seconds: float, after: str | None = None) -> float:
    counts = [0] * n
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while time.monotonic() < stop:
                conn.execute(sql, ["x"], prepare=True)
                if after:
                    conn.execute(after, prepare=True)
                counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def client_producers(dsn: str, schema: str, n: int, seconds: float, in_txn: bool) -> float:
    """pgdurable's own Client.insert from n threads sharing one client: the notify either
    rides each insert's transaction (as with conn=) or goes out after it, coalesced."""
    counts = [0] * n
    stop = time.monotonic() + seconds
    with Client(dsn, schema=schema, max_connections=n + 1) as client:

        def run(i: int) -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                while time.monotonic() < stop:
                    client.insert("bench_job", {}, queue="bench", conn=conn if in_txn else None)
                    counts[i] += 1

        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--producers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    schema = f"bench_{secrets.token_hex(3)}"
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        migrations.migrate(conn, schema)
    try:
        in_txn = [
            client_producers(args.dsn, schema, args.producers, args.seconds, True) for _ in range(args.rounds)
        ]
        after = [
            client_producers(args.dsn, schema, args.producers, args.seconds, False)
            for _ in range(args.rounds)
        ]
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    c_in, c_after = sorted(in_txn)[len(in_txn) // 2], sorted(after)[len(after) // 2]
    table = f"bench_notify_{secrets.token_hex(3)}"
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, payload text)"
        )
        listener = psycopg.connect(args.dsn, autocommit=True)
        listener.execute("LISTEN bench_notify_q")  # a listener, as in production
        try:
            plain, notify, after = [], [], []
            for _ in range(args.rounds):  # interleaved, so drift hits all alike
                plain.append(producers(args.dsn, INSERT.format(t=table), args.producers, args.seconds))
                notify.append(
                    producers(args.dsn, INSERT_NOTIFY.format(t=table), args.producers, args.seconds)
                )
                after.append(
                    producers(args.dsn, INSERT.format(t=table), args.producers, args.seconds, NOTIFY_AFTER)
                )
        finally:
            listener.close()
            conn.execute(f"DROP TABLE {table}")
    p, n = sorted(plain)[len(plain) // 2], sorted(notify)[len(notify) // 2]
    a = sorted(after)[len(after) // 2]
    print(f"{args.producers} producers, single-row durable inserts, median of {args.rounds} rounds")
    print(f"{'variant':<28}{'inserts/s':>12}")
    print(f"{'insert':<28}{p:>12,.0f}")
    print(f"{'insert + NOTIFY in the txn':<28}{n:>12,.0f}")
    print(f"{'insert, then NOTIFY alone':<28}{a:>12,.0f}")
    print(f"ratios to plain insert: in the txn {n / p:.2f}, after it {a / p:.2f}")
    print()
    print(f"{'pgdurable Client.insert':<40}{'inserts/s':>12}")
    print(f"{'  NOTIFY in the insert transaction':<40}{c_in:>12,.0f}")
    print(f"{'  NOTIFY after commit, coalesced':<40}{c_after:>12,.0f}")
    print(f"ratio coalesced / in the txn: {c_after / c_in:.2f}")


if __name__ == "__main__":
    main()
