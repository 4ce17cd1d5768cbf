"""Chancy on the benchmark's workloads.

Workers: one ``Worker`` per process; queue ``bench`` declared with ``concurrency = 10``,
the ``AsyncExecutor`` (its docs' choice for ``async def`` jobs; the default is a process
pool) and ``eager_polling = True`` (its docs' setting when jobs are continuously
available; otherwise a worker that emptied its slots waits for the 5 s poll or a push
notification). Default plugins stay on. Producers use ``push_many`` and ``push``. No
durable steps: the 5-step machine is a chain of jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import signal
from typing import Any

import psycopg
from chancy import Chancy, Queue, Worker, job
from chancy.utils import chancy_uuid
from harness import ProcessFleet, Settings, advance, main, stamp, worker_ready

QUEUE = "bench"
EXECUTOR = "chancy.executors.asyncex.AsyncExecutor"
WORKER_APP: dict[str, Chancy] = {}  # the worker process's app, for jobs that push jobs
# Seeded rows get ids below every real (time-ordered) job id, so done() never counts them.
LOW_ID = "('00000000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid"


@job(queue=QUEUE)
async def noop() -> None:
    return None


@job(queue=QUEUE)
async def stamped(seq: int) -> None:
    stamp(seq)


@job(queue=QUEUE)
async def fsm_step(state: dict, step: int) -> None:
    state = advance(state, step)
    nxt = fsm_final if step + 1 == 5 else fsm_step
    await WORKER_APP["app"].push(nxt.job.with_kwargs(state=state, step=step + 1))


@job(queue=QUEUE)
async def fsm_final(state: dict, step: int) -> None:
    advance(state, step)


class ChancyPeer:
    name = "chancy"
    version = importlib.metadata.version("chancy")
    settings_note = (
        "per process one `Worker`; queue `concurrency = 10`, `AsyncExecutor`, `eager_polling = True`; "
        "default plugins on; producers use `push_many` (one INSERT per job inside) and `push`"
    )
    unsupported = {"fsm_inline": "no inline run-ahead (a chain of jobs)"}

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.app = Chancy(dsn, min_connection_pool_size=1, max_connection_pool_size=Settings().producers + 1)
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.opened = False

    async def _app(self) -> Chancy:
        if not self.opened:
            await self.app.__aenter__()
            self.opened = True
        return self.app

    async def _conn(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None:
            self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        return self.conn

    async def _one(self, sql: str, *params: object) -> int:
        cur = await (await self._conn()).execute(sql, params)
        row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def setup(self) -> None:
        app = await self._app()
        await app.migrate()
        await app.declare(Queue(QUEUE, concurrency=10, executor=EXECUTOR, eager_polling=True), upsert=True)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        if self.opened:
            await self.app.__aexit__(None, None, None)

    async def start_fleet(self, s: Settings) -> ProcessFleet:
        return await ProcessFleet(__file__, self.dsn, s).ready()

    async def mark(self) -> object:
        return chancy_uuid()  # time-ordered: later jobs have larger ids

    async def ping(self) -> None:
        await self._one("SELECT 1")

    async def done(self, kind: str, mark: object) -> int:
        fn = {"noop": noop, "fsm": fsm_final}[kind]
        return await self._one(
            "SELECT count(*) FROM chancy_jobs WHERE id > %s AND func = %s AND state = 'succeeded'",
            mark,
            fn.job.func,
        )

    async def insert_noop_many(self, n: int, batch: int) -> None:
        app = await self._app()
        async for _ in app.push_many([noop.job for _ in range(n)], batch_size=batch):
            pass

    async def insert_noop_one(self) -> None:
        app = await self._app()
        await app.push(noop.job)

    async def insert_fsm(self, n: int, inline: bool) -> None:
        app = await self._app()
        jobs = [fsm_step.job.with_kwargs(state={"n": k}, step=1) for k in range(n)]
        async for _ in app.push_many(jobs, batch_size=1000):
            pass

    async def insert_stamp(self, seq: int) -> None:
        app = await self._app()
        await app.push(stamped.job.with_kwargs(seq=seq))

    async def seed(self, terminal: int, future: int) -> None:
        ts = "now() - interval '1 minute'"
        conn = await self._conn()
        await conn.execute(
            f"""INSERT INTO chancy_jobs (id, queue, func, kwargs, state, attempts, created_at,
                                         started_at, completed_at, scheduled_at)
                SELECT {LOW_ID}, %s, %s, '{{}}', 'succeeded', 1, {ts}, {ts}, {ts}, {ts}
                FROM generate_series(1, %s) AS g""",
            (QUEUE, noop.job.func, terminal),
        )
        await conn.execute(
            f"""INSERT INTO chancy_jobs (id, queue, func, kwargs, state, scheduled_at)
                SELECT {LOW_ID}, %s, %s, '{{}}', 'pending', now() + interval '1 day'
                FROM generate_series(%s + 1, %s + %s) AS g""",
            (QUEUE, noop.job.func, terminal, terminal, future),
        )
        await conn.execute("VACUUM ANALYZE chancy_jobs")
        await conn.execute("CHECKPOINT")  # seeding's dirty pages and WAL not billed to the burst


def worker(args: argparse.Namespace) -> None:
    async def run() -> None:
        async with Chancy(args.dsn) as app:
            WORKER_APP["app"] = app
            if args.knobs:  # bench/fair.py's settings for the queue (declared by setup() otherwise)
                queue = Queue(
                    QUEUE,
                    concurrency=args.knobs.get("concurrency"),
                    executor=EXECUTOR,
                    eager_polling=args.knobs.get("eager_polling", False),
                )
                await app.declare(queue, upsert=True)
            async with Worker(app, register_signal_handlers=False) as w:
                stop = asyncio.Event()
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
                worker_ready()
                await stop.wait()
                await w.stop()

    asyncio.run(run())


if __name__ == "__main__":
    main(ChancyPeer, worker)
