"""DBOS Transact (``dbos``) on the benchmark's workloads.

Workers: one launched ``DBOS`` per process (own executor id) running queue ``bench`` with
``worker_concurrency = 20`` and ``polling_interval_sec = 0.1`` (the default, 1 s, caps a
process at 20 workflows a second; the option exists to lower latency). Producers use
``DBOSClient.enqueue_async``; DBOS has no batch enqueue, so bursts are enqueued by 16
concurrent producers. The 5-step machine is one workflow calling five ``@DBOS.step``
functions, each checkpointed: DBOS's own durable-steps model. The 5-step machine inserting a
row in every step (``fsm_insert``) is one sync workflow calling a transaction of an
``SQLAlchemyDatasource`` five times (DBOS 3 has no application database for
``@DBOS.transaction``; a datasource transaction commits the step's writes with its
checkpoint), on the same database as DBOS's system tables, at ``READ COMMITTED`` (DBOS's
default is ``SERIALIZABLE``; pgdurable's is read committed).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from dbos import DBOS, DBOSClient, SQLAlchemyDatasource
from harness import ProcessFleet, Settings, advance, main, stamp, worker_ready

QUEUE = "bench"
PRODUCERS = 16


@DBOS.workflow(name="noop_wf")
async def noop_wf() -> None:
    return None


@DBOS.workflow(name="stamp_wf")
async def stamp_wf(seq: int) -> None:
    stamp(seq)


@DBOS.step(name="fsm_step")
async def fsm_step(state: dict, k: int) -> dict:
    return advance(state, k)


ROWS_TABLE = "CREATE TABLE IF NOT EXISTS bench_rows (iid bigint NOT NULL, step int NOT NULL)"
#: The worker's datasource and its transaction (built in ``worker``: one per process).
_TX: dict[str, Any] = {}


def _insert_row(iid: int, k: int) -> None:
    _TX["ds"].sql_session().execute(
        sa.text("INSERT INTO bench_rows (iid, step) VALUES (:iid, :k)"), {"iid": iid, "k": k}
    )


@DBOS.workflow(name="rows_wf")
def rows_wf(iid: int) -> None:
    for k in range(1, 6):
        _TX["row"](iid, k)


@DBOS.workflow(name="fsm_wf")
async def fsm_wf(state: dict) -> dict:
    for k in range(1, 6):
        state = await fsm_step(state, k)
    return state


class Dbos:
    name = "dbos"
    version = importlib.metadata.version("dbos")
    settings_note = (
        "per process one launched `DBOS`; queue `worker_concurrency = 20`, `polling_interval_sec = 0.1`; "
        "producers use `DBOSClient.enqueue_async` (no batch enqueue: bursts from 16 concurrent producers)"
    )
    unsupported = {
        "insert_many": "no batch enqueue API",
        "fsm_inline": "steps of a workflow already run in-process, one after the other (row above)",
        "fsm_insert_own": "measured for pgdurable only (its at-least-once reference)",
    }

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.client: DBOSClient | None = None
        self.conn: psycopg.AsyncConnection[Any] | None = None

    def _client(self) -> DBOSClient:
        if self.client is None:
            self.client = DBOSClient(system_database_url=self.dsn, system_database_pool_size=PRODUCERS + 4)
        return self.client

    async def _conn(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None:
            self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        return self.conn

    async def _one(self, sql: str, *params: object) -> int:
        cur = await (await self._conn()).execute(sql, params)
        row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def setup(self) -> None:
        dbos_cli = Path(sys.executable).with_name("dbos")
        await asyncio.to_thread(
            subprocess.run, [str(dbos_cli), "migrate", "-s", self.dsn], check=True, capture_output=True
        )
        await asyncio.to_thread(SQLAlchemyDatasource.migrate, self.dsn)
        await (await self._conn()).execute(ROWS_TABLE)

    async def close(self) -> None:
        if self.client is not None:
            self.client.destroy()
        if self.conn is not None:
            await self.conn.close()

    async def start_fleet(self, s: Settings) -> ProcessFleet:
        return await ProcessFleet(__file__, self.dsn, s).ready()

    async def mark(self) -> int:
        return await self._one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")

    async def ping(self) -> None:
        await self._one("SELECT 1")

    async def done(self, kind: str, mark: int) -> int:
        name = {"noop": "noop_wf", "fsm": "fsm_wf", "fsm_insert": "rows_wf"}[kind]
        return await self._one(
            "SELECT count(*) FROM dbos.workflow_status WHERE created_at >= %s AND name = %s"
            " AND status = 'SUCCESS'",
            mark,
            name,
        )

    async def _enqueue(self, workflow: str, *args: Any) -> None:
        await self._client().enqueue_async({"queue_name": QUEUE, "workflow_name": workflow}, *args)

    async def _concurrently(self, workflow: str, all_args: list[tuple[Any, ...]]) -> None:
        pending = iter(all_args)

        async def producer() -> None:
            for args in pending:
                await self._enqueue(workflow, *args)

        await asyncio.gather(*(producer() for _ in range(PRODUCERS)))

    async def insert_noop_many(self, n: int, batch: int) -> None:
        await self._concurrently("noop_wf", [() for _ in range(n)])

    async def insert_noop_one(self) -> None:
        await self._enqueue("noop_wf")

    async def insert_fsm(self, n: int, inline: bool) -> None:
        await self._concurrently("fsm_wf", [({"n": k},) for k in range(n)])

    async def insert_fsm_rows(self, n: int, kind: str) -> None:
        await self._concurrently("rows_wf", [(k,) for k in range(n)])

    async def rows(self) -> int:
        return await self._one("SELECT count(*) FROM bench_rows")

    async def insert_stamp(self, seq: int) -> None:
        await self._enqueue("stamp_wf", seq)

    async def seed(self, terminal: int, future: int) -> None:
        conn = await self._conn()
        before = "(extract(epoch FROM now()) * 1000)::bigint - 60000"
        await conn.execute(
            f"""INSERT INTO dbos.workflow_status (workflow_uuid, status, name, queue_name, created_at,
                                                  updated_at, completed_at, output, application_version)
                SELECT gen_random_uuid()::text, 'SUCCESS', 'noop_wf', %s, {before}, {before}, {before},
                       NULL, 'seed'
                FROM generate_series(1, %s)""",
            (QUEUE, terminal),
        )
        await conn.execute(
            f"""INSERT INTO dbos.workflow_status (workflow_uuid, status, name, queue_name, created_at,
                                                  updated_at, delay_until_epoch_ms, application_version)
                SELECT gen_random_uuid()::text, 'DELAYED', 'noop_wf', %s, {before}, {before},
                       (extract(epoch FROM now()) * 1000)::bigint + 86400000, 'seed'
                FROM generate_series(1, %s)""",
            (QUEUE, future),
        )
        await conn.execute("VACUUM ANALYZE dbos.workflow_status")
        await conn.execute("CHECKPOINT")  # seeding's dirty pages and WAL not billed to the burst


def worker(args: argparse.Namespace) -> None:
    DBOS(
        config={
            "name": "bench",
            "system_database_url": args.dsn,
            "executor_id": f"bench-{args.index}-{os.getpid()}",
            "log_level": "WARNING",
            "run_migrations": False,
        }
    )
    ds = SQLAlchemyDatasource.create(args.dsn, run_migrations=False)
    _TX["ds"] = ds
    _TX["row"] = ds.transaction(name="insert_row", isolation_level="READ COMMITTED")(_insert_row)
    DBOS.launch()
    DBOS.register_queue(
        QUEUE,
        worker_concurrency=args.knobs.get("worker_concurrency", 2 * args.concurrency),
        polling_interval_sec=args.knobs.get("polling_interval_sec", 0.1),
    )
    stop = asyncio.Event()

    async def run() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        worker_ready()
        await stop.wait()

    asyncio.run(run())
    DBOS.destroy()


if __name__ == "__main__":
    main(Dbos, worker)
