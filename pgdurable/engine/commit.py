"""Group commit: the outcomes waiting together are committed in one transaction.

A flush is a fixed number of set-based statements whatever the number of outcomes: one per
kind present (plain updates with their signal consumption and notifications riding in the
same statement, parks + recheck, child spawns + their consumption, holds), then one parent
join. Every write is ownership-guarded by the worker id
and the claim's fencing token; a row whose claim was taken away is reported stale and
nothing of its outcome is applied (no signal consumed, no parent touched, no child created).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import msgspec
import psycopg
from psycopg import errors as pgerrors

from pgdurable.contract.spec import encode_json, rows_json
from pgdurable.db.queries import Queries, int_array
from pgdurable.engine.claim import Claimed
from pgdurable.engine.history import params as history_params
from pgdurable.engine.limits import credits
from pgdurable.engine.outcome import Result

log = logging.getLogger("pgdurable.commit")

_STATUS = {"next": "runnable", "retry": "runnable", "done": "done", "stop": "failed"}
#: libpq 14 or newer: statements can share one round trip and one implicit transaction.
_PIPELINES = psycopg.AsyncPipeline.is_supported()

#: What a flush raises when PostgreSQL (or the driver, before sending) refuses a value one
#: row carries — never a connection or server failure, which fails the whole flush as before.
VALUE_ERRORS: tuple[type[Exception], ...] = (
    psycopg.DataError,  # class 22: a NUL character, an interval or timestamp out of range
    psycopg.IntegrityError,  # class 23: a NOT NULL or CHECK constraint
    pgerrors.ProgramLimitExceeded,  # 54000: an index row or a jsonb document too large
    pgerrors.StatementTooComplex,  # 54001: a document nested too deeply for the server
    msgspec.EncodeError,
    UnicodeEncodeError,  # a lone surrogate in a text the flush encodes
)


@dataclass(slots=True)
class FlushReport:
    committed: set[int] = field(default_factory=set)
    #: Rows whose outcome was not applied: their claim was lost, or a cancel marked them
    #: while their step ran (those are in ``cancelled`` too).
    stale: set[int] = field(default_factory=set)
    woken_parents: set[int] = field(default_factory=set)
    rechecked: set[int] = field(default_factory=set)  # parked, then woken by the recheck
    #: Rows whose outcome PostgreSQL refused, failed instead (committed), with the reason.
    rejected: dict[int, str] = field(default_factory=dict)
    #: Rows whose outcome was discarded for a cancel: cancelled, or sent to on_cancel.
    cancelled: set[int] = field(default_factory=set)

    def merge(self, other: FlushReport) -> None:
        self.committed |= other.committed
        self.stale |= other.stale
        self.cancelled |= other.cancelled
        self.woken_parents |= other.woken_parents
        self.rechecked |= other.rechecked
        self.rejected.update(other.rejected)


async def flush(
    conn: psycopg.AsyncConnection[Any],
    q: Queries,
    worker: str,
    results: Sequence[Result],
    quiet_queue: str | None = None,
    lease: dt.timedelta = dt.timedelta(seconds=60),
) -> FlushReport:
    """Commit ``results`` in one transaction (connection must be in autocommit mode).

    ``quiet_queue``: a queue not to notify (the flushing worker's own).

    A value one row carries and PostgreSQL refuses (``VALUE_ERRORS``; ``prepare`` refuses
    the known ones before they get here) does not fail the group: the batch is committed in
    halves, recursively, so every other row commits, and each guilty row is failed at once,
    by the same guarded statement, with the cause in ``last_error`` — its ``Result`` becomes
    that ``Stop``, in place, so the caller sees what was committed — and listed in
    ``rejected``. The normal path runs no extra statement: the split only follows a failure.
    """
    if not results:
        return FlushReport()
    try:
        return await _flush_group(conn, q, worker, results, quiet_queue, lease)
    except VALUE_ERRORS as exc:
        return await _isolate(conn, q, worker, results, quiet_queue, lease, exc)


async def _isolate(
    conn: psycopg.AsyncConnection[Any],
    q: Queries,
    worker: str,
    results: Sequence[Result],
    quiet_queue: str | None,
    lease: dt.timedelta,
    exc: Exception,
) -> FlushReport:
    """Commit a refused batch in halves until the guilty rows stand alone; fail those."""
    report = FlushReport()
    refused: list[tuple[list[Result], Exception]] = [(sorted(results, key=lambda r: r.row.id), exc)]
    while refused:
        group, cause = refused.pop()
        if len(group) == 1:
            await _reject(conn, q, worker, group[0], cause, quiet_queue, lease, report)
            continue
        mid = len(group) // 2
        for half in (group[:mid], group[mid:]):
            try:
                report.merge(await _flush_group(conn, q, worker, half, quiet_queue, lease))
            except VALUE_ERRORS as half_exc:
                refused.append((half, half_exc))
    return report


async def _reject(
    conn: psycopg.AsyncConnection[Any],
    q: Queries,
    worker: str,
    r: Result,
    cause: Exception,
    quiet_queue: str | None,
    lease: dt.timedelta,
    report: FlushReport,
) -> None:
    """Fail a row whose outcome PostgreSQL refused, alone, under the claim's guard."""
    step = r.row.step or r.step
    reason = f"the outcome of step {step!r} could not be stored, so the instance failed: {_cause(cause)}"
    stop = Result(
        r.row,
        "stop",
        version=r.version or r.row.version or 0,
        step=step,
        error=reason,
        attempt=r.row.attempt,
        ran=r.ran,
        started=r.started,
        duration=r.duration,
        history=r.history,
    )
    try:
        report.merge(await _flush_group(conn, q, worker, [stop], quiet_queue, lease))
    except VALUE_ERRORS:
        # Even the Stop is refused: this is not about the row's values. Leave the row
        # executing; the reaper returns it once its lease expires, as before.
        log.exception("refused outcome not failed", extra={"event": "outcome_refused", "instance": r.row.id})
        report.stale.add(r.row.id)
        return
    if r.row.id not in report.committed:  # its claim was lost meanwhile: stale
        return
    report.rejected[r.row.id] = reason
    for f in fields(Result):  # the caller's Result is now what was committed
        setattr(r, f.name, getattr(stop, f.name))
    log.warning(
        "instance %d failed: %s", r.row.id, reason, extra={"event": "outcome_refused", "instance": r.row.id}
    )


def _cause(exc: Exception) -> str:
    """The refusal in a line: PostgreSQL's message and detail and its SQLSTATE, never the
    row (a NOT NULL violation's detail quotes the whole row)."""
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        text = exc.diag.message_primary
        detail = exc.diag.message_detail
        if detail and not detail.startswith("Failing row") and len(detail) < 200:
            text = f"{text} ({detail.rstrip('.')})"
        return f"PostgreSQL refused it: {text} [{exc.sqlstate}]"
    return f"{type(exc).__name__}: {exc}"[:300].replace("\x00", "\\x00")


async def flush_group(
    conn: psycopg.AsyncConnection[Any],
    q: Queries,
    worker: str,
    results: Sequence[Result],
    quiet_queue: str | None = None,
    lease: dt.timedelta = dt.timedelta(seconds=60),
) -> FlushReport:
    """``flush`` without the isolation of refused values: the group commits whole, or
    raises. In a transaction already open on ``conn`` (a transactional step's), its
    statements join it, and nothing commits until that transaction does."""
    return await _flush_group(conn, q, worker, results, quiet_queue, lease)


def _atomic(conn: psycopg.AsyncConnection[Any]) -> Any:
    """A transaction block, or nothing when one is open already (no savepoint round trips)."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return contextlib.nullcontext()
    return conn.transaction()


async def _flush_group(
    conn: psycopg.AsyncConnection[Any],
    q: Queries,
    worker: str,
    results: Sequence[Result],
    quiet_queue: str | None,
    lease: dt.timedelta,
) -> FlushReport:
    """``flush`` without the isolation: the group commits whole, or raises."""
    report = FlushReport()
    results = sorted(results, key=lambda r: r.row.id)
    if all(_single_statement(r) for r in results):
        # The common case — plain outcomes of rows with no parent and no gate slot — is one
        # statement, atomic on its own: no BEGIN/COMMIT round trips. With history, its rider
        # follows in the same pipeline before one Sync: both run in one implicit
        # transaction, in one round trip, and the rider sees which rows the guard let through.
        params = _plain_params(worker, results, quiet_queue, lease)
        history = history_params(worker, results)
        if history is None:
            cur = await conn.execute(q["instance_commit_if_owned_many"], params, prepare=True)
            report.committed.update(row[0] for row in await cur.fetchall())
        else:
            async with conn.pipeline() if _PIPELINES else _atomic(conn):
                cur = await conn.execute(q["instance_commit_if_owned_many"], params, prepare=True)
                await conn.execute(q["history_insert_many"], history, prepare=True)
            # Read after the block: its end sends the Sync with the statements, so the
            # results and the commit come back in one round trip (a fetch inside the block
            # would ask for the results first and commit in a second round trip).
            report.committed.update(row[0] for row in await cur.fetchall())
        report.stale = {r.row.id for r in results} - report.committed
        if report.stale:  # a claim lost, or a cancel: settle the cancels (no statement else)
            await _settle_cancels(conn, q, worker, [r for r in results if r.row.id in report.stale], report)
        return report
    terminal_children: Counter[int] = Counter()
    failed_children: Counter[int] = Counter()  # of those, the failed (a fail_fast join wakes)
    async with _atomic(conn):
        plain = [r for r in results if r.kind in _STATUS]
        if plain:
            cur = await conn.execute(
                q["instance_commit_if_owned_many"],
                _plain_params(worker, plain, quiet_queue, lease),
                prepare=True,
            )
            for rid, parent_id, status, _queue in await cur.fetchall():
                report.committed.add(rid)
                if status in ("done", "failed", "cancelled") and parent_id is not None:
                    terminal_children[parent_id] += 1
                    if status == "failed":
                        failed_children[parent_id] += 1

        parks = [r for r in results if r.kind == "await"]
        if parks:
            cur = await conn.execute(
                q["instance_park_await_if_owned_many"], _park_params(worker, parks), prepare=True
            )
            parked = [row[0] for row in await cur.fetchall()]
            report.committed.update(parked)
            if parked:
                presented = [sid for r in parks if r.row.id in report.committed for sid in r.consume]
                cur = await conn.execute(
                    q["instance_await_recheck_many"],
                    {"ids": parked, "presented": presented},
                    prepare=True,
                )
                report.rechecked.update(rid for rid, _q, _n in await cur.fetchall())

        spawns = [r for r in results if r.kind == "spawn"]
        if spawns:
            cur = await conn.execute(q["instance_lock_owned_many"], _owned(worker, spawns), prepare=True)
            locked = [row[0] for row in await cur.fetchall()]
            if locked:
                cur = await conn.execute(
                    q["instance_spawn_children_many"], _spawn_params(spawns, locked), prepare=True
                )
                report.committed.update(row[0] for row in await cur.fetchall())

        rejoins = [r for r in results if r.kind == "rejoin"]
        if rejoins:
            cur = await conn.execute(
                q["instance_rejoin_if_owned_many"], _owned(worker, rejoins), prepare=True
            )
            report.committed.update(row[0] for row in await cur.fetchall())

        holds = [r for r in results if r.kind == "hold"]
        if holds:
            cur = await conn.execute(
                q["instance_hold_if_owned_many"],
                {**_owned(worker, holds), "errors": [r.error for r in holds]},
                prepare=True,
            )
            report.committed.update(row[0] for row in await cur.fetchall())

        taken = [sid for r in spawns if r.row.id in report.committed for sid in r.consume]
        if taken:
            await conn.execute(q["signal_consume_many"], {"ids": taken}, prepare=True)

        # Before the parent join, which may write rows of this batch whose outcome was stale.
        history = history_params(worker, [r for r in results if r.row.id in report.committed])
        if history is not None:
            await conn.execute(q["history_insert_many"], history, prepare=True)

        # Outcomes refused because a cancel marked their row: cancelled instead (or sent to
        # on_cancel), their slot credited by the settle; parents joined below, in one go.
        refused = [r for r in results if r.row.id not in report.committed]
        if refused:
            for parent_id, status in await _settle_cancels(conn, q, worker, refused, report, join=False):
                if status in ("cancelled", "failed") and parent_id is not None:  # failed: a deadline
                    terminal_children[parent_id] += 1

        # Every committed outcome takes its row out of executing: give back its gate slot
        # (an inline continue stays executing and keeps it).
        gate = credits([r.row for r in results if r.row.id in report.committed and not r.inline])
        if gate is not None:
            await conn.execute(q["gate_slots_credit_many"], gate, prepare=True)

        if terminal_children:
            parents = sorted(terminal_children)
            cur = await conn.execute(
                q["instance_join_parents_many"],
                {
                    "parents": parents,
                    "counts": [terminal_children[p] for p in parents],
                    "failed": [failed_children[p] for p in parents],
                },
                prepare=True,
            )
            for pid, status, _queue, _n in await cur.fetchall():
                if status == "runnable":
                    report.woken_parents.add(pid)
    report.stale = {r.row.id for r in results} - report.committed
    return report


async def _settle_cancels(
    conn: psycopg.AsyncConnection[Any],
    q: Queries,
    worker: str,
    refused: Sequence[Result],
    report: FlushReport,
    *,
    join: bool = True,
) -> list[tuple[int | None, str]]:
    """Settle the cancels of rows whose outcome the guards refused (one statement, run
    only when an outcome was refused): a row a cancel marked is cancelled or sent to its
    on_cancel step, its outcome discarded. Returns (parent, status) of each settled row."""
    cur = await conn.execute(
        q["instance_cancel_settle_if_owned_many"],
        {
            "worker": worker,
            "ids": int_array(r.row.id for r in refused),
            "tokens": int_array(r.row.token for r in refused),
            "join": join,
        },
        prepare=True,
    )
    rows = await cur.fetchall()
    report.cancelled.update(row[0] for row in rows)
    return [(parent_id, status) for _id, parent_id, status, _queue in rows]


def continued(row: Claimed, r: Result) -> Claimed:
    """The claim of a row whose inline continue committed, ready to run its next step."""
    taken = set(r.consume)
    return replace(
        row,
        step=r.step,
        version=r.version,
        # A claim carries the state as JSON text (what instance_claim reads); the flush
        # stored the same document (jsonb may differ only in spacing and key order).
        state=r.state.decode() if r.state is not None else row.state,
        saga=r.saga.decode() if r.saga is not None else row.saga,
        attempt=0,
        crashes=0,
        awaits=None,
        inbox=[s for s in row.inbox if s.id not in taken],
        has_inbox=any(s.id not in taken for s in row.inbox),
        depth=row.depth + 1,
    )


def _single_statement(r: Result) -> bool:
    return r.kind in _STATUS and r.row.parent_id is None and (r.row.shard is None or r.row.shard < 0)


class _CommitRow(msgspec.Struct, omit_defaults=True):
    """One outcome as instance_commit_if_owned_many reads it from its JSON document (an
    object keyed by instance id). A field with a default is left out of the document when
    it holds it (a plain ``Done`` sends six keys instead of seventeen): the statement reads
    an absent key as NULL, and NULL as the default, so the server parses a third of the
    JSON. ``delay`` and ``weight`` are always sent: a NaN, which JSON encodes as null, must
    reach the database as NULL and be refused there, not be read as the default."""

    token: int
    status: str
    version: int
    step: str
    delay: float
    weight: float
    state: msgspec.Raw | None = None  # None: keep the stored state
    attempt: int = 0
    keep_awaits: bool = False
    set_concurrency: bool = False
    concurrency_key: str | None = None
    keep_rate: bool = False
    rate_limit: str | None = None
    result: msgspec.Raw | None = None
    error: str | None = None
    traceback: str | None = None
    saga: msgspec.Raw | None = None


_encoder = msgspec.json.Encoder()


def _raw(data: bytes | None) -> msgspec.Raw | None:
    return None if data is None else msgspec.Raw(data)


def _plain_params(
    worker: str, rs: Sequence[Result], quiet_queue: str | None, lease: dt.timedelta
) -> dict[str, Any]:
    rows = {
        str(r.row.id): _CommitRow(
            r.row.token,
            "executing" if r.inline else _STATUS[r.kind],
            r.version,
            r.step,
            r.delay,
            r.weight,
            _raw(r.state),
            r.attempt,
            r.keep_awaits,
            r.set_concurrency,
            r.concurrency_key,
            r.keep_rate,
            r.rate_limit,
            _raw(r.result),
            r.error,
            r.traceback if r.error is not None else None,  # the traceback of last_error
            _raw(r.saga),
        )
        for r in rs
    }
    return {
        "worker": worker,
        "lease": lease,
        "quiet_queue": quiet_queue,
        "ids": int_array(r.row.id for r in rs),
        "rows": _encoder.encode(rows).decode(),
        "taken_targets": int_array(r.row.id for r in rs if r.kind == "next" for _ in r.consume),
        "taken_ids": int_array(sid for r in rs if r.kind == "next" for sid in r.consume),
    }


def _owned(worker: str, rs: Sequence[Result]) -> dict[str, Any]:
    """The ownership guard's parameters of the rows of ``rs``: this worker, their ids and
    the claim's fencing tokens."""
    return {"worker": worker, "ids": [r.row.id for r in rs], "tokens": [r.row.token for r in rs]}


def _park_params(worker: str, rs: list[Result]) -> dict[str, Any]:
    return {
        **_owned(worker, rs),
        "versions": [r.version for r in rs],
        "steps": [r.step for r in rs],
        "states": [None if r.state is None else r.state.decode() for r in rs],
        "awaits": [encode_json(r.awaits) for r in rs],
        "timeouts": [r.timeout for r in rs],
        "sagas": [None if r.saga is None else r.saga.decode() for r in rs],
        "inputs": [None if r.input_request is None else r.input_request.decode() for r in rs],
    }


def _spawn_params(rs: list[Result], locked: list[int]) -> dict[str, Any]:
    children = [(r.row.id, c) for r in rs for c in r.children]
    return {
        "children": rows_json([c for _, c in children], parents=[pid for pid, _ in children]),
        "locked": locked,
        "ids": [r.row.id for r in rs],
        "versions": [r.version for r in rs],
        "steps": [r.step for r in rs],
        "states": [None if r.state is None else r.state.decode() for r in rs],
        "sagas": [None if r.saga is None else r.saga.decode() for r in rs],
        "policies": [r.join_policy for r in rs],
    }
