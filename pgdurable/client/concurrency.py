"""The hand-written halves of the two clients: a lock, a sleep and the notification emitter.

``sync.py`` is generated from ``aio.py`` by renaming names (see ``tools/gen_sync_client.py``);
each pair below is what a name becomes: ``ALock`` → ``Lock``, ``asleep`` → ``sleep``,
``TaskEmitter`` → ``ThreadEmitter``. Everything else is written once, in ``aio.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable

import psycopg

__all__ = ["ALock", "Lock", "TaskEmitter", "ThreadEmitter", "asleep", "sleep"]

ALock = asyncio.Lock
Lock = threading.Lock
asleep = asyncio.sleep
sleep = time.sleep


class ThreadEmitter:
    """Notifies queues after the producer's commit, off its path, coalesced.

    NOTIFY inside a committing transaction serialises commits cluster-wide (measured in
    bench/notify.py, see docs/performance.md). So while several writes of this client are
    in flight at once, they leave it out, and this thread sends one statement for every
    queue that became due while the previous one was being sent. A write that is alone
    notifies itself (in its transaction, or right after its COPY): nothing to contend with.
    Best effort: correctness never depends on a notification, and a failed one is dropped.

    ``send(queues)`` is the client's statement; it runs on the emitter's thread.
    """

    def __init__(self, send: Callable[[list[str]], None]):
        self._send = send
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
            with contextlib.suppress(psycopg.Error):
                self._send(queues)

    def close(self) -> None:
        """Send what is pending (waiting up to 5 s), then stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class TaskEmitter:
    """``ThreadEmitter`` for the asyncio client: one task instead of a thread.

    Its methods but ``close`` run on the client's event loop, without awaiting.
    """

    def __init__(self, send: Callable[[list[str]], Awaitable[None]]):
        self._send = send
        self._pending: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight = 0

    def begin(self) -> bool:
        """A write starts; True when it is the only one in flight (it should notify itself)."""
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
                await self._send(queues)

    async def close(self) -> None:
        """Send what is pending (waiting up to about 1 s), then cancel the task."""
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
