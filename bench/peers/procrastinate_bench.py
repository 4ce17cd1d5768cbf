"""procrastinate (psycopg 3 connector) on the benchmark's workloads.

Workers: ``run_worker_async(concurrency=10)`` per process, LISTEN/NOTIFY on (default),
polling fallback at its default, finished jobs kept (``delete_jobs="never"``, the
default). Producers use ``batch_defer_async`` and ``defer_async``. No durable steps: the
5-step machine is a chain of jobs, each deferring the next with the state as arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging

import psycopg
from harness import ProcessFleet, Settings, advance, main, stamp, worker_ready
from procrastinate import App, PsycopgConnector

QUEUE = "bench"
app = App(connector=PsycopgConnector())


@app.task(name="noop", queue=QUEUE)
async def noop() -> None:
    return None


@app.task(name="stamp", queue=QUEUE)
async def stamped(seq: int) -> None:
    stamp(seq)


@app.task(name="fsm_step", queue=QUEUE)
async def fsm_step(state: dict, step: int) -> None:
    state = advance(state, step)
    if step + 1 == 5:
        await fsm_final.defer_async(state=state, step=5)
    else:
        await fsm_step.defer_async(state=state, step=step + 1)


@app.task(name="fsm_final", queue=QUEUE)
async def fsm_final(state: dict, step: int) -> None:
    advance(state, step)


class Procrastinate:
    name = "procrastinate"
    version = importlib.metadata.version("procrastinate")
    settings_note = (
        "psycopg 3 connector; per process `run_worker_async(concurrency=10)`, LISTEN/NOTIFY and "
        "polling at their defaults, finished jobs kept (default)"
    )
    unsupported = {"fsm_inline": "no inline run-ahead (a chain of jobs)"}

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.opened = False
        self.stack = contextlib.ExitStack()
        self.conn: psycopg.AsyncConnection | None = None

    async def _open(self) -> None:
        if not self.opened:
            connector = PsycopgConnector(conninfo=self.dsn, min_size=1, max_size=Settings().producers + 1)
            self.stack.enter_context(app.replace_connector(connector))
            await app.open_async()
            self.opened = True

    async def _conn(self) -> psycopg.AsyncConnection:
        if self.conn is None:
            self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        return self.conn

    async def _one(self, sql: str, *params: object) -> int:
        cur = await (await self._conn()).execute(sql, params)
        row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def setup(self) -> None:
        await self._open()
        await app.schema_manager.apply_schema_async()

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        if self.opened:
            await app.close_async()
            self.stack.close()
            self.opened = False

    async def start_fleet(self, s: Settings) -> ProcessFleet:
        return await ProcessFleet(__file__, self.dsn, s).ready()

    async def mark(self) -> int:
        return await self._one("SELECT COALESCE(max(id), 0) FROM procrastinate_jobs")

    async def ping(self) -> None:
        await self._one("SELECT 1")

    async def done(self, kind: str, mark: int) -> int:
        task = {"noop": "noop", "fsm": "fsm_final"}[kind]
        return await self._one(
            "SELECT count(*) FROM procrastinate_jobs WHERE id > %s AND task_name = %s"
            " AND status = 'succeeded'",
            mark,
            task,
        )

    async def insert_noop_many(self, n: int, batch: int) -> None:
        await self._open()
        for i in range(0, n, batch):
            await noop.batch_defer_async(*[{} for _ in range(min(batch, n - i))])

    async def insert_noop_one(self) -> None:
        await self._open()
        await noop.defer_async()

    async def insert_fsm(self, n: int, inline: bool) -> None:
        await self._open()
        for i in range(0, n, 1000):
            await fsm_step.batch_defer_async(
                *[{"state": {"n": k}, "step": 1} for k in range(i, min(n, i + 1000))]
            )

    async def insert_stamp(self, seq: int) -> None:
        await self._open()
        await stamped.defer_async(seq=seq)

    async def seed(self, terminal: int, future: int) -> None:
        conn = await self._conn()
        await conn.execute(
            """INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, attempts)
               SELECT %s, 'noop', '{}', 'succeeded', 1 FROM generate_series(1, %s)""",
            (QUEUE, terminal),
        )
        await conn.execute(
            """INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, scheduled_at)
               SELECT %s, 'noop', '{}', 'todo', now() + interval '1 day' FROM generate_series(1, %s)""",
            (QUEUE, future),
        )
        await conn.execute("VACUUM ANALYZE procrastinate_jobs")
        await conn.execute("CHECKPOINT")  # seeding's dirty pages and WAL not billed to the burst
        await conn.execute("VACUUM ANALYZE procrastinate_events")


def worker(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)

    async def run() -> None:
        with app.replace_connector(PsycopgConnector(conninfo=args.dsn)):
            await app.open_async()
            worker_ready()
            try:
                await app.run_worker_async(
                    queues=[QUEUE], concurrency=args.knobs.get("concurrency", args.concurrency)
                )
            finally:
                await app.close_async()

    asyncio.run(run())


if __name__ == "__main__":
    main(Procrastinate, worker)
