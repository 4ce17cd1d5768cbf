"""The light client: insert, signal, read and wait, for producers.

Imports psycopg, psycopg_pool and msgspec only: no worker, no supervisor, no uvloop, no user
code. Inserts accept a machine class or just its name. Every call runs one named statement
(``insert_many``: a ``COPY`` and the statement that draws its ids, see ``bulk.py``); pass
``conn=`` to run it inside your own transaction (transactional enqueue).

``Client`` and ``AsyncClient`` share the parameter building and result reading below; they
differ only in how they talk to the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import psycopg
from psycopg import errors as pgerrors
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from pgdurable.client.bulk import Batch
from pgdurable.contract.errors import DuplicateInstance, NoTarget, UnknownMachine
from pgdurable.contract.outcomes import Done
from pgdurable.contract.spec import (
    TERMINAL_STATUSES,
    Child,
    Insert,
    encode_json,
    resolve,
)
from pgdurable.db.queries import Queries, for_schema

__all__ = ["AsyncClient", "Busy", "Child", "Client", "Done", "Failed", "Insert", "Instance"]


@dataclass(frozen=True, slots=True)
class Instance:
    """A snapshot of one instance row."""

    id: int
    fsm: str
    version: int | None
    step: str | None
    status: str
    queue: str
    priority: int
    attempt: int
    crashes: int
    state: Any
    result: Any
    last_error: str | None
    awaits: list[str] | None
    await_deadline: dt.datetime | None
    parent_id: int | None
    children_pending: int
    correlation_key: str | None
    concurrency_key: str | None
    rate_limit: str | None
    weight: float
    eligible_at: dt.datetime
    inserted_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Failed:
    """wait(): the instance ended failed (or cancelled) with ``error``."""

    error: str | None
    status: str = "failed"


@dataclass(frozen=True, slots=True)
class Busy:
    """wait(): the instance had not finished when the timeout passed."""

    instance: Instance


WaitResult = Done | Failed | Busy
T = TypeVar("T")


def _json(raw: str | None) -> Any:
    return None if raw is None else msgspec.json.decode(raw)


def _instance(row: Sequence[Any]) -> Instance:
    values = list(row)
    values[9] = _json(values[9])  # state
    values[10] = _json(values[10])  # result
    return Instance(*values)


def _outcome(inst: Instance) -> WaitResult:
    if inst.status == "done":
        return Done(inst.result)
    if inst.status in TERMINAL_STATUSES:
        return Failed(inst.last_error, inst.status)
    return Busy(inst)


def _insert_params(spec: Insert) -> dict[str, Any]:
    r = resolve(spec)
    return {
        "fsm": r.fsm,
        "version": r.version,
        "step": r.step,
        "state": bytes(r.state).decode(),
        "queue": r.queue,
        "priority": r.priority,
        "at": r.at,
        "delay": r.delay,
        "correlation_key": r.correlation_key,
        "correlation_scope": r.scope,
        "concurrency_key": r.concurrency_key,
        "rate_limit": r.rate_limit,
        "weight": r.weight,
    }


def _insert_result(params: dict[str, Any], row: Sequence[Any] | None) -> int:
    assert row is not None
    iid, known, _queue, _notified = row
    if not known:
        raise UnknownMachine(
            f"machine {params['fsm']!r} is not registered by any worker of this schema and no "
            "queue was given; start a worker that runs it or pass queue="
        )
    if iid is None:
        raise DuplicateInstance([params["correlation_key"]])
    return int(iid)


def _many_error(specs: Sequence[Insert], exc: pgerrors.UniqueViolation) -> DuplicateInstance:
    detail = exc.diag.message_detail or ""
    key = detail.partition(")=(")[2].rpartition(") already exists")[0]
    return DuplicateInstance([key] if key else [s.correlation_key or "?" for s in specs])


def _copy_query(q: Queries, batch: Batch) -> tuple[bytes, bool]:
    plain = batch.plain()
    return q["instance_copy_plain" if plain else "instance_copy"], plain


def _in_caller_txn(conn: psycopg.Connection[Any], run: Callable[[], T]) -> T:
    """Run a write on the caller's connection without spoiling their transaction.

    Inside their open transaction: in a savepoint, so a refused batch leaves it usable.
    Otherwise the write is atomic on its own; if it opened an implicit transaction and
    fails, that transaction held nothing else and is rolled back.
    """
    if conn.info.transaction_status == TransactionStatus.INTRANS:
        with conn.transaction():
            return run()
    try:
        return run()
    except psycopg.Error:
        if not conn.autocommit:
            conn.rollback()
        raise


async def _in_caller_txn_async(conn: psycopg.AsyncConnection[Any], run: Callable[[], Awaitable[T]]) -> T:
    """See ``_in_caller_txn``."""
    if conn.info.transaction_status == TransactionStatus.INTRANS:
        async with conn.transaction():
            return await run()
    try:
        return await run()
    except psycopg.Error:
        if not conn.autocommit:
            await conn.rollback()
        raise


def _signal_params(
    target: int | str, name: str, payload: Any, dedup_key: str | None, *, notify: bool
) -> dict[str, Any]:
    if isinstance(target, bool) or not isinstance(target, int | str):
        raise TypeError(f"signal target must be an instance id or a correlation key, got {target!r}")
    if not name:
        raise ValueError("signal name must not be empty")
    return {
        "target_id": target if isinstance(target, int) else None,
        "target_key": target if isinstance(target, str) else None,
        "name": name,
        "payload": encode_json({} if payload is None else payload),
        "dedup_key": dedup_key,
        "notify": notify,
    }


def _signal_result(target: int | str, row: Sequence[Any] | None) -> int | None:
    if row is None:
        raise NoTarget(f"no live instance {target!r} to signal (unknown or already finished)")
    return None if row[1] is None else int(row[1])


def _spec(fsm: Any, state: Any, options: dict[str, Any]) -> Insert:
    return fsm if isinstance(fsm, Insert) and state is None and not options else Insert(fsm, state, **options)


class _Emitter:
    """Notifies queues after the producer's commit, off its path, coalesced.

    NOTIFY inside a committing transaction serialises commits cluster-wide (measured in
    bench/notify.py, see docs/performance.md). So while several writes of this client are
    in flight at once, they leave it out, and this thread sends one statement for every
    queue that became due while the previous one was being sent. A write that is alone
    notifies itself (in its transaction, or right after its COPY): nothing to contend with.
    Best effort: correctness never depends on a notification.
    """

    def __init__(self, client: Client):
        self._client = client
        self._pending: set[str] = set()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._inflight = 0

    def begin(self) -> bool:
        """A write starts; True when it is the only one in flight (it should notify itself)."""
        with self._cv:
            self._inflight += 1
            return self._inflight == 1

    def end(self) -> None:
        with self._cv:
            self._inflight -= 1

    def add(self, queue: str) -> None:
        with self._cv:
            self._pending.add(queue)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pgdurable-notify", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                queues, self._pending = sorted(self._pending), set()
            with contextlib.suppress(psycopg.Error), self._client._get_pool().connection() as c:
                c.execute(self._client.q["queue_notify_many"], {"queues": queues}, prepare=True)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class _AsyncEmitter:
    """``_Emitter`` for the asyncio client: one task instead of a thread."""

    def __init__(self, client: AsyncClient):
        self._client = client
        self._pending: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight = 0

    def begin(self) -> bool:
        self._inflight += 1
        return self._inflight == 1

    def end(self) -> None:
        self._inflight -= 1

    def add(self, queue: str) -> None:
        self._pending.add(queue)
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(self._wake))
        self._wake.set()

    async def _run(self, wake: asyncio.Event) -> None:
        while True:
            await wake.wait()
            wake.clear()
            if not self._pending:
                continue
            queues, self._pending = sorted(self._pending), set()
            with contextlib.suppress(psycopg.Error):
                async with (await self._client._get_pool()).connection() as c:
                    await c.execute(self._client.q["queue_notify_many"], {"queues": queues}, prepare=True)

    async def close(self) -> None:
        if self._task is not None:
            if self._pending and self._wake is not None:
                self._wake.set()
                await asyncio.sleep(0)
                for _ in range(100):
                    if not self._pending:
                        break
                    await asyncio.sleep(0.01)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class Client:
    """Synchronous client over a small connection pool (opened on first use)."""

    def __init__(self, dsn: str, *, schema: str = "pgdurable", max_connections: int = 4):
        self.q: Queries = for_schema(schema)
        self._dsn = dsn
        self._max = max_connections
        self._pool: ConnectionPool | None = None
        self._opening = threading.Lock()
        self._emitter = _Emitter(self)

    def _get_pool(self) -> ConnectionPool:
        with self._opening:  # concurrent first calls from threads must not open two pools
            if self._pool is None:
                self._pool = ConnectionPool(
                    self._dsn, min_size=1, max_size=self._max, kwargs={"autocommit": True}, open=True
                )
            return self._pool

    def close(self) -> None:
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
        params = _insert_params(_spec(fsm, state, options))
        # Inside the caller's transaction the NOTIFY must ride it (it fires at their commit).
        params["notify"] = conn is not None or self._emitter.begin()
        try:
            row = self._one("instance_insert_one", params, conn)
        finally:
            if conn is None:
                self._emitter.end()
        iid = _insert_result(params, row)
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
                ids = _in_caller_txn(conn, lambda: self._copy(conn, batch, notify=True, prepare=None))
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
            raise _many_error(specs, exc) from exc
        return batch.ids_in_input_order(ids)

    def _copy(
        self, c: psycopg.Connection[Any], batch: Batch, *, notify: bool, prepare: bool | None
    ) -> list[int]:
        """Resolve machines named only, draw ids, COPY the rows (see pgdurable/bulk.py),
        then notify their queues. On an autocommit connection the COPY commits alone and
        the notification follows it: a woken worker finds the rows. Statements are
        prepared on the client's own connections only (``prepare=None`` on a caller's:
        psycopg's own policy, which the caller may have turned off)."""
        if names := batch.unresolved():
            batch.fill(c.execute(self.q["machines_lookup"], {"names": names}, prepare=prepare).fetchall())
        row = c.execute(self.q["instance_ids_allocate"], {"n": len(batch.rows)}, prepare=prepare).fetchone()
        assert row is not None
        now, ids = row
        query, plain = _copy_query(self.q, batch)
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
        params = _signal_params(target, name, payload, dedup_key, notify=conn is not None)
        if conn is None:
            params["notify"] = self._emitter.begin()
        try:
            row = self._one("signal_deliver", params, conn)
        finally:
            if conn is None:
                self._emitter.end()
        result = _signal_result(target, row)
        if not params["notify"] and row[2] == "runnable":
            self._emitter.add(row[3])
        return result

    def get(self, iid: int, *, conn: psycopg.Connection[Any] | None = None) -> Instance | None:
        row = self._one("instance_get", {"id": iid}, conn)
        return None if row is None else _instance(row)

    def wait(self, iid: int, timeout: float = 10.0) -> WaitResult:
        """Wait up to ``timeout`` seconds for the instance to finish."""
        deadline = time.monotonic() + timeout
        pause = 0.005
        while True:
            inst = self.get(iid)
            if inst is None:
                raise NoTarget(f"no instance {iid}")
            res = _outcome(inst)
            if not isinstance(res, Busy) or time.monotonic() >= deadline:
                return res
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.2)


