"""Both clients behind one blocking interface, so each client test runs against both.

``AsyncClient`` is driven through ``AsyncClientFacade``: every call is the real coroutine,
run on an event loop in a background thread. A caller's connection for ``conn=`` must be
of the client's kind, so each side also opens them: a ``psycopg.Connection`` for
``Client``; for ``AsyncClient`` a ``psycopg.AsyncConnection`` on the same loop, behind the
same kind of facade (``execute``, ``commit``, ``rollback``, ``transaction()``, ``info``,
``pgconn`` for tracing).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import psycopg

from pgdurable.client import AsyncClient, Client, Insert, Instance, WaitResult

T = TypeVar("T")

#: No test call takes this long; a hang fails the test instead of the run.
CALL_TIMEOUT = 60.0


class LoopThread:
    """An event loop running in a thread of its own until ``close``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="client-facade-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_TIMEOUT)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CALL_TIMEOUT)
        self.loop.close()


class AsyncCursorFacade:
    def __init__(self, cur: psycopg.AsyncCursor[Any], loop: LoopThread):
        self.cur, self._loop = cur, loop

    def fetchone(self) -> Any:
        return self._loop.run(self.cur.fetchone())

    def fetchall(self) -> list[Any]:
        return self._loop.run(self.cur.fetchall())


class AsyncConnFacade:
    """A ``psycopg.AsyncConnection`` used like a ``psycopg.Connection``."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], loop: LoopThread):
        self.conn, self._loop = conn, loop

    @property
    def pgconn(self) -> Any:
        return self.conn.pgconn

    @property
    def info(self) -> Any:
        return self.conn.info

    @property
    def autocommit(self) -> bool:
        return self.conn.autocommit

    def execute(self, query: Any, params: Any = None) -> AsyncCursorFacade:
        return AsyncCursorFacade(self._loop.run(self.conn.execute(query, params)), self._loop)

    def commit(self) -> None:
        self._loop.run(self.conn.commit())

    def rollback(self) -> None:
        self._loop.run(self.conn.rollback())

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        tx = self.conn.transaction()
        self._loop.run(tx.__aenter__())
        try:
            yield
        except BaseException as exc:
            if not self._loop.run(tx.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            self._loop.run(tx.__aexit__(None, None, None))

    def __enter__(self) -> AsyncConnFacade:
        return self

    def __exit__(self, *exc: Any) -> None:
        # as psycopg.Connection's: commit or roll back, then close
        self._loop.run(self.conn.__aexit__(*exc))


def _async_conn(conn: Any) -> psycopg.AsyncConnection[Any] | None:
    if conn is None:
        return None
    if not isinstance(conn, AsyncConnFacade):
        raise TypeError(f"the async client takes a connection from AsyncSide.connect, got {conn!r}")
    return conn.conn


class AsyncClientFacade:
    """``AsyncClient`` with ``Client``'s blocking signatures."""

    def __init__(self, inner: AsyncClient, loop: LoopThread):
        self.inner, self._loop = inner, loop

    @property
    def q(self) -> Any:
        return self.inner.q

    @property
    def _pool(self) -> Any:
        return self.inner._pool

    def insert(self, fsm: Any, state: Any = None, *, conn: Any = None, **options: Any) -> int:
        return self._loop.run(self.inner.insert(fsm, state, conn=_async_conn(conn), **options))

    def insert_many(self, specs: Sequence[Insert], *, conn: Any = None) -> list[int]:
        return self._loop.run(self.inner.insert_many(specs, conn=_async_conn(conn)))

    def signal(
        self,
        target: int | str,
        name: str,
        payload: Any = None,
        *,
        dedup_key: str | None = None,
        conn: Any = None,
    ) -> int | None:
        return self._loop.run(
            self.inner.signal(target, name, payload, dedup_key=dedup_key, conn=_async_conn(conn))
        )

    def get(self, iid: int, *, conn: Any = None) -> Instance | None:
        return self._loop.run(self.inner.get(iid, conn=_async_conn(conn)))

    def wait(self, iid: int, timeout: float = 10.0) -> WaitResult:
        return self._loop.run(self.inner.wait(iid, timeout))

    def close(self) -> None:
        self._loop.run(self.inner.close())

    def __enter__(self) -> AsyncClientFacade:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncSide:
    """``Client`` and plain connections."""

    name = "sync"

    def make_client(self, dsn: str, **kw: Any) -> Client:
        return Client(dsn, **kw)

    def connect(self, dsn: str, **kw: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(dsn, **kw)

    def close(self) -> None:
        pass


class AsyncSide:
    """``AsyncClient`` and async connections, all on one loop thread."""

    name = "async"

    def __init__(self) -> None:
        self.loop = LoopThread()

    def make_client(self, dsn: str, **kw: Any) -> AsyncClientFacade:
        return AsyncClientFacade(AsyncClient(dsn, **kw), self.loop)

    def connect(self, dsn: str, **kw: Any) -> AsyncConnFacade:
        return AsyncConnFacade(self.loop.run(psycopg.AsyncConnection.connect(dsn, **kw)), self.loop)

    def close(self) -> None:
        self.loop.close()
