"""The one lifecycle of every long-lived component of a process.

A component (the feeder, the slots that run steps, the flusher, the heartbeat, the
reporter, each maintenance sweep) is a task on the process's event loop:

- ``start()`` starts it; calling it again while it runs does nothing.
- ``stop(timeout)`` stops it in two phases: first it stops taking work (``close()``: the
  component's loop sees ``closing`` and winds down, finishing what it holds), then, when
  ``timeout`` seconds pass without it finishing, its task is cancelled. It is safe before
  ``start()`` and safe twice; it returns once the task is gone.

A subclass writes ``run()`` — the loop, which returns once ``closing`` is set and its work
is finished — and may override ``close()`` to wake that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod

log = logging.getLogger("pgdurable.runtime")


class Component(ABC):
    """A task with ``start()`` / two-phase ``stop()``; see the module docstring."""

    name: str = "component"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self.closing = asyncio.Event()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The component's task while it is started (None before start and after stop)."""
        return self._task

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the component's task (idempotent)."""
        if self._task is None:
            self.closing.clear()
            self._task = asyncio.create_task(self._main(), name=self.name)

    async def _main(self) -> None:
        try:
            await self.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A component that dies takes its process down with a clear log line: the
            # supervisor replaces the process, and its rows go back at once.
            log.exception("%s failed", self.name, extra={"event": "component_failed", "component": self.name})
            raise

    @abstractmethod
    async def run(self) -> None:
        """The component's loop: return once ``closing`` is set and the work held is done."""

    def close(self) -> None:
        """Phase one: stop taking new work. Safe at any time, any number of times."""
        self.closing.set()

    async def stop(self, timeout: float = 0.0) -> None:
        """Close, wait up to ``timeout`` seconds for the loop to finish, then cancel it."""
        self.close()
        task = self._task
        if task is None:
            return
        if not task.done() and timeout > 0:
            await asyncio.wait([task], timeout=timeout)
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        self._task = None

    def failed(self) -> BaseException | None:
        """The exception the component's loop died of, if it did."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()


async def sleep_unless(event: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` or until ``event`` is set; True when the event cut it short."""
    if event.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), max(0.0, seconds))
        return True
    return False
