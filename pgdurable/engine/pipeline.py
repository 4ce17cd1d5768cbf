"""The one execution path: claim a batch, run its steps, flush their outcomes.

``testing.drain()`` drives it inline; the worker processes drive the same functions with
concurrency, prefetch and a background flusher. Nothing here assumes a single process: every
claim is SKIP LOCKED and every write is guarded by the claim's fencing token.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import secrets
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from pgdurable.contract.fsm import Registry
from pgdurable.contract.spec import encode_json
from pgdurable.db.queries import Queries, for_schema
from pgdurable.engine import transactional
from pgdurable.engine.admission import admit, needs_admission
from pgdurable.engine.capture import CaptureSettings
from pgdurable.engine.claim import Claimed, claim, enrich
from pgdurable.engine.commit import FlushReport, flush
from pgdurable.engine.executor import Executor, StepTransaction
from pgdurable.engine.limits import Limits
from pgdurable.engine.outcome import Result
from pgdurable.engine.tracing import StepTracer


def new_worker_id() -> str:
    """Unique per process incarnation: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def registration(registry: Registry) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parameters of machine_register_many and instance_release_held for a registry."""
    infos = [m.__pgdurable__ for m in registry.machines()]
    machines = {
        "names": [m.name for m in infos],
        "versions": [m.version for m in infos],
        "initials": [m.initial for m in infos],
        "queues": [m.queue for m in infos],
        "steps": [encode_json(list(m.steps)) for m in infos],
        "on_cancels": [m.on_cancel for m in infos],
        "deadlines": [m.deadline for m in infos],
    }
    held = {"fsms": machines["names"], "versions": machines["versions"]}
    return machines, held


class Engine:
    """Claim / run / flush for the machines of one registry on one schema.

    ``history_off``: queues whose step attempts leave no history row (``[queues.NAME]
    history = false``); machines declared with ``history=False`` leave none either.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        schema: str = "pgdurable",
        worker_id: str | None = None,
        lease: dt.timedelta = dt.timedelta(seconds=60),
        executor: Executor | None = None,
        limits: Limits | None = None,
        history_off: Iterable[str] = (),
        capture: CaptureSettings | None = CaptureSettings(),
        tracer: StepTracer | None = None,
    ):
        self.registry = registry
        #: A span per step attempt ([tracing] enabled); None: no tracing, no cost.
        self.tracer = tracer
        self.history_off = frozenset(history_off)
        self.q: Queries = for_schema(schema)
        self.worker_id = worker_id or new_worker_id()
        self.lease = lease
        self.limits = limits or Limits()
        self.executor = executor or Executor(registry, limits=self.limits, capture=capture)
        self._gates = self.limits.claim_params()
        self._tokens = itertools.count(1)
        self.last_claimed = 0
        self.limit_errors = 0  # rows held because their limit is misconfigured

    async def register(self, conn: psycopg.AsyncConnection[Any]) -> list[int]:
        """Publish the known machines (for inserts by name) and release rows held for them.

        Returns the ids of released held rows.
        """
        machines, held = registration(self.registry)
        if not machines["names"]:
            return []
        await conn.execute(self.q["machine_register_many"], machines)
        cur = await conn.execute(self.q["instance_release_held"], held)
        return [row[0] for row in await cur.fetchall()]

    async def claim(
        self,
        conn: psycopg.AsyncConnection[Any],
        queue: str,
        limit: int,
        horizon: dt.timedelta = dt.timedelta(0),
    ) -> list[Claimed]:
        """Claim, admit (only rows with limits), and enrich a batch."""
        self.last_claimed = 0
        rows = await claim(
            conn,
            self.q,
            queue=queue,
            limit=limit,
            worker=self.worker_id,
            token=next(self._tokens),
            lease=self.lease,
            horizon=horizon,
            gates=self._gates,
        )
        self.last_claimed = len(rows)  # before admission: denied rows were claimed too
        if needs_admission(rows):
            verdicts = await admit(conn, self.q, self.worker_id, rows, self.limits)
            self.limit_errors += len(verdicts.held)  # reported by workers as a metric
            rows = verdicts.admitted
        await enrich(conn, self.q, rows)
        return rows

    def transactional(self, row: Claimed) -> bool:
        """Whether the row's next step is transactional: run it with ``run_transactional``."""
        return transactional.step_of(self.registry, row) is not None

    def keeps_snapshot(self, row: Claimed) -> bool:
        """Whether the row's step holds a snapshot (repeatable read, serializable): the
        heartbeat must not extend its lease while it runs (engine.transactional)."""
        return transactional.keeps_snapshot(self.registry, row)

    async def run_transactional(
        self, conn: psycopg.AsyncConnection[Any], row: Claimed, quiet_queue: str | None = None
    ) -> tuple[Result, FlushReport | None]:
        """Run a transactional step on ``conn`` and commit it with its outcome; a None
        report: it rolled back, commit the result with ``flush`` (engine.transactional)."""
        sdef = transactional.step_of(self.registry, row)
        assert sdef is not None
        return await transactional.run_step(
            conn,
            self.q,
            self.worker_id,
            row,
            sdef,
            self.run,
            self.executor,
            self.release,
            {"quiet_queue": quiet_queue, "lease": self.lease},
        )

    async def run(self, row: Claimed, tx: StepTransaction | None = None) -> Result:
        if self.tracer is not None:
            result = await self.tracer.run(row, lambda r: self.executor.run(r, tx))
        else:
            result = await self.executor.run(row, tx)
        if row.queue in self.history_off:
            result.history = False
        else:
            found = self.registry.get(row.fsm, result.version or row.version)
            result.history = found is None or found[0].__pgdurable__.history
        return result

    async def flush(
        self, conn: psycopg.AsyncConnection[Any], results: Sequence[Result], quiet_queue: str | None = None
    ) -> FlushReport:
        return await flush(conn, self.q, self.worker_id, results, quiet_queue, self.lease)

    async def release(self, conn: psycopg.AsyncConnection[Any], rows: Sequence[Claimed]) -> None:
        """Give claimed rows that will not run back to runnable (and their gate slots); a
        row a cancel marked is cancelled instead (or sent to its on_cancel step)."""
        if rows:
            params = {
                "worker": self.worker_id,
                "ids": [r.id for r in rows],
                "tokens": [r.token for r in rows],
            }
            cur = await conn.execute(self.q["instance_release_many"], params)
            if len(await cur.fetchall()) < len(rows):  # a claim lost, or a cancel to settle
                await conn.execute(self.q["instance_cancel_settle_if_owned_many"], {**params, "join": True})
