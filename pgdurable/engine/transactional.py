"""Transactional steps: a step's writes and its outcome commit in one transaction, or neither.

A step declared ``@step(transactional=True)`` runs inside a transaction opened on a
connection of the worker's pool (on pgdurable's own database) and receives that connection
as ``ctx.conn``. When it returns, its outcome is written on the same connection, in the same
transaction, by the very statements of the group commit (``commit.flush_group`` on a batch of
one), each guarded by the worker id and the claim's fencing token. Then:

- the guard let the outcome through: COMMIT — the step's writes and its outcome are durable
  together;
- the guard refused it (the claim was taken, or a cancel marked the row): ROLLBACK — nothing
  of the step is visible; a cancel is then settled on its own, as for any refused outcome;
- the step raised (or lost a race, or ended the transaction itself): ROLLBACK, and the
  outcome ``handle()`` chose (a retry without counting, for a serialization failure or a
  deadlock) is committed by the group commit like any other — without the step's writes;
- the worker dies before the COMMIT: PostgreSQL rolls the transaction back with the
  connection; the row is still ``executing`` under the old claim, and recovery runs the
  step again once its lease expires.

A transactional step is never run ahead inline (its next step is claimed again) and never
in a step process (``isolation = "process"``): it runs in the worker, which holds its
transaction. docs/transactions.md says what this guarantees and what it does not.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import IsolationLevel
from psycopg.pq import TransactionStatus

from pgdurable.contract.errors import TransactionMisuse
from pgdurable.contract.fsm import Registry, StepDef
from pgdurable.db.queries import Queries
from pgdurable.engine.claim import Claimed
from pgdurable.engine.commit import VALUE_ERRORS, FlushReport, flush_group
from pgdurable.engine.executor import Executor, StepTransaction, conflict
from pgdurable.engine.outcome import Result

log = logging.getLogger("pgdurable.transactional")

_LEVELS = {
    "read committed": IsolationLevel.READ_COMMITTED,
    "repeatable read": IsolationLevel.REPEATABLE_READ,
    "serializable": IsolationLevel.SERIALIZABLE,
}

_ENDED = (
    "ended its own transaction ({how}); a transactional step's transaction is committed by "
    "pgdurable together with the step's outcome: do not commit, roll back or close ctx.conn"
)


def step_of(registry: Registry, row: Claimed) -> StepDef | None:
    """The transactional step this row runs next, or None (not transactional, or unknown)."""
    if not registry.transactional:
        return None
    found = registry.get(row.fsm, row.version)
    if found is None:
        return None
    cls = found[0]
    sdef = cls.__pgdurable_steps__.get(row.step or cls.__pgdurable__.initial)
    return sdef if sdef is not None and sdef.transactional else None


def keeps_snapshot(registry: Registry, row: Claimed) -> bool:
    """Whether the row's next step runs in a repeatable-read or serializable transaction.
    Its lease is not extended while it runs: the extension would update its row after its
    snapshot, and the outcome's write would then fail to serialize, again at every retry."""
    sdef = step_of(registry, row)
    return sdef is not None and sdef.isolation != "read committed"


def any_transactional(registry: Registry) -> bool:
    """Whether a machine of the registry has a transactional step (a worker sizes its pool)."""
    return registry.transactional


class StepConnection(psycopg.Connection[Any]):
    """``ctx.conn`` of a sync transactional step: psycopg's sync API over the very server
    connection (and open transaction) of the worker's pooled async connection. It cannot
    commit, roll back or close: pgdurable does, with the step's outcome."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]):
        pgconn = conn.pgconn
        # Building a connection on the libpq connection takes its notice and notify
        # callbacks: put the pooled connection's back when the step is over (``detach``).
        self._saved = (pgconn.notice_handler, pgconn.notify_handler)
        super().__init__(pgconn)
        self._autocommit = True  # no implicit BEGIN: a COMMIT sent as SQL stays visible
        self.prepare_threshold = None  # prepared names would collide with the pool's
        self._pool = None  # pooled: not "deleted while still open"

    def detach(self) -> None:
        self.pgconn.notice_handler, self.pgconn.notify_handler = self._saved

    def commit(self) -> None:
        raise TransactionMisuse("the step " + _ENDED.format(how="ctx.conn.commit()"))

    def rollback(self) -> None:
        raise TransactionMisuse("the step " + _ENDED.format(how="ctx.conn.rollback()"))

    def close(self) -> None:
        raise TransactionMisuse("the step " + _ENDED.format(how="ctx.conn.close()"))


class _Transaction(StepTransaction):
    """The open transaction of one step, as the executor sees it."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]):
        self.conn = conn
        self.sync: StepConnection | None = None

    def connection(self, is_async: bool) -> Any:
        if is_async:
            return self.conn
        self.sync = StepConnection(self.conn)
        return self.sync

    def verify(self, exc: BaseException | None) -> BaseException | None:
        if isinstance(exc, TransactionMisuse):
            return exc
        if isinstance(exc, psycopg.ProgrammingError) and "forbidden within a Transaction" in str(exc):
            how = "ctx.conn.commit()" if "commit" in str(exc) else "ctx.conn.rollback()"
            misuse = TransactionMisuse("the step " + _ENDED.format(how=how))
            misuse.__cause__ = exc
            return misuse
        if exc is not None:
            return None
        if self.conn.broken:
            return None  # the outcome's write will say so
        status = self.conn.info.transaction_status
        if status == TransactionStatus.IDLE:
            return TransactionMisuse("the step " + _ENDED.format(how="a COMMIT or ROLLBACK sent as SQL"))
        if status == TransactionStatus.INERROR:
            return TransactionMisuse(
                "a statement of the step failed and the step went on: its transaction is aborted, "
                "so nothing of it can commit (let the error propagate, or use a savepoint: "
                "ctx.conn.transaction())"
            )
        return None

    def lost(self, exc: BaseException) -> bool:
        return conflict(exc) or self.conn.broken

    def interrupt(self) -> None:
        # Thread-safe: a cancel request on its own connection to the server.
        self.conn.cancel()

    def close(self) -> None:
        if self.sync is not None:
            self.sync.detach()


