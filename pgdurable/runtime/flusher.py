"""The flusher: group commit of a worker process's outcomes.

Outcomes submitted while a flush runs wait together and are committed by the next flush, in
one transaction of a fixed few statements whatever their number (``engine.commit``). Each
step's task waits until its outcome is durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from pgdurable.engine.outcome import Result
from pgdurable.runtime.backoff import retry_delay
from pgdurable.runtime.context import Runtime
from pgdurable.runtime.lifecycle import Component


@dataclass(slots=True)
class _Pending:
    result: Result
    done: asyncio.Future[bool]


class Flusher(Component):
    """Group commit: outcomes submitted while a flush runs are committed together next."""

    name = "flusher"

    def __init__(self, rt: Runtime, on_delayed: Callable[[float], None] | None = None):
        super().__init__()
        self.rt = rt
        #: Told, after the commit, in how many seconds a delayed row of this queue is due.
        self.on_delayed = on_delayed
        self._waiting: list[_Pending] = []
        self._wake = asyncio.Event()
        #: The running loop, read once (on Python 3.11 each lookup is a getpid() system call).
        self._loop: asyncio.AbstractEventLoop | None = None

    def _pending(self, result: Result) -> _Pending:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return _Pending(result, self._loop.create_future())

    async def submit(self, result: Result) -> bool:
        """Wait until the outcome is durable; False when it was stale (claim lost)."""
        item = self._pending(result)
        self._waiting.append(item)
        self._wake.set()
        return await item.done

    def committed_alone(self, result: Result, stale: set[int]) -> bool:
        """Account for an outcome committed outside the group (a transactional step's, in
        its own transaction) as a flush would; False when it was stale."""
        item = self._pending(result)
        self._settle([item], stale)
        return item.done.result()

    def close(self) -> None:
        super().close()
        self._wake.set()

    async def run(self) -> None:
        # Closing, it still flushes whatever is waiting, then returns.
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._waiting = self._waiting, []
            if batch:
                await self._flush(batch)
            elif self.closing.is_set():
                return

    async def _flush(self, batch: list[_Pending]) -> None:
        rt = self.rt
        failures = 0
        while True:
            try:
                started = rt.clock()
                async with rt.pool.connection() as conn:
                    report = await rt.engine.flush(conn, [p.result for p in batch], rt.queue)
                if rt.metrics is not None:
                    rt.metrics.observe("flush", rt.clock() - started)
                    rt.metrics.observe("flush_rows", len(batch))
                break
            except psycopg.OperationalError as exc:
                if not transient(exc):
                    self._fail(batch, exc)
                    return
                # The connection or the server went away (a killed backend, a restart, a
                # failover), or the transaction lost a race (deadlock, serialization):
                # whether the commit happened is unknown, so commit again on a new
                # connection. Safe: every write is guarded by the claims' fencing tokens, so
                # rows already committed are simply reported stale. Nobody is charged a crash.
                failures += 1
                rt.stats.error(f"flush failed, retrying: {exc!r}")
                rt.log.warning(
                    "flush of %d outcomes failed (%r); retrying on a new connection",
                    len(batch),
                    exc,
                    extra={"event": "flush_retry", "queue": rt.queue, "rows": len(batch)},
                )
                await asyncio.sleep(retry_delay(failures))
            except Exception as exc:  # noqa: BLE001 - logged with its traceback in _fail
                self._fail(batch, exc)
                return
        self._settle(batch, report.stale)
        if self.closing.is_set():
            self._wake.set()  # look once more: return when nothing is left

    def _settle(self, batch: list[_Pending], stale_ids: set[int]) -> None:
        """Tell each step whether its outcome committed, and the feeder when delayed rows
        of this queue are due."""
        rt = self.rt
        soonest: float | None = None
        for p in batch:
            stale = p.result.row.id in stale_ids
            rt.stats.stale += stale
            if not stale:
                delay = _delayed(p.result, rt.queue)
                if delay is not None and (soonest is None or delay < soonest):
                    soonest = delay
            if not p.done.done():
                p.done.set_result(not stale)
        if soonest is not None and self.on_delayed is not None:
            self.on_delayed(soonest)

    def _fail(self, batch: list[_Pending], exc: BaseException) -> None:
        """A flush that retrying cannot mend: its rows stay executing, and recovery (their
        lease) returns them."""
        self.rt.stats.error(f"flush failed: {exc!r}")
        self.rt.log.error(
            "flush failed: %r",
            exc,
            exc_info=exc,
            extra={
                "event": "flush_failed",
                "queue": self.rt.queue,
                "rows": len(batch),
                "instances": [p.result.row.id for p in batch[:100]],
            },
        )
        for p in batch:
            if not p.done.done():
                p.done.set_exception(exc)


#: SQLSTATE classes worth a retry on a new connection: connection exceptions (08), operator
#: intervention (57P: shutdown, restart), and lost races (40: deadlock, serialization).
_TRANSIENT = ("08", "57P", "40")


def transient(exc: psycopg.OperationalError) -> bool:
    """Whether a failed flush may succeed when tried again: the connection broke (no
    SQLSTATE: the client lost the server, or the pool timed out), the server is going away,
    or the transaction lost a race. A statement the server refuses for what it says (a size
    limit, a statement timeout) is not retried."""
    state = exc.sqlstate
    return state is None or state.startswith(_TRANSIENT)


def _delayed(r: Result, queue: str) -> float | None:
    """The smallest delay after which a row of ``queue`` this outcome wrote becomes due."""
    delays = [r.delay] if r.kind in ("next", "retry") and r.delay > 0 else []
    delays += [c.delay for c in r.children if c.delay > 0 and c.queue in (None, queue)]
    return min(delays) if delays else None
