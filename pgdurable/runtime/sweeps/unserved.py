"""Unserved queues: a registered machine's queue that no worker process serves anywhere.

Rows inserted for such a queue wait without a word, so the maintenance process looks for
them (``queue_unserved``: the registered machines' queues without a feeder connection in
``pg_stat_activity``) and logs a warning when a queue becomes unserved, and a line when it
is served again — once per change, not once per pass. The first look waits one interval,
so that workers starting with the supervisor have connected.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgdurable.db.queries import Queries
from pgdurable.runtime.lifecycle import sleep_unless
from pgdurable.runtime.sweeps.base import Connect, Sweep


class UnservedQueues(Sweep):
    name = "unserved-queues"

    def __init__(self, connect: Connect, q: Queries, interval: float, log: Any):
        super().__init__(connect, interval, log)
        self.q = q
        #: The queues reported unserved, and not seen served since.
        self.unserved: set[str] = set()

    async def run(self) -> None:
        if await sleep_unless(self.closing, self.interval):
            return
        await super().run()

    def sweep(self, conn: psycopg.Connection[Any]) -> None:
        found = {row[0]: row for row in conn.execute(self.q["queue_unserved"]).fetchall()}
        for queue in sorted(set(found) - self.unserved):
            _, machines, runnable = found[queue]
            shown = "over 10000" if runnable > 10_000 else str(runnable)
            self.log.warning(
                "queue %s of machines %s has no worker on any host (%s runnable rows wait); "
                "add [queues.%s] to a supervisor's config",
                queue,
                ", ".join(machines),
                shown,
                queue,
                extra={"event": "queue_unserved", "queue": queue, "machines": machines, "runnable": runnable},
            )
        for queue in sorted(self.unserved - set(found)):
            self.log.info("queue %s is served again", queue, extra={"event": "queue_served", "queue": queue})
        self.unserved = set(found)
