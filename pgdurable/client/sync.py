# Generated from pgdurable/client/aio.py by tools/gen_sync_client.py: do not edit by hand.
# Change aio.py (or the generator), then run `python tools/gen_sync_client.py`.
"""``Client``: insert, signal, read and wait, for producers that block.

Generated from ``aio.py`` (``AsyncClient``): the same statements in the same order, with a
thread where the asyncio client has a task (``concurrency.py``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

from pgdurable.client.bulk import Batch
from pgdurable.client.common import (
    Busy,
    Instance,
    StepAttempt,
    WaitResult,
    attempt_of,
    copy_query,
    history_params,
    insert_params,
    insert_result,
    insert_spec,
    instance_of,
    many_error,
    outcome_of,
    signal_params,
    signal_result,
)
from pgdurable.client.concurrency import Lock, ThreadEmitter, sleep
from pgdurable.client.inputs import (
    PendingInput,
    check_answer,
    list_params,
    pending_of,
    respond_params,
    respond_result,
    target_params,
)
from pgdurable.client.operate import (
    CancelResult,
    RetryReport,
    Rewound,
    cancel_params,
    cancel_result,
    paused_of,
    queue_params,
    retry_filter,
    retry_result,
    rewind_params,
    rewind_result,
)
from pgdurable.client.schedules import (
    UNCHANGED,
    Schedule,
    ScheduleExists,
    change_params,
    create_params,
    schedule_of,
    trigger_params,
    trigger_result,
)
from pgdurable.contract.errors import NoTarget
from pgdurable.contract.spec import Insert
from pgdurable.db.queries import Queries, for_schema

__all__ = ["Client"]


@contextlib.contextmanager
def _caller_txn(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Run a write on the caller's connection without spoiling their transaction.

    Inside their open transaction: in a savepoint, so a refused batch leaves it usable.
    Otherwise the write is atomic on its own; if it opened an implicit transaction and
    fails, that transaction held nothing else and is rolled back.
    """
    if conn.info.transaction_status == TransactionStatus.INTRANS:
        with conn.transaction():
            yield
        return
    try:
        yield
    except psycopg.Error:
        if not conn.autocommit:
            conn.rollback()
        raise


