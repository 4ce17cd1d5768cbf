"""pgqueuer (asyncpg driver) on the benchmark's workloads.

Workers: one ``QueueManager`` per process on its own asyncpg connection (as its performance
guide recommends), ``batch_size = 10``, ``max_concurrent_tasks = 20``; `pgq autovac`
settings applied after install. Producers use an asyncpg pool. pgqueuer has no durable
steps: the 5-step machine is a chain of jobs, each step enqueueing the next with the
state as payload. Finished jobs leave the ``pgqueuer`` table for ``pgqueuer_log``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import signal
from datetime import timedelta
from typing import Any

import asyncpg
from harness import ProcessFleet, Settings, advance, main, stamp, worker_ready
from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, PgQueuer, Queries
from pgqueuer.models import Job

BATCH_SIZE = 10
MAX_TASKS = 20


class Pgqueuer:
    name = "pgqueuer"
    version = importlib.metadata.version("pgqueuer")
    settings_note = (
        f"asyncpg; per process one `QueueManager` on its own connection, `batch_size = {BATCH_SIZE}`, "
        f"`max_concurrent_tasks = {MAX_TASKS}`; `pgq autovac` applied; durable (logged) tables"
    )
    unsupported = {"fsm_inline": "no inline run-ahead (a chain of jobs)"}

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.pool: asyncpg.Pool | None = None
        self.conn: asyncpg.Connection | None = None  # ping(), apart from the producers

    async def _q(self) -> tuple[asyncpg.Pool, Queries]:
        if self.pool is None:
            self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=Settings().producers + 1)
        return self.pool, Queries(AsyncpgPoolDriver(self.pool))

    async def setup(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            q = Queries(AsyncpgDriver(conn))
            await q.install()
            await q.optimize_autovacuum()
        finally:
            await conn.close()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.conn is not None:
            await self.conn.close()

    async def start_fleet(self, s: Settings) -> ProcessFleet:
        return await ProcessFleet(__file__, self.dsn, s).ready()

    async def ping(self) -> None:
        if self.conn is None:
            self.conn = await asyncpg.connect(self.dsn)
        await self.conn.execute("SELECT 1")

    async def mark(self) -> int:
        pool, _ = await self._q()
        return int(
            await pool.fetchval("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM pgqueuer_id_seq")
        )

    async def done(self, kind: str, mark: int) -> int:
        pool, _ = await self._q()
        entrypoint = {"noop": "noop", "fsm": "fsm_final"}[kind]
        return int(
            await pool.fetchval(
                "SELECT count(*) FROM pgqueuer_log WHERE job_id > $1 AND entrypoint = $2"
                " AND status = 'successful'",
                mark,
                entrypoint,
            )
        )

    async def insert_noop_many(self, n: int, batch: int) -> None:
        _, q = await self._q()
        for i in range(0, n, batch):
            k = min(batch, n - i)
            await q.enqueue(["noop"] * k, [None] * k, [0] * k)

    async def insert_noop_one(self) -> None:
        _, q = await self._q()
        await q.enqueue("noop", None)

    async def insert_fsm(self, n: int, inline: bool) -> None:
        _, q = await self._q()
        for i in range(0, n, 1000):
            ks = range(i, min(n, i + 1000))
            payloads = [json.dumps({"n": k, "step": 1}).encode() for k in ks]
            await q.enqueue(["fsm_step"] * len(payloads), payloads, [0] * len(payloads))

    async def insert_stamp(self, seq: int) -> None:
        _, q = await self._q()
        await q.enqueue("stamp", str(seq).encode())

    async def seed(self, terminal: int, future: int) -> None:
        pool, _ = await self._q()
        await pool.execute(
            """INSERT INTO pgqueuer_log (job_id, status, priority, entrypoint, aggregated)
               SELECT -g, 'successful', 0, 'noop', true FROM generate_series(1, $1) AS g""",
            terminal,
        )
        await pool.execute(
            """INSERT INTO pgqueuer (priority, status, entrypoint, execute_after, payload)
               SELECT 0, 'queued', 'noop', now() + interval '1 day', NULL FROM generate_series(1, $1)""",
            future,
        )
        await pool.execute("VACUUM ANALYZE pgqueuer")
        await pool.execute("VACUUM ANALYZE pgqueuer_log")
        await pool.execute("CHECKPOINT")  # seeding's dirty pages and WAL not billed to the burst


def worker(args: argparse.Namespace) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(args.dsn)
        producers = await asyncpg.create_pool(args.dsn, min_size=1, max_size=4)
        q = Queries(AsyncpgPoolDriver(producers))
        pgq = PgQueuer.from_asyncpg_connection(conn)

        @pgq.entrypoint("noop")
        async def noop(job: Job) -> None:
            return None

        @pgq.entrypoint("stamp")
        async def stamped(job: Job) -> None:
            assert job.payload is not None
            stamp(int(job.payload))

        async def chain(job: Job) -> dict[str, Any]:
            assert job.payload is not None
            state = json.loads(job.payload)
            return {**advance(state, state["step"]), "step": state["step"] + 1}

        @pgq.entrypoint("fsm_step")
        async def fsm_step(job: Job) -> None:
            state = await chain(job)
            await q.enqueue("fsm_final" if state["step"] == 5 else "fsm_step", json.dumps(state).encode())

        @pgq.entrypoint("fsm_final")
        async def fsm_final(job: Job) -> None:
            await chain(job)

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, pgq.shutdown.set)
        worker_ready()
        await pgq.run(
            batch_size=args.knobs.get("batch_size", BATCH_SIZE),
            max_concurrent_tasks=args.knobs.get("max_concurrent_tasks", MAX_TASKS),
            dequeue_timeout=timedelta(seconds=30),
        )
        await producers.close()

    asyncio.run(run())


if __name__ == "__main__":
    main(Pgqueuer, worker)
