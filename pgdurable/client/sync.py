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