class AsyncClient:
    """asyncio client over a small connection pool (opened on first use)."""

    def __init__(self, dsn: str, *, schema: str = "pgdurable", max_connections: int = 4):
        self.q: Queries = for_schema(schema)
        self._dsn = dsn
        self._max = max_connections
        self._pool: AsyncConnectionPool | None = None
        self._opening: asyncio.Lock | None = None
        self._emitter = _AsyncEmitter(self)

    async def _get_pool(self) -> AsyncConnectionPool:
        if self._pool is not None:
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:  # concurrent first calls must not open two pools
            if self._pool is None:
                pool = AsyncConnectionPool(
                    self._dsn, min_size=1, max_size=self._max, kwargs={"autocommit": True}, open=False
                )
                await pool.open()
                self._pool = pool
        return self._pool

    async def close(self) -> None:
        await self._emitter.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _one(self, name: str, params: dict[str, Any], conn: psycopg.AsyncConnection[Any] | None) -> Any:
        if conn is not None:
            return await (await conn.execute(self.q[name], params)).fetchone()
        async with (await self._get_pool()).connection() as c:
            return await (await c.execute(self.q[name], params, prepare=True)).fetchone()

    async def insert(
        self,
        fsm: Any,
        state: Any = None,
        *,
        conn: psycopg.AsyncConnection[Any] | None = None,
        **options: Any,
    ) -> int:
        """See ``Client.insert``."""
        params = _insert_params(_spec(fsm, state, options))
        params["notify"] = conn is not None or self._emitter.begin()
        try:
            row = await self._one("instance_insert_one", params, conn)
        finally:
            if conn is None:
                self._emitter.end()
        iid = _insert_result(params, row)
        if not params["notify"]:
            self._emitter.add(row[2])
        return iid

    async def insert_many(
        self, specs: Sequence[Insert], *, conn: psycopg.AsyncConnection[Any] | None = None
    ) -> list[int]:
        """See ``Client.insert_many``."""
        if not specs:
            return []
        batch = Batch.of(specs)
        try:
            if conn is not None:
                ids = await _in_caller_txn_async(
                    conn, lambda: self._copy(conn, batch, notify=True, prepare=None)
                )
            else:
                notify = self._emitter.begin()
                try:
                    async with (await self._get_pool()).connection() as c:
                        ids = await self._copy(c, batch, notify=notify, prepare=True)
                finally:
                    self._emitter.end()
                if not notify:
                    for queue in batch.queues():
                        self._emitter.add(queue)
        except pgerrors.UniqueViolation as exc:
            raise _many_error(specs, exc) from exc
        return batch.ids_in_input_order(ids)

    async def _copy(
        self, c: psycopg.AsyncConnection[Any], batch: Batch, *, notify: bool, prepare: bool | None
    ) -> list[int]:
        """See ``Client._copy``."""
        if names := batch.unresolved():
            cur = await c.execute(self.q["machines_lookup"], {"names": names}, prepare=prepare)
            batch.fill(await cur.fetchall())
        cur = await c.execute(self.q["instance_ids_allocate"], {"n": len(batch.rows)}, prepare=prepare)
        row = await cur.fetchone()
        assert row is not None
        now, ids = row
        query, plain = _copy_query(self.q, batch)
        async with c.cursor().copy(query) as copy:
            await copy.write(batch.encode(ids, now, plain=plain))
        if notify:
            await c.execute(self.q["queue_notify_many"], {"queues": batch.queues()}, prepare=prepare)
        return ids

    async def signal(
        self,
        target: int | str,
        name: str,
        payload: Any = None,
        *,
        dedup_key: str | None = None,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> int | None:
        """See ``Client.signal``."""
        params = _signal_params(target, name, payload, dedup_key, notify=conn is not None)
        if conn is None:
            params["notify"] = self._emitter.begin()
        try:
            row = await self._one("signal_deliver", params, conn)
        finally:
            if conn is None:
                self._emitter.end()
        result = _signal_result(target, row)
        if not params["notify"] and row[2] == "runnable":
            self._emitter.add(row[3])
        return result

    async def get(self, iid: int, *, conn: psycopg.AsyncConnection[Any] | None = None) -> Instance | None:
        row = await self._one("instance_get", {"id": iid}, conn)
        return None if row is None else _instance(row)

    async def wait(self, iid: int, timeout: float = 10.0) -> WaitResult:
        """See ``Client.wait``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.005
        while True:
            inst = await self.get(iid)
            if inst is None:
                raise NoTarget(f"no instance {iid}")
            res = _outcome(inst)
            if not isinstance(res, Busy) or loop.time() >= deadline:
                return res
            await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
            pause = min(pause * 2, 0.2)