#: What failing the flush or the COMMIT of a step's transaction is the step's error.
_COMMIT_ERRORS: tuple[type[Exception], ...] = (*VALUE_ERRORS, psycopg.Error)


class _Discard(Exception):
    """Raised inside the step's transaction to roll it back."""


async def run_step(
    conn: psycopg.AsyncConnection[Any],
    q: Queries,
    worker: str,
    row: Claimed,
    sdef: StepDef,
    run: Callable[[Claimed, StepTransaction], Awaitable[Result]],
    executor: Executor,
    settle: Callable[[psycopg.AsyncConnection[Any], list[Claimed]], Awaitable[None]],
    flush_args: dict[str, Any],
) -> tuple[Result, FlushReport | None]:
    """Run a transactional step and commit it with its outcome on ``conn`` (autocommit,
    from the worker's pool; no one else uses it meanwhile).

    Returns the result and the report of its commit; a None report means the step's
    transaction rolled back and the result (``handle()``'s outcome, without the step's
    writes) is still to be committed by the group commit.
    Raises what breaks the connection (``psycopg.OperationalError`` but a lost race): the
    row stays executing, and recovery returns it once its lease expires.
    """
    tx = _Transaction(conn)
    result: Result | None = None
    report: FlushReport | None = None
    stale = discarding = sent = False
    await conn.set_isolation_level(_LEVELS[sdef.isolation])
    try:
        async with conn.transaction():  # BEGIN ISOLATION LEVEL …
            try:
                result = await run(row, tx)
            finally:
                tx.close()
            if result.raised is not None:  # it raised, or lost a race: its writes go
                discarding = True
                raise _Discard
            result.inline = False  # its next step is claimed again (no run-ahead)
            report = await flush_group(conn, q, worker, [result], **flush_args)
            if row.id not in report.committed:
                stale = discarding = True  # the guard refused the outcome: nothing of it commits
                raise _Discard
            sent = True  # the block's end sends the COMMIT
        # COMMIT: the step's writes and its outcome are durable together.
        return result, report
    except _Discard:
        pass
    except psycopg.OperationalError as exc:
        if conn.broken and not sent:
            # The connection broke before the COMMIT was sent: the server aborted the
            # transaction with it, nothing of the step committed. What was to be rolled
            # back is known; an outcome that was to commit becomes a retry (not counted).
            log.warning(
                "the connection of transactional step %r of instance %d broke before its commit: %r",
                sdef.name,
                row.id,
                exc,
                extra={"event": "step_connection_lost", "instance": row.id, "step": sdef.name},
            )
            if discarding:
                assert result is not None
                return result, FlushReport(stale={row.id}) if stale else None
            return executor.failed_at_commit(row, exc, lost=True), None
        if not conflict(exc):
            raise  # the connection broke at COMMIT: whether it committed is unknown; the guards decide
        result = executor.failed_at_commit(row, exc)  # lost a race at the flush or the COMMIT
    except _COMMIT_ERRORS as exc:
        # At COMMIT (a deferred constraint) or a value the outcome's statement refused:
        # nothing committed; the step's error, for handle().
        log.warning(
            "the commit of transactional step %r of instance %d failed: %r",
            sdef.name,
            row.id,
            exc,
            extra={"event": "step_commit_failed", "instance": row.id, "step": sdef.name},
        )
        result = executor.failed_at_commit(row, exc)
    finally:
        if not conn.broken:  # a broken one leaves the pool
            await conn.set_isolation_level(None)
    assert result is not None
    if stale:
        # Rolled back: a cancel that marked the row is settled alone (the claim's guard
        # again), as the group commit settles any refused outcome.
        await settle(conn, [row])
        return result, FlushReport(stale={row.id})
    return result, None
