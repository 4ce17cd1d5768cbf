"""pgdurable's side of the benchmark: a real supervisor and its workers, the light client.

    python bench/workloads_pgdurable.py run --dsn postgresql://.../scratch --insert-dsn ... [--quick]

Run by bench/run.py with pgdurable's interpreter; the database must exist (the schema is
created here with ``pgdurable.db.migrations``).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from fleet import SupervisorFleet
from harness import Settings, main
from pgdurable_machines import (
    QUEUE,
    ROWS_DSN,
    Five,
    FiveInline,
    FiveRows,
    FiveRowsOwn,
    FiveState,
    noop,
    stamped,
)

from pgdurable import Insert
from pgdurable.client import AsyncClient
from pgdurable.db import migrations

SCHEMA = "pgdurable"
ROWS_TABLE = "CREATE TABLE IF NOT EXISTS bench_rows (iid bigint NOT NULL, step int NOT NULL)"


class Pgdurable:
    name = "pgdurable"
    version = importlib.metadata.version("pgdurable")
    settings_note = (
        "`pgdurable supervise` with 2 worker processes for queue `bench`, every other key at its "
        "default (`concurrency = 10`, `prefetch = 10`, `batch = 400`); async steps; "
        "producers use `AsyncClient` (a lone write notifies in its transaction, "
        "concurrent ones coalesce after commit)"
    )
    unsupported: dict[str, str] = {}

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.client = AsyncClient(dsn, schema=SCHEMA, max_connections=Settings().producers + 1)
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def _conn(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None:
            self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        return self.conn

    async def setup(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            migrations.migrate(conn, SCHEMA)
            conn.execute(ROWS_TABLE)
        await self.prepare()

    async def prepare(self) -> None:
        os.environ[ROWS_DSN] = self.dsn  # the workers' own connections (fsm_insert_own)

    async def close(self) -> None:
        await self.client.close()
        if self.conn is not None:
            await self.conn.close()

    async def start_fleet(self, s: Settings) -> SupervisorFleet:
        # Every key at pgdurable's default but those the knobs name (bench/fair.py's sweep).
        fleet = SupervisorFleet(self.dsn, SCHEMA, {"processes": s.processes, **s.knobs})
        try:
            return await fleet.ready()
        except BaseException:
            await fleet.stop()  # a supervisor that never got ready is not left behind
            raise

    async def mark(self) -> int:
        conn = await self._conn()
        cur = await conn.execute(f"SELECT COALESCE(max(id), 0) FROM {SCHEMA}.instances")
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def ping(self) -> None:
        await (await self._conn()).execute("SELECT 1")

    async def done(self, kind: str, mark: int) -> int:
        fsm = {
            "noop": "bench_noop",
            "fsm": "bench_five",
            "fsm_inline": "bench_five_inline",
            "fsm_insert": "bench_five_rows",
            "fsm_insert_own": "bench_five_rows_own",
        }[kind]
        conn = await self._conn()
        cur = await conn.execute(
            f"SELECT count(*) FROM {SCHEMA}.instances WHERE id > %s AND fsm = %s AND status = 'done'",
            [mark, fsm],
            prepare=True,
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def insert_noop_many(self, n: int, batch: int) -> None:
        for i in range(0, n, batch):
            await self.client.insert_many([Insert(noop, {}) for _ in range(min(batch, n - i))])

    async def insert_noop_one(self) -> None:
        await self.client.insert(noop, {})

    async def insert_fsm(self, n: int, inline: bool) -> None:
        machine = FiveInline if inline else Five
        for i in range(0, n, 1000):
            await self.client.insert_many(
                [Insert(machine, FiveState(n=k)) for k in range(i, min(n, i + 1000))]
            )

    async def insert_fsm_rows(self, n: int, kind: str) -> None:
        machine = FiveRows if kind == "fsm_insert" else FiveRowsOwn
        for i in range(0, n, 1000):
            await self.client.insert_many(
                [Insert(machine, FiveState(n=k)) for k in range(i, min(n, i + 1000))]
            )

    async def rows(self) -> int:
        """Rows the steps inserted so far (the check that each step's insert happened)."""
        cur = await (await self._conn()).execute("SELECT count(*) FROM bench_rows")
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def insert_stamp(self, seq: int) -> None:
        await self.client.insert(stamped, {"seq": seq})

    async def seed(self, terminal: int, future: int) -> None:
        conn = await self._conn()
        await conn.execute(
            f"""INSERT INTO {SCHEMA}.instances (fsm, version, step, state, status, queue, result)
                SELECT 'bench_noop', 1, 'perform', '{{}}', 'done', %s, 'null'
                FROM generate_series(1, %s)""",
            [QUEUE, terminal],
        )
        await conn.execute(
            f"""INSERT INTO {SCHEMA}.instances (fsm, version, step, state, queue, eligible_at)
                SELECT 'bench_noop', 1, 'perform', '{{}}', %s, now() + interval '1 day'
                FROM generate_series(1, %s)""",
            [QUEUE, future],
        )
        await conn.execute(f"VACUUM ANALYZE {SCHEMA}.instances")
        await conn.execute("CHECKPOINT")  # seeding's dirty pages and WAL not billed to the burst


if __name__ == "__main__":
    main(Pgdurable, None)
