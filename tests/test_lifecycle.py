"""Every long-lived component has one lifecycle: start() idempotent, stop() safe before
start and twice, and two phases (stop taking work, then cancel after the timeout)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgdurable.contract.fsm import Registry
from pgdurable.db.queries import for_schema
from pgdurable.engine import Engine
from pgdurable.runtime.config import parse
from pgdurable.runtime.context import Runtime
from pgdurable.runtime.feedconn import FeedConnection
from pgdurable.runtime.feeder import Feeder
from pgdurable.runtime.flusher import Flusher
from pgdurable.runtime.heartbeat import Heartbeat
from pgdurable.runtime.lifecycle import Component
from pgdurable.runtime.reporter import Reporter
from pgdurable.runtime.slots import Slots
from pgdurable.runtime.sweeps.awaits import AwaitDeadlines
from pgdurable.runtime.sweeps.deadlines import Deadlines
from pgdurable.runtime.sweeps.gc import Collector
from pgdurable.runtime.sweeps.reaper import Reaper

from .supervised import start, wait_until


class Job(Component):
    """Finishes ``work`` seconds of work after it is closed (or never, when None)."""

    name = "job"

    def __init__(self, work: float | None):
        super().__init__()
        self.work = work
        self.started = 0
        self.finished = False
        self.cancelled = False

    async def run(self) -> None:
        self.started += 1
        await self.closing.wait()
        try:
            await asyncio.sleep(3600 if self.work is None else self.work)
            self.finished = True
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def test_start_is_idempotent_and_stop_is_safe_before_start_and_twice():
    async def main() -> None:
        job = Job(0.0)
        await job.stop(1.0)  # before start: nothing to do
        job.start()
        job.start()
        await asyncio.sleep(0)
        assert job.started == 1 and job.alive
        await job.stop(1.0)
        await job.stop(1.0)
        assert job.finished and not job.cancelled and not job.alive and job.task is None

    asyncio.run(main())


def test_stop_lets_the_work_finish_within_the_timeout():
    async def main() -> None:
        job = Job(0.2)
        job.start()
        await asyncio.sleep(0)
        await job.stop(5.0)
        assert job.finished and not job.cancelled

    asyncio.run(main())


def test_stop_cancels_what_is_left_after_the_timeout():
    async def main() -> None:
        job = Job(None)
        job.start()
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await job.stop(0.3)
        assert job.cancelled and not job.finished
        assert loop.time() - t0 < 5

    asyncio.run(main())


def test_a_failed_component_reports_its_exception():
    class Broken(Component):
        async def run(self) -> None:
            raise RuntimeError("boom")

    async def main() -> None:
        c = Broken()
        c.start()
        assert c.task is not None
        await asyncio.wait([c.task])
        assert isinstance(c.failed(), RuntimeError)
        await c.stop()
        await c.stop()

    asyncio.run(main())


def test_every_runtime_component_follows_the_lifecycle(dsn, schema):
    """The worker's components and the maintenance sweeps, on a real database: stop before
    start, start twice, stop twice — and nothing is left running."""
    cfg = parse({"database": {"dsn": dsn, "schema": schema}, "queues": {"q": {}}})

    def connect() -> psycopg.Connection:
        return psycopg.connect(dsn, autocommit=True)

    async def main() -> None:
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=2, kwargs={"autocommit": True}, open=False)
        await pool.open(wait=True)
        try:
            registry = Registry([])
            rt = Runtime(cfg, dsn, "q", 0, Engine(registry, schema=schema), pool, logging.getLogger("t"))
            flusher = Flusher(rt)
            slots = Slots(rt, flusher)
            feed = FeedConnection(dsn, "q", "pgdurable_q", probe_every=1.0, on_connect=slots.wake.set)
            q = for_schema(schema)
            log = logging.getLogger("t")
            components: list[Component] = [
                flusher,
                slots,
                Feeder(rt, slots, feed),
                Heartbeat(rt, slots),
                Reporter(None, dict, str, rt.stopping.set),
                Reaper(connect, q, registry, 3, 0.05, 60.0),
                AwaitDeadlines(connect, q, 0.05, log),
                Deadlines(connect, q, 0.05, log),
                Collector(connect, q, 0.05, 3600.0, 100),
            ]
            for c in components:
                await c.stop(1.0)
                assert c.task is None
            for c in components:
                c.start()
                first = c.task
                c.start()
                assert c.task is first and c.alive, c.name
            await asyncio.sleep(0.3)  # the sweeps run a few times, the feeder claims
            for c in components:
                await c.stop(2.0)
                await c.stop(2.0)
                assert c.task is None and c.failed() is None, c.name
            assert all(s.runs >= 1 for s in components if hasattr(s, "runs"))
        finally:
            await feed.close()
            await pool.close()

    asyncio.run(main())


def test_the_maintenance_process_is_replaced_and_keeps_sweeping(dsn, schema, client, sups, tmp_path):
    """The sweeps run in a process of their own: killed, it is replaced; an await timeout
    still fires afterwards (the await-deadline sweep runs in the new process)."""
    sup = start(sups, tmp_path, dsn, schema, processes=1, heartbeat=1)
    (first,) = wait_until(sup.maintenance, what="the maintenance process")
    assert first not in sup.workers()
    os.kill(first, signal.SIGKILL)
    (second,) = wait_until(lambda: [p for p in sup.maintenance() if p != first], what="a new one")
    assert second != first
    iid = client.insert("waiter", {"timeout": 1})
    assert client.wait(iid, timeout=30).result["timed_out"]
    assert sup.stop() == 0


def test_maintenance_can_be_turned_off(dsn, schema, sups, tmp_path):
    sup = start(sups, tmp_path, dsn, schema, processes=1, maintenance_enabled="false")
    assert sup.workers() and not sup.maintenance()
    assert sup.stop() == 0
