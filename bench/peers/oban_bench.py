"""Oban for Python (``oban``) on the benchmark's workloads.

Workers: one ``Oban(queues={"bench": 10})`` node per process (multi-process execution
within one node is an Oban Pro feature; two nodes share the queue), other plugins at
their defaults (stager 1 s, pruner off for a day). Producers use a client-mode ``Oban``
and ``enqueue_many``. No durable steps: the 5-step machine is a chain of jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import signal
from typing import Any

import psycopg
from harness import ProcessFleet, Settings, advance, main, stamp, worker_ready
from oban import Oban, job
from oban.schema import install

QUEUE = "bench"


@job(queue=QUEUE)
async def noop() -> None:
    return None


@job(queue=QUEUE)
async def stamped(seq: int) -> None:
    stamp(seq)


@job(queue=QUEUE)
async def fsm_step(state: dict, step: int) -> None:
    state = advance(state, step)
    # Not fsm_step.enqueue(...): in oban 0.7.0 a function job's enqueue() hands its args
    # dict to new() as the first positional argument and fails for two or more parameters.
    nxt = fsm_final.new(state, 5) if step + 1 == 5 else fsm_step.new(state, step + 1)
    await Oban.get_instance().enqueue(nxt)


@job(queue=QUEUE)
async def fsm_final(state: dict, step: int) -> None:
    advance(state, step)


def worker_name(w: object) -> str:
    return f"{w.__module__}.{w.__qualname__}"  # type: ignore[attr-defined]


class ObanPy:
    name = "oban"
    version = importlib.metadata.version("oban")
    settings_note = (
        "per process one node `Oban(queues={'bench': 10})`, plugins at their defaults "
        "(stager every 1 s); producers use `enqueue_many`"
    )
    unsupported = {"fsm_inline": "no inline run-ahead (a chain of jobs)"}

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.pool = None
        self.oban: Oban | None = None
        self.conn: psycopg.AsyncConnection[Any] | None = None  # ping(), apart from the producers

    async def _oban(self) -> Oban:
        if self.oban is None:
            self.pool = await Oban.create_pool(self.dsn, min_size=1, max_size=Settings().producers + 1)
            self.oban = Oban(pool=self.pool)  # client mode: no queues, no leadership
        return self.oban

    async def _one(self, sql: str, *params: object) -> int:
        await self._oban()
        assert self.pool is not None
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def setup(self) -> None:
        await self._oban()
        await install(self.pool)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.conn is not None:
            await self.conn.close()

    async def start_fleet(self, s: Settings) -> ProcessFleet:
        return await ProcessFleet(__file__, self.dsn, s).ready()

    async def ping(self) -> None:
        if self.conn is None:
            self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        await self.conn.execute("SELECT 1")

    async def mark(self) -> int:
        return await self._one("SELECT COALESCE(max(id), 0) FROM oban_jobs")

    async def done(self, kind: str, mark: int) -> int:
        w = {"noop": noop, "fsm": fsm_final}[kind]
        return await self._one(
            "SELECT count(*) FROM oban_jobs WHERE id > %s AND worker = %s AND state = 'completed'",
            mark,
            worker_name(w),
        )

    async def insert_noop_many(self, n: int, batch: int) -> None:
        oban = await self._oban()
        for i in range(0, n, batch):
            await oban.enqueue_many([noop.new() for _ in range(min(batch, n - i))])

    async def insert_noop_one(self) -> None:
        oban = await self._oban()
        await oban.enqueue(noop.new())

    async def insert_fsm(self, n: int, inline: bool) -> None:
        oban = await self._oban()
        for i in range(0, n, 1000):
            await oban.enqueue_many([fsm_step.new({"n": k}, 1) for k in range(i, min(n, i + 1000))])

    async def insert_stamp(self, seq: int) -> None:
        oban = await self._oban()
        await oban.enqueue(stamped.new(seq))

    async def seed(self, terminal: int, future: int) -> None:
        await self._oban()
        assert self.pool is not None
        async with self.pool.connection() as conn:
            await conn.set_autocommit(True)
            await conn.execute(
                """INSERT INTO oban_jobs (state, queue, worker, args, attempt, attempted_at, completed_at)
                   SELECT 'completed', %s, %s, '{}', 1, timezone('UTC', now()), timezone('UTC', now())
                   FROM generate_series(1, %s)""",
                (QUEUE, worker_name(noop), terminal),
            )
            await conn.execute(
                """INSERT INTO oban_jobs (state, queue, worker, args, scheduled_at)
                   SELECT 'scheduled', %s, %s, '{}', timezone('UTC', now()) + interval '1 day'
                   FROM generate_series(1, %s)""",
                (QUEUE, worker_name(noop), future),
            )
            await conn.execute("VACUUM ANALYZE oban_jobs")
            await conn.execute("CHECKPOINT")  # seeding's dirty pages and WAL not billed to the burst


def worker(args: argparse.Namespace) -> None:
    async def run() -> None:
        pool = await Oban.create_pool(args.dsn)
        oban = Oban(pool=pool, queues={QUEUE: args.knobs.get("limit", args.concurrency)})
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await oban.start()
        worker_ready()
        await stop.wait()
        await oban.stop()
        await pool.close()

    asyncio.run(run())


if __name__ == "__main__":
    main(ObanPy, worker)