@contextlib.contextmanager
def _in_txn(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Statements that must run in one transaction, on the caller's connection: theirs when
    it is not in autocommit (it commits when they commit), else one of its own (a savepoint
    inside a transaction they opened)."""
    if conn.autocommit:
        with conn.transaction():
            yield
    else:
        yield


class Client:
    """A producer's client over a small connection pool (opened on first use).

    Every call runs one named statement (``insert_many``: a ``COPY`` and the statement
    that draws its ids, see ``bulk.py``); pass ``conn=`` to run it on your own connection,
    inside your transaction (transactional enqueue). Inserts accept a machine class or just
    its name.
    """

    def __init__(self, dsn: str, *, schema: str = "pgdurable", max_connections: int = 4):
        self.q: Queries = for_schema(schema)
        self._dsn = dsn
        self._max = max_connections
        self._pool: ConnectionPool | None = None
        self._opening = Lock()  # concurrent first calls must not open two pools
        self._emitter = ThreadEmitter(self._notify)

    def _get_pool(self) -> ConnectionPool:
        if self._pool is None:
            with self._opening:
                if self._pool is None:
                    pool = ConnectionPool(
                        self._dsn, min_size=1, max_size=self._max, kwargs={"autocommit": True}, open=False
                    )
                    pool.open()
                    self._pool = pool
        return self._pool

    def close(self) -> None:
        """Send the notifications still pending, then close the pool."""
        self._emitter.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _one(self, name: str, params: dict[str, Any], conn: psycopg.Connection[Any] | None) -> Any:
        if conn is not None:
            return conn.execute(self.q[name], params).fetchone()
        with self._get_pool().connection() as c:
            return c.execute(self.q[name], params, prepare=True).fetchone()

    def _all(self, name: str, params: dict[str, Any], conn: psycopg.Connection[Any] | None) -> list[Any]:
        if conn is not None:
            return conn.execute(self.q[name], params).fetchall()
        with self._get_pool().connection() as c:
            return c.execute(self.q[name], params, prepare=True).fetchall()

    def _notify(self, queues: list[str]) -> None:
        """The emitter's statement (it drops a failure: notifications are best effort)."""
        with self._get_pool().connection() as c:
            c.execute(self.q["queue_notify_many"], {"queues": queues}, prepare=True)

    def insert(
        self,
        fsm: Any,
        state: Any = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
        **options: Any,
    ) -> int:
        """Insert one instance; returns its id. Options are those of ``Insert``.

        Raises DuplicateInstance when the correlation key is occupied (without aborting a
        caller's transaction) and UnknownMachine for an unregistered name without queue.
        """
        params = insert_params(insert_spec(fsm, state, options))
        # Inside the caller's transaction the NOTIFY must ride it (it fires at their commit).
        params["notify"] = conn is not None or self._emitter.begin()
        try:
            row = self._one("instance_insert_one", params, conn)
        finally:
            if conn is None:
                self._emitter.end()
        iid = insert_result(params, row)
        if not params["notify"]:
            self._emitter.add(row[2])
        return iid

    def insert_many(
        self, specs: Sequence[Insert], *, conn: psycopg.Connection[Any] | None = None
    ) -> list[int]:
        """Insert a batch with one COPY; ids in the order given. All or nothing."""
        if not specs:
            return []
        batch = Batch.of(specs)
        try:
            if conn is not None:
                with _caller_txn(conn):
                    ids = self._copy(conn, batch, notify=True, prepare=None)
            else:
                notify = self._emitter.begin()
                try:
                    with self._get_pool().connection() as c:
                        ids = self._copy(c, batch, notify=notify, prepare=True)
                finally:
                    self._emitter.end()
                if not notify:
                    for queue in batch.queues():
                        self._emitter.add(queue)
        except pgerrors.UniqueViolation as exc:
            raise many_error(specs, exc) from exc
        return batch.ids_in_input_order(ids)

    def _copy(
        self, c: psycopg.Connection[Any], batch: Batch, *, notify: bool, prepare: bool | None
    ) -> list[int]:
        """Resolve machines named only, draw ids, COPY the rows (see bulk.py), then notify
        their queues. On an autocommit connection the COPY commits alone and the
        notification follows it: a woken worker finds the rows. Statements are prepared on
        the client's own connections only (``prepare=None`` on a caller's: psycopg's own
        policy, which the caller may have turned off)."""
        if names := batch.unresolved():
            batch.fill(c.execute(self.q["machines_lookup"], {"names": names}, prepare=prepare).fetchall())
        row = c.execute(self.q["instance_ids_allocate"], {"n": len(batch.rows)}, prepare=prepare).fetchone()
        assert row is not None
        now: dt.datetime = row[0]
        ids: list[int] = row[1]
        query, plain = copy_query(self.q, batch)
        with c.cursor().copy(query) as copy:
            copy.write(batch.encode(ids, now, plain=plain))
        if notify:
            c.execute(self.q["queue_notify_many"], {"queues": batch.queues()}, prepare=prepare)
        return ids

    def signal(
        self,
        target: int | str,
        name: str,
        payload: Any = None,
        *,
        dedup_key: str | None = None,
        conn: psycopg.Connection[Any] | None = None,
    ) -> int | None:
        """Deliver a signal to a live instance (id or correlation key) in one statement.

        Returns the stored signal's id, or None when ``dedup_key`` was already delivered.
        Raises NoTarget when the target is unknown or finished.
        """
        params = signal_params(target, name, payload, dedup_key, notify=conn is not None)
        if conn is None:
            params["notify"] = self._emitter.begin()
        try:
            row = self._one("signal_deliver", params, conn)
        finally:
            if conn is None:
                self._emitter.end()
        result = signal_result(target, row)
        if not params["notify"] and row[2] == "runnable":
            self._emitter.add(row[3])
        return result

    def get(self, iid: int, *, conn: psycopg.Connection[Any] | None = None) -> Instance | None:
        """A snapshot of the instance, or None when there is no such id."""
        row = self._one("instance_get", {"id": iid}, conn)
        return None if row is None else instance_of(row)

    def history(
        self, iid: int, *, last: int | None = None, conn: psycopg.Connection[Any] | None = None
    ) -> list[StepAttempt]:
        """The instance's finished step attempts, oldest first (``last``: only the last
        ``last`` of them), in one statement. Empty for an unknown id, and for an instance
        whose machine or queue keeps no history; GC deletes them with the instance."""
        rows = self._all("history_of_instance", history_params(iid, last), conn)
        return [attempt_of(row) for row in rows]

    def wait(self, iid: int, timeout: float = 10.0) -> WaitResult:
        """Wait up to ``timeout`` seconds for the instance to finish: ``Done``, ``Failed``,
        or ``Busy`` with its last snapshot. It polls, 5 ms apart at first, then up to 200 ms.
        Raises NoTarget when there is no such id."""
        deadline = time.monotonic() + timeout
        pause = 0.005
        while True:
            inst = self.get(iid)
            if inst is None:
                raise NoTarget(f"no instance {iid}")
            res = outcome_of(inst)
            if not isinstance(res, Busy) or time.monotonic() >= deadline:
                return res
            sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.2)

    # -- human input (docs/inputs.md) ---------------------------------------------------------

    def inputs(
        self,
        *,
        machine: Any = None,
        queue: str | None = None,
        after: int = 0,
        limit: int = 100,
        conn: psycopg.Connection[Any] | None = None,
    ) -> list[PendingInput]:
        """The pending inputs — instances parked on an ``Await`` that asks for input — in
        instance id order, of ``machine`` (a name or class) and ``queue`` when given; at
        most ``limit``, after instance ``after`` (the next page: the last one's id)."""
        rows = self._all("input_pending_list", list_params(machine, queue, after, limit), conn)
        return pending_of(rows)

    def respond(
        self,
        target: int | str,
        name: str,
        value: Any,
        *,
        conn: psycopg.Connection[Any] | None = None,
    ) -> int:
        """Answer the input ``name`` that an instance (id, or the correlation key it holds)
        awaits, and wake it; returns the stored signal's id. The value is checked first
        against the input's JSON Schema and choices: a bad one raises ``InvalidInput``
        naming the field, and nothing is stored. Raises ``NoTarget`` when the instance does
        not await that input (unknown, finished, not parked on it, or it stopped waiting
        before the answer was delivered). Two statements: the request is read, the value
        checked here, then delivered only while that same request is pending."""
        params = target_params(target, name)
        iid, request, encoded = check_answer(
            target, name, self._one("input_pending_get", params, conn), value
        )
        row = self._one("input_respond", respond_params(iid, name, request, encoded), conn)
        return respond_result(iid, name, row)

    # -- operating instances and queues (docs/operating.md) ---------------------------------

    def cancel(
        self,
        target: int | str,
        reason: str | None = None,
        *,
        cascade: bool = True,
        compensate: bool = True,
        conn: psycopg.Connection[Any] | None = None,
    ) -> CancelResult:
        """Cancel an instance (id, or the correlation key a live one holds) in one statement.

        Not executing: it ends ``cancelled`` now — inbox cleared, its parent's join counted —
        or, when its machine declares ``on_cancel`` and ``compensate`` is true, it goes to
        that step and ends ``cancelled`` when that step finishes. Executing: it is marked,
        and its step's outcome is discarded when the step returns (its concurrency key and
        gate slot stay held until then). ``cascade`` does the same to every live descendant.
        ``compensate=False`` skips on_cancel, and ends an instance that already runs it.
        Raises NoTarget for an unknown id, or a key no live instance holds.
        """
        params = cancel_params(target, reason, cascade, compensate)
        for attempt in range(3):
            try:
                rows = self._all("instance_cancel", params, conn)
                break
            except pgerrors.DeadlockDetected:
                # Lock orders match the flush's, so only a cascade racing flushes of rows at
                # several depths of the tree can meet one; PostgreSQL rolled it back whole.
                if conn is not None or attempt == 2:
                    raise
        return cancel_result(target, rows)

    def retry(self, iid: int, *, conn: psycopg.Connection[Any] | None = None) -> str:
        """Put a failed or cancelled instance back into the step it ended in (a cancelled
        one sent to on_cancel: the step it was cancelled in), runnable now, its stored state
        kept, attempt and crashes from zero; ``last_error`` stays until its next outcome.
        Returns that step. Raises NoTarget, InstanceExecuting, or OperationRefused (another
        status; live children; its correlation key taken meanwhile)."""
        rows = self._all("instance_retry_many", {"ids": [iid]}, conn)
        return retry_result(iid, rows)

    def retry_many(
        self,
        *,
        machine: Any = None,
        queue: str | None = None,
        error_like: str | None = None,
        since: dt.datetime | dt.timedelta | float | None = None,
        dry_run: bool = False,
        batch: int = 500,
    ) -> RetryReport:
        """Retry every failed instance that matches (None: no filter): of ``machine`` (a
        name or class), in ``queue``, whose ``last_error`` matches the ILIKE pattern
        ``error_like``, failed at or after ``since`` (an aware datetime, or how long ago).
        ``dry_run`` only counts them. Otherwise in batches of ``batch``, each its own
        transaction, in id order: an instance that cannot be retried is skipped, not seen
        again, and counted in ``skipped``."""
        params = retry_filter(machine, queue, error_like, since)
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch!r}")
        with self._get_pool().connection() as c:
            if dry_run:
                row = c.execute(self.q["instance_retry_count"], params).fetchone()
                return RetryReport(int(row[0]) if row else 0, 0, {}, dry_run=True)
            matched = retried = 0
            skipped: dict[str, int] = {}
            after = 0
            while True:
                cur = c.execute(self.q["instance_retry_select"], {**params, "after": after, "limit": batch})
                ids = [row[0] for row in cur.fetchall()]
                if not ids:
                    break
                matched += len(ids)
                try:
                    rows = c.execute(self.q["instance_retry_many"], {"ids": ids}).fetchall()
                except pgerrors.UniqueViolation:
                    # A key was taken between the check and the update: one by one, so the
                    # rest of the batch is retried.
                    rows = []
                    for one in ids:
                        try:
                            rows += c.execute(self.q["instance_retry_many"], {"ids": [one]}).fetchall()
                        except pgerrors.UniqueViolation:
                            rows.append((one, "key", "failed", None))
                for _id, outcome, _status, _step in rows:
                    if outcome == "retried":
                        retried += 1
                    else:
                        skipped[outcome] = skipped.get(outcome, 0) + 1
                after = ids[-1]
                if len(ids) < batch:
                    break
        return RetryReport(matched, retried, skipped)

    def rewind(
        self,
        iid: int,
        step: str,
        state: Any = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
    ) -> Rewound:
        """Move an instance back (or on) to ``step`` of its machine version (as the
        supervisors registered it), runnable now, with ``state``; None: the state the
        instance had when ``step`` last ran (its step history), else its stored state —
        ``Rewound.state_from`` says which. Live or finished, but not executing. Raises
        NoTarget, InstanceExecuting, UnknownStep, UnknownMachine, or OperationRefused (live
        children; a finished instance whose correlation key another live one holds)."""
        params = rewind_params(iid, step, state)
        return rewind_result(iid, step, self._one("instance_rewind", params, conn))

    def pause(self, queue: str, *, conn: psycopg.Connection[Any] | None = None) -> bool:
        """Pause a queue: from their next claim on, its workers on every host claim nothing
        (steps running finish). True when this call paused it, False when it was already."""
        row = self._one("queue_pause", queue_params(queue), conn)
        return not row[0]

    def resume(self, queue: str, *, conn: psycopg.Connection[Any] | None = None) -> bool:
        """Resume a paused queue and wake its workers. True when it was paused."""
        row = self._one("queue_resume", queue_params(queue), conn)
        return bool(row[0])

    def paused(self, *, conn: psycopg.Connection[Any] | None = None) -> dict[str, dt.datetime]:
        """The paused queues, each with when it was paused."""
        return paused_of(self._all("queue_paused", {}, conn))

    # -- cron schedules (docs/schedules.md) --------------------------------------------------

    def create_schedule(
        self,
        name: str,
        fsm: Any,
        cron: str,
        *,
        tz: str = "UTC",
        state: Any = None,
        queue: str | None = None,
        priority: int = 0,
        missed: str = "skip",
        catch_up_limit: int = 10,
        overlap: str = "allow",
        enabled: bool = True,
        conn: psycopg.Connection[Any] | None = None,
    ) -> Schedule:
        """Create a schedule: each occurrence of ``cron`` (5 fields, or 6 with a leading
        seconds field) in time zone ``tz`` inserts an instance of machine ``fsm`` (a name or
        a class) with ``state``. The options are those of ``@schedule``; its first fire is
        computed from the database's time. Raises ScheduleExists when the name is taken,
        InvalidValue for a cron expression, time zone or policy that is not one."""
        cron_, params = create_params(
            name,
            fsm,
            cron,
            tz=tz,
            state=state,
            queue=queue,
            priority=priority,
            missed=missed,
            catch_up_limit=catch_up_limit,
            overlap=overlap,
            enabled=enabled,
        )
        if conn is not None:
            with _in_txn(conn):
                row = self._create_on(conn, cron_, params)
        else:
            with self._get_pool().connection() as c, c.transaction():
                row = self._create_on(c, cron_, params)
        if row is None:
            raise ScheduleExists(name)
        return schedule_of(row)

    def _create_on(self, c: psycopg.Connection[Any], cron: Any, params: dict[str, Any]) -> Any:
        row = c.execute(self.q["schedule_now"]).fetchone()
        assert row is not None
        if params["enabled"]:
            params["next_fire_at"] = cron.next_after(row[0])
        return c.execute(self.q["schedule_create"], params).fetchone()

    def _change(self, name: str, changes: dict[str, Any], conn: psycopg.Connection[Any] | None) -> Any:
        """Lock the schedule, compute the change from what is locked, store it."""
        if conn is not None:
            with _in_txn(conn):
                return self._change_on(conn, name, changes)
        with self._get_pool().connection() as c, c.transaction():
            return self._change_on(c, name, changes)

    def _change_on(self, c: psycopg.Connection[Any], name: str, changes: dict[str, Any]) -> Any:
        row = c.execute(self.q["schedule_get_for_update"], {"name": name}).fetchone()
        params = change_params(row, name, changes)
        return row, c.execute(self.q["schedule_write"], params).fetchone()

    def update_schedule(
        self,
        name: str,
        *,
        fsm: Any = UNCHANGED,
        cron: str = UNCHANGED,
        tz: str = UNCHANGED,
        state: Any = UNCHANGED,
        queue: str | None = UNCHANGED,
        priority: int = UNCHANGED,
        missed: str = UNCHANGED,
        catch_up_limit: int = UNCHANGED,
        overlap: str = UNCHANGED,
        conn: psycopg.Connection[Any] | None = None,
    ) -> Schedule:
        """Change the given fields of a schedule (``queue=None``: the machine's queue). A new
        cron or time zone recomputes the next fire from now; the last occurrence's error is
        cleared. On a schedule declared in code, the change holds until a deploy changes
        the same field in code (docs/schedules.md). Raises NoTarget, InvalidValue."""
        changes = {
            "fsm": fsm,
            "cron": cron,
            "tz": tz,
            "state": state,
            "queue": queue,
            "priority": priority,
            "missed": missed,
            "catch_up_limit": catch_up_limit,
            "overlap": overlap,
        }
        _old, row = self._change(name, changes, conn)
        return schedule_of(row)

    def enable_schedule(self, name: str, *, conn: psycopg.Connection[Any] | None = None) -> bool:
        """Enable a schedule; its next fire is computed from now (what it missed while
        disabled is not fired). True when this call enabled it. Raises NoTarget."""
        old, _row = self._change(name, {"enabled": True}, conn)
        return not old[10]

    def disable_schedule(self, name: str, *, conn: psycopg.Connection[Any] | None = None) -> bool:
        """Disable a schedule: it fires nothing until enabled (a run it started goes on).
        Kept across restarts, also for a schedule declared in code. True when this call
        disabled it. Raises NoTarget."""
        old, _row = self._change(name, {"enabled": False}, conn)
        return bool(old[10])

    def trigger_schedule(self, name: str, *, conn: psycopg.Connection[Any] | None = None) -> int:
        """Fire a schedule now, outside its cron (enabled or not, overlap not checked):
        insert one instance as an occurrence would, under the key
        ``schedule:NAME@manual:TIME``; its next fire is unchanged. Returns the instance's
        id. Raises NoTarget, or UnknownMachine when no supervisor registered its machine."""
        return trigger_result(name, self._one("schedule_trigger", trigger_params(name), conn))

    def delete_schedule(self, name: str, *, conn: psycopg.Connection[Any] | None = None) -> None:
        """Delete a schedule (the instances it inserted stay). A schedule declared in code is
        registered again at the next supervisor start: disable it instead, or remove the
        declaration first. Raises NoTarget."""
        if self._one("schedule_delete", {"name": name}, conn) is None:
            raise NoTarget(f"no schedule {name!r}")

    def get_schedule(self, name: str, *, conn: psycopg.Connection[Any] | None = None) -> Schedule | None:
        """A snapshot of the schedule, or None when there is none by that name."""
        row = self._one("schedule_get", {"name": name}, conn)
        return None if row is None else schedule_of(row)

    def schedules(self, *, conn: psycopg.Connection[Any] | None = None) -> list[Schedule]:
        """Every schedule, by name, each with its next fire time."""
        return [schedule_of(row) for row in self._all("schedule_list", {}, conn)]
