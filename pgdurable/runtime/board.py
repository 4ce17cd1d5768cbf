"""Which steps a worker is running, in memory shared with its supervisor.

When a worker dies, the supervisor must know which of its rows had a step running (a crash
counts against those) and which were merely held. The worker keeps the ids of its running
steps in a small shared array — plain memory writes, no system call per step — and the
supervisor reads it after the worker is gone. Created by the supervisor before the fork.
"""

from __future__ import annotations

import mmap


class RunningBoard:
    """A fixed array of row ids (0 = free slot), one slot per unit of concurrency."""

    def __init__(self, slots: int):
        self._mm = mmap.mmap(-1, 8 * max(1, slots))  # anonymous and shared across fork
        self._ids = memoryview(self._mm).cast("q")
        self._free = list(range(len(self._ids)))[::-1]
        self._where: dict[int, int] = {}

    def start(self, row_id: int) -> None:
        """Record a step as running (in the worker)."""
        if not self._free:  # more than planned (cannot happen by design): grow nothing, skip
            return
        slot = self._free.pop()
        self._where[row_id] = slot
        self._ids[slot] = row_id

    def stop(self, row_id: int) -> None:
        slot = self._where.pop(row_id, None)
        if slot is not None:
            self._ids[slot] = 0
            self._free.append(slot)

    def running(self) -> list[int]:
        """The ids recorded as running (read by the supervisor, after the worker died)."""
        return [i for i in self._ids if i]

    def close(self) -> None:
        self._ids.release()
        self._mm.close()
