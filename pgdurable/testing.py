"""Drive machines to completion inside a test, through the real claim / run / flush path.

``drain()`` claims whatever is runnable, runs each step inline and commits its outcome,
until nothing is left. Delays, retries and await timeouts are collapsed by default (time
jumps forward to the next scheduled thing); ``collapse_time=False`` leaves future work
parked. Expiry and deadlines (docs/deadlines.md) are checked on the real clock before each
round, as the maintenance process's sweep would. ``max_steps`` turns a machine that never
settles into a clear failure.
``fire_schedules()`` runs one cron pass, at a time of the test's choosing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg

from pgdurable.client import Client, Instance
from pgdurable.contract.errors import DrainLimitExceeded
from pgdurable.contract.fsm import FSM, Registry
from pgdurable.engine.capture import CaptureSettings
from pgdurable.engine.claim import Claimed
from pgdurable.engine.commit import FlushReport, continued
from pgdurable.engine.limits import Limits
from pgdurable.engine.outcome import Result
from pgdurable.engine.pipeline import Engine
from pgdurable.engine.schedules import FireReport
from pgdurable.engine.tracing import StepTracer

#: How far a collapsed drain looks ahead: far enough to cover any delay a test would use.
COLLAPSED = dt.timedelta(days=365 * 100)
KINDS = ("next", "retry", "await", "spawn", "done", "stop", "hold", "stale", "rejoin")


@dataclass(frozen=True, slots=True)
class Tally:
    """What a drain did, by outcome kind (``hold``: unknown machine; ``stale``: lost claim)."""

    next: int = 0
    retry: int = 0
    await_: int = 0
    spawn: int = 0
    done: int = 0
    stop: int = 0
    hold: int = 0
    stale: int = 0
    timeouts: int = 0
    rejoin: int = 0  # a fail_fast parent waited again for the siblings it cancelled

    @property
    def steps(self) -> int:
        return self.next + self.retry + self.await_ + self.spawn + self.done + self.stop

    def as_dict(self) -> dict[str, int]:
        return {k.rstrip("_"): getattr(self, k) for k in self.__slots__}


def _registry(machines: Registry | Iterable[type[FSM]]) -> Registry:
    return machines if isinstance(machines, Registry) else Registry(machines)


async def adrain(
    dsn: str,
    machines: Registry | Iterable[type[FSM]],
    *,
    schema: str = "pgdurable",
    queues: Iterable[str] | None = None,
    collapse_time: bool = True,
    max_steps: int = 10_000,
    batch: int = 100,
    limits: Limits | None = None,
    history_off: Iterable[str] = (),
    capture: CaptureSettings | None = CaptureSettings(),
    tracer: StepTracer | None = None,
) -> Tally:
    """Async ``drain``.

    ``limits``: the concurrency gates and rate limits to apply, as a supervisor's config
    would; ``pgdurable.runtime.config.parse_limits(concurrency_limits=..., rate_limits=...)``
    builds them from the same tables. Step history is written as a worker writes it, but
    for the queues in ``history_off`` (as ``[queues.NAME] history = false``), with the log
    lines each attempt ``capture``s (None: capture off, as ``[logging] capture = false``).
    ``tracer``: a span per step (``pgdurable.engine.tracing.StepTracer``, as ``[tracing]``).
    """
    engine = Engine(
        _registry(machines),
        schema=schema,
        limits=limits,
        history_off=history_off,
        capture=capture,
        tracer=tracer,
    )
    horizon = COLLAPSED if collapse_time else dt.timedelta(0)
    counts: Counter[str] = Counter()
    steps = 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await engine.register(conn)
        while True:
            # Expiry and deadlines on the real clock (time is collapsed for delays and
            # await timeouts only): what the maintenance process's sweep would do now.
            await conn.execute(engine.q["deadline_expire"], {"limit": batch})
            await conn.execute(engine.q["deadline_fail"], {"limit": batch})
            if queues is None:
                cur = await conn.execute(engine.q["instance_runnable_queues"], {"horizon": horizon})
                names = sorted(row[0] for row in await cur.fetchall())
            else:
                names = list(queues)
            progressed = False
            for queue in names:
                rows = await engine.claim(conn, queue, batch, horizon)
                if not rows:
                    # Rows denied by a limit were deferred into the future: with real time,
                    # claim again (work behind them may be due); with collapsed time they
                    # would only be claimed and denied again.
                    progressed = progressed or (engine.last_claimed > 0 and not collapse_time)
                    continue
                progressed = True
                while rows:  # inline continues run again at once on the claim they hold
                    results, report = await _run_round(engine, conn, rows)
                    for r in results:
                        counts["stale" if r.row.id in report.stale else r.kind] += 1
                    steps += len(rows)
                    if steps > max_steps:
                        raise DrainLimitExceeded(
                            f"drain ran {steps} steps (max_steps={max_steps}) and work remains: "
                            + ", ".join(
                                f"{r.row.fsm}#{r.row.id} at {r.step or r.row.step}" for r in results[:5]
                            )
                        )
                    rows = [continued(r.row, r) for r in results if r.inline and r.row.id in report.committed]
            if progressed:
                continue
            if collapse_time:
                cur = await conn.execute(
                    engine.q["instance_await_expire"], {"horizon": horizon, "limit": batch}
                )
                fired = len(await cur.fetchall())
                if fired:
                    counts["timeouts"] += fired
                    continue
            break
    return Tally(**{("await_" if k == "await" else k): v for k, v in counts.items()})


async def _run_round(
    engine: Engine, conn: psycopg.AsyncConnection[Any], rows: list[Claimed]
) -> tuple[list[Result], FlushReport]:
    """Run the rows' steps and commit their outcomes: a transactional step in its own
    transaction, with its outcome, as a worker runs it; the others in one group commit."""
    results: list[Result] = []
    grouped: list[Result] = []
    alone = FlushReport()
    for row in rows:
        if engine.transactional(row):
            result, committed = await engine.run_transactional(conn, row)
            if committed is not None:
                alone.merge(committed)
            else:
                grouped.append(result)
        else:
            result = await engine.run(row)
            grouped.append(result)
        results.append(result)
    report = await engine.flush(conn, grouped)
    report.merge(alone)
    return results, report


def drain(dsn: str, machines: Registry | Iterable[type[FSM]], **kwargs: Any) -> Tally:
    """Run everything runnable to quiescence through the real execution path.

    Returns a Tally by outcome kind. See ``adrain`` for the options.
    """
    return asyncio.run(adrain(dsn, machines, **kwargs))


def _fetch(client: Client, iid: int) -> Instance:
    inst = client.get(iid)
    if inst is None:
        raise AssertionError(f"instance {iid} does not exist")
    return inst


_MISSING: Any = object()


def assert_status(client: Client, iid: int, status: str) -> Instance:
    inst = _fetch(client, iid)
    if inst.status != status:
        raise AssertionError(
            f"instance {iid} ({inst.fsm} at {inst.step}) is {inst.status!r}, expected {status!r}"
            + (f"; last_error: {inst.last_error}" if inst.last_error else "")
        )
    return inst


def assert_done(client: Client, iid: int, result: Any = _MISSING) -> Instance:
    inst = assert_status(client, iid, "done")
    if result is not _MISSING and inst.result != result:
        raise AssertionError(f"instance {iid} is done with {inst.result!r}, expected {result!r}")
    return inst


def assert_failed(client: Client, iid: int, error_contains: str | None = None) -> Instance:
    inst = assert_status(client, iid, "failed")
    if error_contains is not None and error_contains not in (inst.last_error or ""):
        raise AssertionError(
            f"instance {iid} failed with {inst.last_error!r}, expected it to mention {error_contains!r}"
        )
    return inst


def fire_schedules(
    dsn: str,
    machines: Registry | Iterable[type[FSM]] = (),
    *,
    schema: str = "pgdurable",
    at: dt.datetime | None = None,
) -> FireReport:
    """Register ``machines`` and the schedules declared on them, as a starting supervisor
    does, then run one cron pass as the maintenance process would: fire every schedule due
    now — or at ``at``, an aware time to pretend it is (later than now: what a fleet down
    until then would find due). Returns what the pass did (``FireReport``)."""
    from pgdurable.engine import schedules

    registry = _registry(machines)
    engine = Engine(registry, schema=schema)
    asyncio.run(_register(dsn, engine))
    with psycopg.connect(dsn, autocommit=True) as conn:
        schedules.register(conn, engine.q, registry.machines())
        return schedules.fire_due(conn, engine.q, at=at)


async def _register(dsn: str, engine: Engine) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await engine.register(conn)
